"""Check 5: train.optim.sgd equals torch.optim.SGD; its schedules equal PyTorch's schedulers."""

from parity.checks import Case, check_schedules
from parity.conftest import assert_measures


def test_sgd_step(case: Case):
    assert_measures(case.check_optim())


def test_schedules_match_pytorch():
    assert_measures(check_schedules())
