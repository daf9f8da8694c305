"""Gradients of the trainer's loss w.r.t. every parameter, through the model's own ``__call__``."""

from parity.checks import Case
from parity.conftest import assert_measures


def test_grads(case: Case, precision: str):
    assert_measures(case.check_grads(precision))
