"""``.ci/device``, the one prepared call for a session lent a GPU, runs end to end at toy size on
the CPU: a flag that one of its commands lost would otherwise show only on a lent machine, whose
minutes are few."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train import synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.full
def test_device_script_smoke_run_brings_back_every_file(tmp_path, xla_env):
    src = synthetic.write_cifar10_python(tmp_path, synthetic.make_arrays(512, 64, seed=0),
                                         tar=True)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), FLAXRES_CACHE=str(tmp_path / "cache"), **xla_env,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", ".ci/device", str(src), "--smoke"], check=False, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert sorted(f.name for f in out.iterdir()) == [
        "device.log", "env.txt", "parity.log", "speed.json", "speed.md", "t6-sizing.json"]
    assert "1 passed" in (out / "parity.log").read_text()
    assert re.findall(r"== rc (\d+)", log) == ["0"] * 3, log  # parity, speed, one sizing run
    sizing = json.loads((out / "t6-sizing.json").read_text())["resnet20"]
    assert {"flax", "torch"} <= set(sizing)
    assert all(sizing[fw]["hours_64k"] > 0 for fw in ("flax", "torch"))
