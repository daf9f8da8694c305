"""A PyTorch-trained checkpoint file (bare and DataParallel) loads into flaxres (float64)."""

import pytest

from parity.checks import Case
from parity.conftest import assert_measures


@pytest.mark.representative
def test_checkpoint_file(case: Case):
    assert_measures(case.check_checkpoint())
