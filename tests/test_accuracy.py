"""bench.accuracy: the PyTorch side augments exactly as train.data.augment does, and its
runs survive interruptions."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import accuracy
from bench.accuracy import torch_augment
from train import synthetic
from train.config import Config


def _crops(img: np.ndarray) -> list[np.ndarray]:
    """Every 32x32 crop of the 4-px zero-padded image, each unflipped then flipped."""
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    return [c for oy, ox in itertools.product(range(9), range(9))
            for crop in [padded[oy:oy + 32, ox:ox + 32]] for c in (crop, crop[:, ::-1])]


def test_torch_augment_is_pad_crop_flip():
    imgs = np.random.default_rng(0).integers(1, 256, (400, 32, 32, 3), dtype=np.uint8)
    out = torch_augment(torch.from_numpy(imgs), torch.Generator().manual_seed(0)).numpy()
    assert out.dtype == np.uint8 and out.shape == imgs.shape
    for k in range(30):
        assert sum(np.array_equal(c, out[k]) for c in _crops(imgs[k])) == 1
    zeros = (out == 0).all(-1)
    assert set(zeros[:, :, 16].argmin(1).tolist()) == set(range(5))  # every vertical offset
    flipped = [any(np.array_equal(c, out[k]) for c in _crops(imgs[k])[1::2]) for k in range(100)]
    assert 0.3 < np.mean(flipped) < 0.7


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Config:
    """Two epochs of 4 steps on synthetic data: enough for a resume to land mid-run."""
    root = tmp_path_factory.mktemp("accuracy")
    src = synthetic.write_cifar10_python(root, synthetic.make_arrays(256, 64), tar=True)
    return Config(arch="resnet8", data_dir=str(src), cache_dir=str(root / "cache"), epochs=2,
                  batch_size=64, schedule="cosine", plot=False)


class _Killed(Exception):
    pass


def test_torch_run_resumed_after_an_epoch_equals_uninterrupted(tiny_cfg, tmp_path, monkeypatch):
    whole = accuracy.train_torch(tiny_cfg, threads=1, state_path=tmp_path / "whole.pt")
    save = accuracy._save_atomically

    def save_then_die(obj, path):
        save(obj, path)
        raise _Killed  # as a kill right after the first epoch's state reached the disk

    with monkeypatch.context() as m:
        m.setattr(accuracy, "_save_atomically", save_then_die)
        with pytest.raises(_Killed):
            accuracy.train_torch(tiny_cfg, threads=1, state_path=tmp_path / "cut.pt")
    assert len(torch.load(tmp_path / "cut.pt", weights_only=False)["history"]) == 1
    resumed = accuracy.train_torch(tiny_cfg, threads=1, state_path=tmp_path / "cut.pt")
    untimed = [[{k: v for k, v in h.items() if k != "img_per_s"} for h in r["history"]]
               for r in (whole, resumed)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    a, b = (torch.load(tmp_path / f, weights_only=False) for f in ("whole.pt", "cut.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_torch_state_of_another_recipe_is_refused(tiny_cfg, tmp_path):
    accuracy.train_torch(tiny_cfg, threads=1, state_path=tmp_path / "s.pt")
    other = dataclasses.replace(tiny_cfg, lr=0.05)
    with pytest.raises(ValueError, match=r"s\.pt: saved by a run with other settings \(lr\)"):
        accuracy.train_torch(other, threads=1, state_path=tmp_path / "s.pt")


def test_a_torch_file_that_is_no_run_state_is_refused(tiny_cfg, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"s\.pt: not a PyTorch run state saved by bench"):
        accuracy.train_torch(tiny_cfg, threads=1, state_path=tmp_path / "s.pt")


def test_damaged_torch_state_is_one_line_and_exit_2(tiny_cfg, tmp_path, capsys):
    (tmp_path / "torch-seed0.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as e:
        accuracy.main(["--data-dir", tiny_cfg.data_dir, "--frameworks", "torch", "--seeds", "0",
                       "--epochs", "2", "--workdir", str(tmp_path),
                       "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "torch-seed0.pt: not a readable PyTorch run state" in err
    assert not (tmp_path / "r.json").exists()


def test_steps_run_that_many_iterations_and_the_results_name_the_machine(tiny_cfg, tmp_path):
    """--steps 6 of 4 an epoch: a whole epoch and a partial one; the results file records where
    and under which precision policy they ran."""
    out = tmp_path / "r.json"
    accuracy.main(["--data-dir", tiny_cfg.data_dir, "--arch", "resnet8", "--frameworks", "torch",
                   "--seeds", "0", "--steps", "6", "--batch-size", "64", "--threads", "1",
                   "--json", str(out)])
    r = json.loads(out.read_text())
    assert len(r["runs"]["torch"][0]["test_acc"]) == 2
    assert r["torch_device"] == "cpu" and r["machine"]["cores"] == os.cpu_count()
    assert r["precision_policy"]["policy"] == "tf32" and r["config"]["steps"] == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torch_device_cuda_without_a_gpu_is_one_line_and_exit_2(tiny_cfg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        accuracy.main(["--data-dir", tiny_cfg.data_dir, "--torch-device", "cuda", "--seeds", "0",
                       "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == ("error: --torch-device cuda: PyTorch sees no CUDA "
                                         "device here")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "w").exists()


def test_torch_compile_without_a_compiler_is_one_line_and_exit_2(tiny_cfg, tmp_path):
    """A machine without a C++ compiler (here: CXX names none) stops before any run."""
    r = subprocess.run([sys.executable, "-m", "bench.accuracy", "--data-dir", tiny_cfg.data_dir,
                        "--epochs", "1", "--seeds", "0", "--torch-compile", "--workdir",
                        str(tmp_path / "w"), "--json", str(tmp_path / "r.json")],
                       check=False, env={**os.environ, "CXX": str(tmp_path / "no-such-c++")},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --torch-compile: torch.compile does not work here")
    assert "No working C++ compiler" in r.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "w").exists()


@pytest.mark.full
def test_compiled_torch_run_trains_as_eager(tiny_cfg):
    """--torch-compile changes the speed, not the run: the same losses up to fp32 rounding
    (which 8 steps at lr 0.1 grow to about 1e-4), the same accuracies."""
    eager, compiled = (accuracy.train_torch(tiny_cfg, threads=1, compile_model=c)
                       for c in (False, True))
    losses = [[h["train_loss"] for h in r["history"]] for r in (eager, compiled)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
    assert [h["train_acc"] for h in compiled["history"]] == [h["train_acc"] for h in eager["history"]]
