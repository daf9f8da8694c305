"""train.optim.sgd equals torch.optim.SGD; its schedules equal PyTorch's schedulers."""

import pytest

from parity.checks import Case
from parity.conftest import assert_measures
from parity.schedules import check_schedules


@pytest.mark.representative
def test_sgd_step(case: Case):
    assert_measures(case.check_optim())


def test_schedules_match_pytorch():
    assert_measures(*check_schedules())
