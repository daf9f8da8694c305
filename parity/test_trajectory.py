"""Check 6: a 20-step training trajectory (warm-up and two lr drops) in both frameworks.

Runs for the nets in ``parity.checks.TRAJ_CASES`` (one of each kind); the others say so when
skipped. ``FLAXRES_PARITY_FULL=1`` runs it for every registered architecture.
"""

import pytest

from parity.checks import TRAJ_CASES, TRAJ_FULL, Case
from parity.conftest import assert_measures


def test_trajectory(case: Case):
    if not TRAJ_FULL and case.id not in TRAJ_CASES:
        pytest.skip(f"trajectory of {case.id} runs with FLAXRES_PARITY_FULL=1 "
                    f"(by default only for {', '.join(sorted(TRAJ_CASES))})")
    assert_measures(case.check_trajectory())
