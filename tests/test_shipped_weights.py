"""The trained weights in ``weights/``: they load through ``create_model(pretrained=...)``, and
where the project's JPEG CIFAR-10 copy is present, ``--eval-only`` reproduces the test accuracy
their training run logged (the number in the README's results table)."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import flaxres
from tests.test_models import CIFAR_COUNTS
from train import cifar

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(d for d in (ROOT / "weights").iterdir() if (d / "metrics.jsonl").exists())
SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
by_name = pytest.mark.parametrize("folder", SHIPPED, ids=[d.name for d in SHIPPED])


def arch_of(folder: Path) -> str:
    """The architecture a folder holds, from its name (``resnet32-cifar10-jpeg``)."""
    return folder.name.split("-")[0]


def logged_final(folder: Path) -> dict:
    """The last epoch's line of the run's metrics.jsonl."""
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_shipped_runs_are_found():  # an empty parametrisation would pass silently
    assert "resnet20-cifar10-jpeg" in {d.name for d in SHIPPED}


@by_name
def test_shipped_weights_load_and_predict(folder: Path):
    model = flaxres.create_model(arch_of(folder), pretrained=folder)
    # He et al.'s count for the depth (Table 6), so a folder cannot load as another depth.
    assert flaxres.count_params(model) == CIFAR_COUNTS[arch_of(folder)]
    model.eval()
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    logits = model(jnp.asarray(x))
    assert logits.shape == (16, 10) and bool(jnp.isfinite(logits).all())


@pytest.mark.full
@pytest.mark.skipif(not SHARED.exists(), reason=f"needs the JPEG CIFAR-10 copy at {SHARED}")
@by_name
def test_eval_only_reproduces_the_logged_accuracy(folder: Path, tmp_path, capsys):
    cifar.main(["--eval-only", "--checkpoint", str(folder), "--data-dir", str(SHARED),
                "--cache-dir", str(tmp_path)])
    acc = float(re.search(r"test loss \S+ acc ([\d.]+)%", capsys.readouterr().out).group(1))
    # Trained with oneDNN convolutions, evaluated with XLA's: rounding may flip a near-tie image.
    assert abs(acc / 100 - logged_final(folder)["test_acc"]) <= 2e-4, acc
