"""``pytest --cases representative`` (CI's second CPU path) must still run every representative
net's checks, in both precisions, and nothing of the other nets: an empty or partial selection
would pass silently."""

import subprocess
import sys
from pathlib import Path

import pytest

from parity.cases import CASES, PRECISIONS, REPRESENTATIVE

ROOT = Path(__file__).resolve().parents[1]


def _collected_cases(*options: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n0", "-p", "no:cacheprovider", "--collect-only", "-q",
         *options, "parity/test_grads.py"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.partition("[")[2].rpartition("]")[0]
            for line in out.splitlines() if "::test_grads[" in line}


@pytest.mark.parametrize("choice, arch_ids", [
    ("representative", REPRESENTATIVE), ("all", {a.id for a in CASES})])
def test_cases_option_selects_these_nets(choice: str, arch_ids: set[str]):
    expected = {f"{a}-{p}" for a in arch_ids for p in PRECISIONS}
    assert _collected_cases("--full", "--cases", choice) == expected
