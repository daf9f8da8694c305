"""Check 6: a 20-step training trajectory (warm-up and two lr drops) in both frameworks.

On 2 CPU cores the trajectory costs minutes per deep net, so CI runs it for one net of each kind
(BasicBlock with shortcuts A and C, plain without BatchNorm, grouped Bottleneck); set
``FLAXRES_PARITY_FULL=1`` to run it for every registered architecture. The others say so when
skipped.
"""

import os

import pytest

from parity.checks import Case
from parity.conftest import assert_measures

CI_TRAJECTORIES = {"resnet20", "resnet20[shortcut=C]", "plain20[norm=False]", "resnext29_8x64d"}
FULL = os.environ.get("FLAXRES_PARITY_FULL") == "1"


def test_trajectory(case: Case):
    if not FULL and case.id not in CI_TRAJECTORIES:
        pytest.skip(f"trajectory of {case.id} runs with FLAXRES_PARITY_FULL=1 "
                    f"(CI runs {', '.join(sorted(CI_TRAJECTORIES))})")
    assert_measures(case.check_trajectory())
