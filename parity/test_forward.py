"""Eval logits, train logits + BatchNorm running statistics, per-stage features: the model's own
``__call__`` and ``features`` against PyTorch float64."""

import pytest

from parity.cases import BLOCKWISE_DEFAULT, BLOCKWISE_FULL, BY_ID
from parity.checks import Case
from parity.conftest import assert_measures


@pytest.mark.representative
def test_eval_logits(case: Case, precision: str):
    """Eval mode changes only what each BatchNorm normalises with (``test_models.py`` checks
    the switch reaches every one), so outside the representative set it runs with ``--full``;
    train-mode logits are checked on every net."""
    assert_measures(case.check_eval(precision))


def test_train_logits_and_bn_stats(case: Case, precision: str):
    assert_measures(case.check_train(precision))


@pytest.mark.representative
def test_stage_features(case: Case, precision: str):
    """``features`` is the stem and the stages ``__call__`` runs, returned before the head, so
    outside the representative set its check runs with ``--full``."""
    assert_measures(case.check_features(precision))


@pytest.mark.parametrize("cid", [*BLOCKWISE_DEFAULT,
                                 *(pytest.param(c, marks=pytest.mark.full) for c in BLOCKWISE_FULL)])
def test_blockwise_equals_plain_model(cid: str):
    """Diagnostic: the jitted-blocks path of the other checks is the plain model's function."""
    assert_measures(Case(BY_ID[cid]).check_blockwise())
