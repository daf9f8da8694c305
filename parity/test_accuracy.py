"""parity.accuracy: the PyTorch side augments exactly as train.data.augment does."""

import itertools

import numpy as np
import torch

from parity.accuracy import torch_augment


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
