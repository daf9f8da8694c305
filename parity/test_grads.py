"""Check 4: gradients of the cross-entropy w.r.t. every parameter."""

from parity.checks import Case
from parity.conftest import assert_measures


def test_grads(case: Case):
    assert_measures(case.check_grads())
