"""The degradation study (train.degradation): the probe step measures without changing training,
the measurements are right on hand-made inputs, a tiny study on generated data writes every
output and shows the deep no-BN plain net's failure, and bad input stops with one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxres
from train import data, degradation, optim, probe, steps, study_report, synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_features_every_block_follows_the_stages():
    model = flaxres.cifar_resnet(14, rngs=nnx.Rngs(0))  # two blocks per stage
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    stages, blocks = nnx.jit(lambda m, x: (m.features(x), m.features(x, every_block=True)))(
        model, x)
    assert len(stages) == 4 and len(blocks) == 1 + 6
    for i, j in ((0, 0), (1, 2), (2, 4), (3, 6)):  # stem, then the last block of each stage
        np.testing.assert_array_equal(stages[i], blocks[j])


def test_probe_step_trains_exactly_as_the_plain_step():
    """probe=True adds measurements from the same gradients; the update is bit-identical."""
    xtr, ytr, _, _ = synthetic.make_arrays(32, 8)
    mesh = steps.make_mesh()
    results = []
    for with_probe in (False, True):
        tx = optim.sgd(0.1)
        train_def, _, state = steps.init_state(flaxres.cifar_resnet(8, rngs=nnx.Rngs(0)), tx, 0)
        step = steps.jit_train_step(mesh, train_def, tx, batch_size=16, mean=(0.5,) * 3,
                                    std=(0.25,) * 3, augment=True, probe=with_probe)
        results.append(step(state, steps.zero_metrics(), jnp.arange(32), jnp.asarray(xtr),
                            jnp.asarray(ytr), jnp.int32(0)))
    for a, b in zip(jax.tree.leaves(results[0][:2]), jax.tree.leaves(results[1][:2])):
        np.testing.assert_array_equal(a, b)
    measured = results[1][2]
    names, norms = probe.ordered_grad_norms(jax.device_get(measured["grad_norm"]))
    assert names[0] == "conv1" and names[-1] == "fc" and len(names) == 8  # resnet8's 8 layers
    assert all(n > 0 for n in norms)
    assert measured["act_std"].shape == (1 + 3,)  # stem + one block per stage


def test_depth_order_and_logit_stats():
    names = ["fc", "layer2.0.downsample.0", "layer10.0.conv1", "layer2.0.conv2",
             "layer2.0.conv1", "conv1", "layer2.1.conv1"]
    assert sorted(names, key=probe.depth_key) == [
        "conv1", "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1",
        "layer10.0.conv1", "fc"]
    # Constant logits: loss ln 10, one predicted class, zero spread.
    stats = probe.logit_stats(np.zeros((4, 10), np.float32), np.array([0, 1, 2, 3]), 10)
    assert math.isclose(stats["loss"], probe.LN10, rel_tol=1e-9)
    assert stats["top_class_share"] == 1.0 and stats["logit_spread"] == 0.0
    assert stats["error"] == 0.75 and stats["pred_hist"][0] == 4


def tiny_study() -> degradation.Study:
    nobn = {"norm": False, "epochs": 2, "weight_decay": 0.0, "step_decay": False, "lr": 0.05,
            "init": "torch_default"}
    return degradation.Study(
        nets=(degradation.Net("plain14-noBN", 14, False, **nobn),
              degradation.Net("resnet8-noBN", 8, True, **nobn)),
        roles={"nobn_plain": "plain14-noBN", "nobn_res": "resnet8-noBN"},
        batch_size=32, probe_steps=(0, 3))


def test_tiny_study_writes_everything_and_shows_the_plain_failure(tmp_path):
    arrays = data.Arrays(*synthetic.make_arrays(256, 100), data.CIFAR10_CLASSES)
    summary = degradation.run(tiny_study(), arrays, tmp_path, "tiny", log=lambda *_: None)
    for name in ("summary.json", "report.md", *study_report.PLOTS):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["claims"] == summary["claims"]
    held = {c["id"]: c["held"] for c in summary["claims"]}
    for cid in ("nobn_plain_loss_ln10", "nobn_plain_chance", "nobn_plain_one_class",
                "nobn_plain_logits_static", "nobn_res_trains"):
        assert held[cid], summary["claims"]
    plain = summary["nets"]["plain14-noBN"]
    assert sorted(plain["probes"], key=int) == ["0", "3", str(plain["steps"] - 1)]
    assert len(plain["probes"]["0"]["grad_norm"]) == 14  # every weight layer, fc included
    assert "**held**: plain14-noBN's loss stays at ln 10" in (tmp_path / "report.md").read_text()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.degradation", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_missing_data_dir_is_one_line_and_writes_nothing(tmp_path):
    work = tmp_path / "out"
    r = cli("--quick", "--workdir", str(work), "--data-dir", str(tmp_path / "nope.tar.gz"),
            "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: --data-dir") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr and not work.exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = cli("--quick", "--workdir", str(f), "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --workdir {f} is a file, not a folder"
    assert f.read_text() == "x"
