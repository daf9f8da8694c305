"""The shipped weight sets in ``flaxres/zoo/``: every folder is registered, each entry's sha256
and accuracy match its file and its run's log, the sets load by name, and where the project's
JPEG CIFAR-10 copy is present ``--eval-only`` reproduces the logged test accuracy (the number
in the README's results table)."""

import hashlib
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import flaxres
from flaxres.convert import state_dict_arrays
from flaxres.pretrained import ZOO
from tests.test_models import CIFAR_COUNTS
from train import cifar

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
NAMES = flaxres.list_pretrained()
by_name = pytest.mark.parametrize("name", NAMES)


def logged_final(name: str) -> dict:
    """The last epoch's line of the run's metrics.jsonl."""
    return json.loads((ZOO / name / "metrics.jsonl").read_text().splitlines()[-1])


def test_every_shipped_folder_is_registered():
    assert sorted(d.name for d in ZOO.iterdir() if d.is_dir()) == sorted(NAMES)
    assert "resnet20.cifar10_jpeg_cos90" in NAMES  # an empty parametrisation would pass silently


@by_name
def test_entry_matches_its_file_card_and_log(name: str):
    entry = flaxres.pretrained_cfg(name)
    assert hashlib.sha256(entry.file.read_bytes()).hexdigest() == entry.sha256
    assert round(logged_final(name)["test_acc"], 4) == entry.top1
    assert f"**{entry.top1:.2%}**" in entry.card.read_text()
    with safe_open(entry.file, "np") as f:  # weights only, under PyTorch's names: no optimizer
        assert f.metadata()["arch"] == entry.arch
        want = state_dict_arrays(flaxres.create_model(entry.arch))
        assert sorted(f.keys()) == sorted(want)


@by_name
def test_shipped_weights_load_and_predict(name: str):
    model = flaxres.create_model(name, pretrained=True)
    arch = flaxres.pretrained_cfg(name).arch
    # He et al.'s count for the depth (Table 6), so a set cannot load as another depth.
    assert flaxres.count_params(model) == CIFAR_COUNTS[arch]
    model.eval()
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    logits = model(jnp.asarray(x))
    assert logits.shape == (16, 10) and bool(jnp.isfinite(logits).all())


def test_a_corrupted_set_fails_its_sha256(tmp_path, monkeypatch):
    entry = flaxres.pretrained_cfg("resnet20.cifar10_jpeg_cos30")
    bad = tmp_path / entry.name / "model.safetensors"
    bad.parent.mkdir()
    data = bytearray(entry.file.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setattr("flaxres.pretrained.ZOO", tmp_path)
    with pytest.raises(flaxres.WeightsError, match="sha256 mismatch"):
        flaxres.create_model(entry.name, pretrained=True)


def test_unknown_and_mismatched_names_are_one_clear_error():
    with pytest.raises(ValueError, match="no pretrained weights named 'resnet50'"):
        flaxres.create_model("resnet50", pretrained=True)
    with pytest.raises(ValueError, match="resnet20 has: resnet20.cifar10_jpeg_cos90"):
        flaxres.create_model("resnet20.imagenet", pretrained=True)
    with pytest.raises(flaxres.WeightsError, match="a resnet20's, not a resnet32's"):
        flaxres.create_model("resnet32", pretrained="resnet20.cifar10_jpeg_cos30")


@pytest.mark.full
@pytest.mark.skipif(not SHARED.exists(), reason=f"needs the JPEG CIFAR-10 copy at {SHARED}")
@by_name
def test_eval_only_reproduces_the_logged_accuracy(name: str, tmp_path, capsys):
    cifar.main(["--eval-only", "--checkpoint", name, "--data-dir", str(SHARED),
                "--cache-dir", str(tmp_path)])
    acc = float(re.search(r"test loss \S+ acc ([\d.]+)%", capsys.readouterr().out).group(1))
    # Trained with oneDNN convolutions, evaluated with XLA's: rounding may flip a near-tie image.
    assert abs(acc / 100 - logged_final(name)["test_acc"]) <= 2e-4, acc
