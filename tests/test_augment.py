"""The trainer's on-device CIFAR augmentation against torchvision's ``RandomCrop(32, padding=4)``
+ ``RandomHorizontalFlip()``: the same function (each output is one pad/crop/flip of its input,
padding is zeros), the same distribution (every offset 0..8 on each axis uniformly, flips with
p = 0.5), and fresh draws for every step, epoch and device, replayed exactly after a resume.

Each test image encodes its pixel's row and column, so the crop offsets and the flip can be read
back from any output.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from flaxres import checkpoint
from train import data, steps

ROOT = Path(__file__).resolve().parents[1]
N = 4000  # images per distribution: 444 per offset bin, 2000 per flip outcome
P_MIN = 1e-4  # a fixed seed; a real bias gives p far below this, seed noise rarely does


def coded_image() -> np.ndarray:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 200: no pixel is zero."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], -1).astype(np.uint8)


def read_back(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row offsets, column offsets, flips) of outputs of :func:`coded_image`, each checked to be
    exactly that pad/crop/flip: the image where it lands, zeros elsewhere."""
    centre = out[:, 16, 16].astype(int)  # inside the image for every offset
    flip = out[:, 16, 17, 1].astype(int) < centre[:, 1]
    oy = centre[:, 0] - 1 - 12
    ox = np.where(flip, centre[:, 1] - 12, centre[:, 1] - 13)
    padded = np.pad(coded_image(), ((4, 4), (4, 4), (0, 0)))
    for img, y, x, f in zip(out, oy, ox, flip):
        want = padded[y:y + 32, x:x + 32]
        np.testing.assert_array_equal(img, want[:, ::-1] if f else want)
    return oy, ox, flip


def assert_torchvision_distribution(oy, ox, flip) -> None:
    for offsets in (oy, ox):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9, counts  # offsets 0..8, no other
        assert stats.chisquare(counts).pvalue > P_MIN, counts
    assert stats.binomtest(int(flip.sum()), len(flip), 0.5).pvalue > P_MIN, flip.mean()


@pytest.fixture(scope="module")
def torchvision_draws():
    torch = pytest.importorskip("torch")
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(0)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    img = Image.fromarray(coded_image())
    return read_back(np.stack([np.asarray(tf(img)) for _ in range(N)]))


def test_torchvision_draws_every_offset_uniformly_and_flips_half(torchvision_draws):
    """The reference itself, read back the same way: the yardstick of the next test."""
    assert_torchvision_distribution(*torchvision_draws)


def test_flaxres_augmentation_draws_as_torchvision_does(torchvision_draws):
    images = jnp.asarray(np.broadcast_to(coded_image(), (N, 32, 32, 3)))
    oy, ox, flip = read_back(np.asarray(jax.jit(data.augment)(jax.random.PRNGKey(0), images)))
    assert_torchvision_distribution(oy, ox, flip)
    for ours, theirs in zip((oy, ox), torchvision_draws[:2]):  # one distribution, not two
        table = [np.bincount(ours, minlength=9), np.bincount(theirs, minlength=9)]
        assert stats.chi2_contingency(table).pvalue > P_MIN, table


# ----------------------------------------------------------------------------- through the step

BATCH = 64


def _state(step: int, seed: int = 0) -> steps.TrainState:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    return steps.TrainState({}, {}, (), jnp.int32(step), key)


def _batch(state: steps.TrainState, mesh=None) -> np.ndarray:
    """The trainer's augmented batch 0 of identical coded images."""
    mesh = mesh or steps.make_mesh()
    images = jnp.asarray(np.broadcast_to(coded_image(), (BATCH, 32, 32, 3)))
    x, _ = jax.jit(lambda s, i, y: steps.train_batch(
        s, jnp.arange(BATCH), i, y, jnp.int32(0), batch_size=BATCH, augment=True,
        batch_sharding=NamedSharding(mesh, P("data"))))(state, images, jnp.zeros(BATCH, jnp.int32))
    return np.asarray(x)


def test_each_step_and_epoch_draws_new_crops_and_flips():
    spe = 390  # a later epoch is a later step: the key moves with the step count alone
    draws = [read_back(_batch(_state(step))) for step in (0, 1, spe, 2 * spe)]
    for i, a in enumerate(draws):
        for b in draws[i + 1:]:
            assert not all(np.array_equal(u, v) for u, v in zip(a, b))
    np.testing.assert_array_equal(_batch(_state(1)), _batch(_state(1)))  # and replays exactly
    assert not np.array_equal(_batch(_state(1)), _batch(_state(1, seed=1)))


def test_a_resumed_run_draws_what_the_uninterrupted_run_drew(tmp_path):
    state = _state(7)
    checkpoint.save(tmp_path, 7, {"state": state}, {})
    back = checkpoint.restore_state(tmp_path, 7, {"state": _state(0, seed=5)})["state"]
    np.testing.assert_array_equal(_batch(back), _batch(state))


_TWO_DEVICES = r"""
import sys
import numpy as np
sys.path.insert(0, ".")
from tests.test_augment import _batch, _state, read_back
from train import steps
x = _batch(_state(3), steps.make_mesh())
np.save(sys.argv[1], x)
"""


def test_two_devices_draw_different_crops_and_the_same_global_batch(tmp_path, xla_env):
    """Over two data-parallel devices each shard gets its own crops (one key draws the whole
    global batch), and the global batch is the one a single device draws."""
    env = dict(os.environ, **xla_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "x.npy")], cwd=ROOT,
                   env=env, check=True, timeout=300)
    two = np.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(two, _batch(_state(3)))
    first, second = (read_back(two[half]) for half in (slice(0, BATCH // 2),
                                                      slice(BATCH // 2, None)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))
