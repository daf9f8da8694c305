"""tests/mutate.py's own bad flags: one line naming the flag, exit 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

MUTATE = Path(__file__).with_name("mutate.py")


@pytest.mark.parametrize("flags, named", [(["--jobs", "0"], "--jobs 0"),
                                          (["--only", "no_such_bug"], "no_such_bug")])
def test_bad_flag_is_one_line_and_exit_2(flags: list[str], named: str):
    out = subprocess.run([sys.executable, str(MUTATE), *flags], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert named in out.stderr.splitlines()[-1] and "Traceback" not in out.stderr
