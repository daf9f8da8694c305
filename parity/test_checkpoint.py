"""Check 7: a PyTorch-trained checkpoint file (bare and DataParallel) loads into flaxres."""

from parity.checks import Case
from parity.conftest import assert_measures


def test_checkpoint_file(case: Case):
    assert_measures(case.check_checkpoint())
