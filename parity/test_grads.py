"""Gradients of the trainer's loss w.r.t. every parameter, through the model's own ``__call__``."""

import pytest

from parity.checks import Case
from parity.conftest import assert_measures


def test_grads(case: Case, precision: str):
    """A chaotic fp32 measure (see ``Case.check_grads``) is an expected failure that says so,
    decided by measurement each run; the float64 proof is unaffected."""
    m = case.check_grads(precision)
    if m.chaotic:
        pytest.xfail(f"chaotic in fp32: {m}")
    assert_measures(m)
