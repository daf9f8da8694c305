"""torchvision's ImageNet transforms on PIL images, for the streaming input pipeline's workers:
``RandomResizedCrop`` + ``RandomHorizontalFlip`` for training, ``Resize(size / 0.875)`` +
``CenterCrop(size)`` for evaluation; and the CIFAR tutorials' ``RandomCrop(size, padding=4)`` +
flip, evaluating images as they are. All return uint8 HWC arrays; normalisation happens on the
device, as for CIFAR. The same PIL calls as torchvision's PIL path, so the pixels are the same
for the same crop box; the boxes are drawn from a numpy ``Generator`` by torchvision's algorithm.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from flaxres.predict import resize_center_crop

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_RESIZE_RATIO = 0.875  # 224 -> 256, as torchvision's reference recipe


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = SCALE,
                            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a crop, as ``RandomResizedCrop.get_params`` draws it:
    up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``, then a centre crop at the ratio clamped into ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """``RandomResizedCrop(size)`` (bilinear, antialiased as PIL resizes) and
    ``RandomHorizontalFlip()``, as uint8 (size, size, 3)."""
    img = image.convert("RGB")
    top, left, h, w = random_resized_crop_box(rng, *img.size)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


def eval_transform(image: Image.Image, size: int) -> np.ndarray:
    """``Resize(int(size / 0.875))`` + ``CenterCrop(size)``, as uint8 (size, size, 3)."""
    return np.asarray(resize_center_crop(image, int(size / EVAL_RESIZE_RATIO), size), np.uint8)


def cifar_train_transform(image: Image.Image, size: int, rng: np.random.Generator,
                          pad: int = 4) -> np.ndarray:
    """``RandomCrop(size, padding=4)`` (black padding) + ``RandomHorizontalFlip()`` of a
    size x size image: what ``train.cifar`` does on the device, here on the host."""
    x = cifar_eval_transform(image, size)
    top, left = rng.integers(0, 2 * pad + 1, 2)
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))[top:top + size, left:left + size]
    return np.ascontiguousarray(x[:, ::-1] if rng.random() < 0.5 else x)


def cifar_eval_transform(image: Image.Image, size: int) -> np.ndarray:
    """The image as it is: CIFAR's are already size x size."""
    x = np.asarray(image.convert("RGB"), np.uint8)
    if x.shape[:2] != (size, size):
        raise ValueError(f"a {x.shape[1]}x{x.shape[0]} image: --transforms cifar needs "
                         f"{size}x{size} images (--image-size)")
    return x


TRAIN = {"imagenet": train_transform, "cifar": cifar_train_transform}
EVAL = {"imagenet": eval_transform, "cifar": cifar_eval_transform}
