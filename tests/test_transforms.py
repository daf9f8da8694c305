"""The ImageNet transforms against torchvision's: evaluation pixels on real JPEGs of odd sizes,
``RandomResizedCrop``'s crop boxes in distribution (area fraction and log aspect ratio, over a
fixed grid of random states) and its pixels for a given box, and the flip."""

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

from train import transforms

SIZES = [(500, 375), (375, 500), (257, 301), (640, 427), (224, 225), (1000, 120)]
DRAWS = 2000


def jpeg(width: int, height: int, seed: int = 0) -> Image.Image:
    """A real JPEG, decoded: smooth gradients plus noise, as photographs are."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("size", [224, 32])
def test_eval_transform_equals_torchvisions(width, height, size):
    img = jpeg(width, height)
    want = np.asarray(T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size)])(img))
    got = transforms.eval_transform(img, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def _box_stats(boxes, width, height) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, log aspect ratio) of (top, left, h, w) boxes, each checked to fit."""
    b = np.asarray(boxes)
    top, left, h, w = b.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all()
    assert (left + w <= width).all() and (h > 0).all() and (w > 0).all()
    return h * w / (width * height), np.log(w / h)


@pytest.mark.parametrize("width, height", SIZES)
def test_random_resized_crop_boxes_are_torchvisions_in_distribution(width, height):
    """Ours over numpy seeds 0..N-1, torchvision's ``get_params`` over torch seeds 0..N-1: the
    area fractions and log aspect ratios are one distribution (two-sample KS), fallbacks to the
    centre crop included (the 1000x120 image needs them often)."""
    ours = [transforms.random_resized_crop_box(np.random.default_rng(s), width, height)
            for s in range(DRAWS)]
    img = Image.new("RGB", (width, height))
    theirs = []
    for s in range(DRAWS):
        torch.manual_seed(s)
        theirs.append(T.RandomResizedCrop.get_params(img, transforms.SCALE,
                                                     list(transforms.RATIO)))
    for a, b in zip(_box_stats(ours, width, height), _box_stats(theirs, width, height)):
        assert stats.ks_2samp(a, b).pvalue > 1e-3
    if width / height <= 4 / 3:  # the ten tries usually succeed: the area is uniform in scale
        area, log_ratio = _box_stats(ours, width, height)
        assert 0.08 - 0.01 <= area.min() and area.max() <= 1
        assert -math.log(4 / 3) - 0.02 <= log_ratio.min() <= log_ratio.max() <= math.log(4 / 3) + 0.02


def test_the_train_transform_is_torchvisions_resized_crop_and_flip():
    img = jpeg(500, 375, seed=1)
    flips = 0
    for s in range(40):
        top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(s), 500, 375)
        want = np.asarray(TF.resized_crop(img, top, left, h, w, [224, 224],
                                          T.InterpolationMode.BILINEAR))
        got = transforms.train_transform(img, 224, np.random.default_rng(s))
        flipped = not np.array_equal(got, want)
        if flipped:
            np.testing.assert_array_equal(got, want[:, ::-1])
        flips += flipped
    assert 10 <= flips <= 30  # p = 0.5 over 40 draws


def test_the_cifar_transform_is_torchvisions_padded_random_crop_and_flip():
    """Every output is one of the 81 x 2 crops of the black-padded image, as
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` make them, drawn uniformly."""
    img = jpeg(32, 32)
    padded = TF.pad(img, 4)
    candidates = {(top, left, flip): np.asarray(TF.hflip(c) if flip else c)
                  for top in range(9) for left in range(9) for flip in (False, True)
                  for c in [TF.crop(padded, top, left, 32, 32)]}
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(1000):
        out = transforms.cifar_train_transform(img, 32, rng)
        seen += [k for k, c in candidates.items() if np.array_equal(out, c)][:1]
    assert len(seen) == 1000  # each output is one of the candidates
    tops, lefts, flips = (np.array(v) for v in zip(*seen))
    for offsets in (tops, lefts):
        assert stats.chisquare(np.bincount(offsets, minlength=9)).pvalue > 1e-3
    assert 0.45 < flips.mean() < 0.55
    np.testing.assert_array_equal(transforms.cifar_eval_transform(img, 32), np.asarray(img))
    with pytest.raises(ValueError, match="a 32x32 image: --transforms cifar needs 24x24"):
        transforms.cifar_eval_transform(img, 24)
