"""Named weight sets, as timm's ``default_cfgs`` and torchvision's ``WeightsEnum``:
``list_pretrained()``, ``pretrained_cfg(name)`` and ``create_model(name, pretrained=True)``.

A name is ``<arch>.<tag>``. Each set ships in ``flaxres/zoo/<name>/`` as ``model.safetensors``
(weights and BatchNorm statistics under PyTorch's names and layouts, so PyTorch loads it too)
beside its model card ``README.md``; the entry here records how it was made and what it scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flaxres.registry import CIFAR_MEAN, CIFAR_STD

ZOO = Path(__file__).resolve().parent / "zoo"
CIFAR_EVAL = ("32x32 RGB, ToTensor (0..1) then Normalize(mean, std) per channel; no resize "
              "or crop")
_JPEG_DATA = "CIFAR-10, the JPEG re-encode (quality 75, 4:2:0): 50,000 train / 10,000 test"


@dataclass(frozen=True)
class PretrainedCfg:
    """One weight set: where it is, how it was trained, what it scores and what it expects."""

    arch: str
    tag: str
    sha256: str
    recipe: str  # the command that trained it
    dataset: str
    top1: float  # test-set accuracy the training run logged at its last epoch
    num_classes: int = 10
    input_size: int = 32
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    preprocessing: str = CIFAR_EVAL

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def file(self) -> Path:
        return ZOO / self.name / "model.safetensors"

    @property
    def card(self) -> Path:
        return ZOO / self.name / "README.md"


def _cifar10_jpeg(arch: str, schedule: str, sha256: str, top1: float) -> PretrainedCfg:
    """A set that ``train.cifar`` trained on the JPEG copy: ``schedule`` "cos<epochs>" (cosine,
    weight decay 5e-4) or "64k" (He et al.'s recipe, the trainer's defaults)."""
    length = ("--steps 64000" if schedule == "64k" else
              f"--epochs {schedule.removeprefix('cos')} --schedule cosine --weight-decay 5e-4")
    recipe = f"python -m train.cifar --arch {arch} --data-dir cifar10-jpeg.tar.gz {length} --seed 0"
    return PretrainedCfg(arch, f"cifar10_jpeg_{schedule}", sha256, recipe, _JPEG_DATA, top1)


_SETS = (  # an architecture's first set is what create_model(arch, pretrained=True) loads
    _cifar10_jpeg("resnet20", "cos90",
                  "b8132a865efe9afd28ecd16f6eb26af9c2da15f31bb0e5063fd8b98e6b03ae4e", 0.8828),
    _cifar10_jpeg("resnet20", "64k",
                  "93c14e55e988a6f8869dbce7b94314bd08d2d800fb81a40a4b2aa450637a9f42", 0.8774),
    _cifar10_jpeg("resnet20", "cos30",
                  "c1d2fed9791626e512cdc81f4f474f4e966781b44b77ea9b312a1feaf4c318c9", 0.8691),
    _cifar10_jpeg("resnet32", "cos30",
                  "a8f334bdd12e6bd0a28d38fd7841ad7827f0ec09a6c6d281b58904135065d0ce", 0.8801),
    _cifar10_jpeg("resnet44", "cos30",
                  "bcfde07e77fca0f66304a4e3633b05fe2205e6890e8cb13571dbdbd2f5f8a16c", 0.8821),
    _cifar10_jpeg("resnet56", "cos30",
                  "8adea9e9b51b4d944b44afd2d2503a853dc883c509d750afe8918dcb136f1e23", 0.8776),
)
_BY_NAME = {s.name: s for s in _SETS}


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Names of the shipped weight sets, optionally filtered by a regular expression."""
    return [s.name for s in _SETS if pattern is None or re.search(pattern, s.name)]


def pretrained_cfg(name: str) -> PretrainedCfg:
    """The entry of ``"<arch>.<tag>"``, or of an architecture's first set for ``"<arch>"``."""
    entry = _BY_NAME.get(name) or next((s for s in _SETS if s.arch == name), None)
    if entry is None:
        arch = name.partition(".")[0]
        own = list_pretrained(f"^{re.escape(arch)}\\.")
        raise ValueError(f"no pretrained weights named {name!r}; "
                         + (f"{arch} has: {', '.join(own)}" if own else
                            f"flaxres.list_pretrained() lists all {len(_SETS)}"))
    return entry
