"""``python -m flaxres.predict``: ImageNet top-k classes of images, as torchvision would give them.

    python -m flaxres.predict --arch resnext50_32x4d --weights resnext50_32x4d-7cdf4587.pth cat.jpg
    python -m flaxres.predict --arch resnet50 --weights https://download.pytorch.org/models/resnet50-0676ba61.pth dog.png

``--weights`` is anything ``flaxres.create_model(pretrained=...)`` reads (a torchvision ``.pth``,
``.safetensors``, an Orbax directory or a URL, cached once). Preprocessing is torchvision's ImageNet
evaluation transform: resize the shorter side to 256 (bilinear, antialiased as PIL does), center
crop 224, ImageNet mean/std.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

import jax
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

import flaxres
from flaxres.convert import WeightsError
from flaxres.registry import IMAGENET_MEAN, IMAGENET_STD

_BATCH = 16


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (shipped with the package)."""
    return resources.files("flaxres").joinpath("imagenet_classes.txt").read_text().splitlines()


def imagenet_archs() -> list[str]:
    return [n for n in flaxres.list_models() if flaxres.model_stem(n) == "imagenet"]


def resize_center_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> Image.Image:
    """torchvision's ``Resize(resize), CenterCrop(crop)`` on a PIL image, as an RGB image: the
    same PIL calls and rounding torchvision makes (shorter side to ``resize``, bilinear with
    PIL's antialiasing; the crop's offsets rounded as ``CenterCrop`` rounds them)."""
    img = image.convert("RGB")
    w, h = img.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = round((h - crop) / 2.0), round((w - crop) / 2.0)
    return img.crop((left, top, left + crop, top + crop))


def preprocess(image: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """torchvision's ``Resize(256), CenterCrop(224), ToTensor(), Normalize(mean, std)`` on a PIL
    image, as an HWC float32 array."""
    x = np.asarray(resize_center_crop(image, resize, crop), np.float32) / 255.0
    return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def load_images(paths: list[str]) -> np.ndarray:
    """Preprocessed NHWC batch; an unreadable file is a ValueError naming it."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(preprocess(img))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{p}: not a readable image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'empty'})") from e
    return np.stack(out)


@nnx.jit
def _probabilities(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jax.nn.softmax(model(x))


def predict(arch: str, weights: str, images: list[str], *, top_k: int = 5,
            cache_dir: str | None = None, sha256: str | None = None
            ) -> list[list[tuple[str, float]]]:
    """Top-``top_k`` (class name, probability) per image."""
    batch = load_images(images)  # before the weights: a bad image fails at once
    model = flaxres.create_model(arch, pretrained=weights, cache_dir=cache_dir, sha256=sha256)
    classes = imagenet_classes()
    if model.fc.kernel.shape[-1] != len(classes):
        raise WeightsError(f"{weights}: the weights have {model.fc.kernel.shape[-1]} classes, "
                           f"not ImageNet's {len(classes)}")
    model.eval()
    probs = np.concatenate([np.asarray(_probabilities(model, batch[i:i + _BATCH]))
                            for i in range(0, len(batch), _BATCH)])
    return [[(classes[c], float(pr[c])) for c in np.argsort(-pr)[:top_k]] for pr in probs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flaxres.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=imagenet_archs(),
                   help="a torchvision-layout architecture")
    p.add_argument("--weights", required=True,
                   help="PyTorch .pth/.pt, .safetensors, Orbax directory or https:// / file:// URL")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--cache-dir", default=None,
                   help="where URLs are downloaded (default: ~/.cache/flaxres/weights)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the weights file")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    try:
        results = predict(args.arch, args.weights, args.images, top_k=args.top_k,
                          cache_dir=args.cache_dir, sha256=args.sha256)
    except ValueError as e:  # WeightsError, unreadable images
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for path, top in zip(args.images, results):
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<30} {prob:7.2%}")


if __name__ == "__main__":
    main()
