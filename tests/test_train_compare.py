"""train.compare_torch: the PyTorch side augments exactly as train.data.augment does."""

import numpy as np
import pytest
from test_data import _crops

torch = pytest.importorskip("torch")


def test_torch_augment_is_pad_crop_flip():
    from train.compare_torch import torch_augment

    imgs = np.random.default_rng(0).integers(1, 256, (400, 32, 32, 3), dtype=np.uint8)
    out = torch_augment(torch.from_numpy(imgs), torch.Generator().manual_seed(0)).numpy()
    assert out.dtype == np.uint8 and out.shape == imgs.shape
    for k in range(30):
        assert sum(np.array_equal(c, out[k]) for c in _crops(imgs[k])) == 1
    zeros = (out == 0).all(-1)
    assert set(zeros[:, :, 16].argmin(1).tolist()) == set(range(5))  # every vertical offset
    flipped = [any(np.array_equal(c, out[k]) for c in _crops(imgs[k])[1::2]) for k in range(100)]
    assert 0.3 < np.mean(flipped) < 0.7
