"""Checks 1-3: eval logits, train logits + BatchNorm running statistics, per-stage activations."""

import pytest

from parity.checks import SUBSETS, Case, case_id
from parity.conftest import assert_measures


def test_eval_logits(case: Case):
    assert_measures(case.check_eval())


def test_train_logits_and_bn_stats(case: Case):
    assert_measures(case.check_train())


def test_stage_features(case: Case):
    assert_measures(case.check_features())


@pytest.mark.parametrize("name,overrides", SUBSETS["blockwise"],
                         ids=[case_id(*c) for c in SUBSETS["blockwise"]])
def test_blockwise_equals_whole_model(name: str, overrides: dict, cpu_ops):
    """The jitted block-by-block path the other checks use is the model's own function."""
    assert_measures(Case(name, overrides, cpu_ops=cpu_ops).check_blockwise())
