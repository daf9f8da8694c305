"""tests/mutate.py itself: bad flags are one line naming the flag (exit 2, no traceback), and
every mutant still applies to the code."""

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


def test_every_mutant_still_finds_its_snippet_once():
    """A code change that moves a mutant's snippet fails here, in the default tier, rather than
    only in the slow mutation run."""
    sys.path.insert(0, str(MUTATE.parent))
    import mutate

    for m in mutate.MUTANTS:
        assert (mutate.ROOT / m.file).read_text().count(m.old) == 1, m.name
        assert m.breaks, m.name
