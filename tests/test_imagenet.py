"""``python -m train.imagenet`` on a small generated JPEG folder of varied sizes: its flags and
torchvision's recipe as the defaults, a run through the shared loop whose evaluation counts each
validation image once, and a resume after SIGKILL that equals the uninterrupted run."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_input import folder, tfds_dir  # noqa: F401 - the generated data fixtures
from tests.test_train import by_hand
from train import imagenet, inference, transforms
from train import input as pipeline

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--arch", "resnet8", "--image-size", "32", "--batch-size", "4", "--eval-batch-size",
          "8", "--workers", "0", "--no-plot", "--milestones", "1"]
TIMING = ("epoch_time", "img_per_s")


def test_help_and_torchvisions_recipe_as_defaults(capsys):
    with pytest.raises(SystemExit):
        imagenet.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--arch", "--data-dir", "--image-size", "--batch-size", "--epochs", "--steps",
                 "--workdir", "--resume", "--precision", "--workers", "--recipe"):
        assert flag in out
    cfg = imagenet.parse_args([])
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs,
            cfg.schedule, cfg.milestones, cfg.lr_gamma) == (
        "resnet50", 256, 0.1, 0.9, 1e-4, 90, "multistep", (30, 60), 0.1)
    lr = cfg.lr_schedule(5005)  # ImageNet-1k at batch 256
    assert [float(lr(e * 5005)) for e in (0, 30, 60)] == pytest.approx([0.1, 0.01, 0.001])
    assert dataclasses.replace(imagenet.parse_args(["--recipe", "tv_resnet50"]), recipe=None) == cfg


def test_the_newer_recipe_is_a_file_a_run_names():
    cfg = imagenet.parse_args(["--recipe", "tv_resnet50_v2_optim", "--epochs", "10"])
    spe = 1251  # ImageNet-1k at batch 1024
    assert (cfg.batch_size, cfg.label_smoothing, cfg.norm_weight_decay, cfg.warmup_length(spe),
            cfg.epochs) == (1024, 0.1, 0.0, 5 * spe, 10)
    lr = cfg.lr_schedule(spe)
    assert [float(lr(s)) for s in (0, 5 * spe, 10 * spe)] == pytest.approx([0.005, 0.5, 0])
    assert cfg.ema_decay == pytest.approx(0.998908, abs=1e-6)


def history(workdir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING}
            for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("inet") / "ref"
    imagenet.train(imagenet.parse_args(
        ["--data-dir", str(folder), *COMMON, "--epochs", "3", "--workdir", str(wd)]))
    return wd


def test_it_trains_and_evaluates_each_validation_image_once(folder, reference):  # noqa: F811
    wd = reference
    h = history(wd)
    assert [r["epoch"] for r in h] == [1, 2, 3] and h[-1]["step"] == 3 * 5  # 21 images, batch 4
    assert [r["lr"] for r in h] == pytest.approx([0.1, 0.01, 0.01])
    # The last epoch's validation loss and accuracy are the per-image predictions' of the last
    # checkpoint (21 images in eval batches of 8: the last one padded).
    cfg = imagenet.parse_args(["--data-dir", str(folder), *COMMON, "--checkpoint",
                               str(wd / "checkpoints" / "last")])
    _, run, _ = inference.restore(cfg)
    want = by_hand(run, *validation_set(folder))
    assert h[-1]["test_acc"] == pytest.approx(want["test_acc"], abs=1e-6)
    assert h[-1]["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)


def validation_set(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The validation images as the evaluation transform makes them, one by one, and labels."""
    src = pipeline.ImageFolder(root, "val")
    images = np.stack([transforms.eval_transform(pipeline.decode(*src[i][:2]), 32)
                       for i in range(len(src))])
    return images, np.array([src[i][2] for i in range(len(src))])


def test_recipe_options_and_the_ema_evaluated_beside_the_model(folder, tmp_path):  # noqa: F811
    wd = tmp_path / "options"
    args = ["--data-dir", str(folder), *COMMON, "--epochs", "2", "--workdir", str(wd),
            "--label-smoothing", "0.1", "--norm-weight-decay", "0", "--bias-weight-decay", "0",
            "--schedule", "cosine", "--warmup", "on", "--warmup-steps", "3",
            "--warmup-method", "linear", "--warmup-factor", "0.01", "--ema-decay", "0.5",
            "--ema-steps", "2"]
    imagenet.train(imagenet.parse_args(args))
    h = history(wd)
    # lr(4): the cosine's step 1 of 7 after a warm-up of 3
    assert h[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi / 7)))
    _, run, _ = inference.restore(imagenet.parse_args(
        [*args, "--checkpoint", str(wd / "checkpoints" / "last")]))
    run.state = run.state.replace(**run.state.ema)
    want = by_hand(run, *validation_set(folder))
    assert h[-1]["ema_test_acc"] == pytest.approx(want["test_acc"], abs=1e-6)
    assert h[-1]["ema_test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
    assert h[-1]["ema_test_loss"] != h[-1]["test_loss"]


_KILL_AT = r"""
import os, signal, sys
from train import imagenet
stop = int(sys.argv[1])
imagenet.train(imagenet.parse_args(sys.argv[2:]),
               on_step=lambda step: step == stop and os.kill(os.getpid(), signal.SIGKILL))
"""


def test_resume_after_sigkill_sees_the_batches_of_the_uninterrupted_run(folder, reference,  # noqa: F811
                                                                        tmp_path, xla_env):
    wd = tmp_path / "killed"
    args = ["--data-dir", str(folder), *COMMON, "--epochs", "3", "--workdir", str(wd)]
    env = dict(os.environ, **xla_env)
    p = subprocess.run([sys.executable, "-c", _KILL_AT, "7", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert len(history(wd)) == 1  # killed in epoch 2: epoch 1's checkpoint is the last
    imagenet.train(imagenet.parse_args([*args, "--resume"]))
    assert history(wd) == history(reference)


def test_it_trains_on_a_tfds_dataset(tfds_dir, tmp_path):  # noqa: F811
    wd = tmp_path / "tfds"
    imagenet.train(imagenet.parse_args(["--tfds", "tiny_folder", "--data-dir", str(tfds_dir),
                                        *COMMON, "--epochs", "1", "--workdir", str(wd)]))
    (h,) = history(wd)
    assert h["step"] == 5 and 0 <= h["test_acc"] <= 1


@pytest.mark.parametrize("args,message", [
    (["--tfds", "no_such_set"], ("error: --tfds no_such_set in --data-dir .*: Dataset "
                                "no_such_set not found.")),
    (["--eval-split", "test"], "error: .*: no test/ folder"),
    ([], "error: --data-dir: give the image folder"),
])
def test_bad_data_flags_are_one_line(folder, tmp_path, capsys, args, message):  # noqa: F811
    data = [] if not args else ["--data-dir", str(tmp_path if "--tfds" in args else folder)]
    with pytest.raises(SystemExit) as e:
        imagenet.main([*data, *args, *COMMON, "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and re.match(message, err)
    assert not (tmp_path / "wd").exists()
