"""One registry of named architectures, each with its defaults (classes, input size,
normalisation): ``create_model(name)``, ``list_models()`` and ``default_cfg(name)``, as in timm;
named weights are :mod:`flaxres.pretrained`'s."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from flaxres.models import BasicBlock, Bottleneck, ResNet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the popular seeds' normalisation (kuangliu / akamaster)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchCfg:
    """What an architecture expects by default (timm's ``default_cfg``): its head's classes, its
    square input size, and the per-channel RGB mean and std on the 0..1 scale."""

    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_CFG = ArchCfg(10, 32, CIFAR_MEAN, CIFAR_STD)
IMAGENET_CFG = ArchCfg(1000, 224, IMAGENET_MEAN, IMAGENET_STD)

_REGISTRY: dict[str, Callable[..., ResNet]] = {}
_CFGS: dict[str, ArchCfg] = {}

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                   152: (3, 8, 36, 3)}


def register(name: str, builder: Callable[..., ResNet], cfg: ArchCfg | None = None,
             **defaults: Any) -> None:
    """Registers ``builder(**defaults)`` as ``name``; ``cfg`` defaults to ImageNet's for an
    ImageNet stem, else CIFAR's."""
    _REGISTRY[name] = functools.partial(builder, **defaults)
    _CFGS[name] = cfg or (IMAGENET_CFG if defaults.get("stem") == "imagenet" else CIFAR_CFG)


def cifar_blocks_per_stage(depth: int, bottleneck: bool = False) -> int:
    """Blocks per stage ``n`` of a CIFAR ResNet of ``depth`` = 6n+2 (9n+2 with bottlenecks):
    the one place that rule lives, for flaxres, the PyTorch reference and the CLIs."""
    per_block = 9 if bottleneck else 6
    if depth < per_block + 2 or (depth - 2) % per_block:
        kind = ("Bottleneck: 9n+2, e.g. 11, 29, 56, 164" if bottleneck
                else "BasicBlock: 6n+2, e.g. 8, 20, 56, 110")
        raise ValueError(f"a CIFAR ResNet of depth {depth} does not exist ({kind})")
    return (depth - 2) // per_block


def cifar_resnet(depth: int, *, bottleneck: bool = False, **kwargs: Any) -> ResNet:
    """He et al. 2016's CIFAR ResNet: 3 stages of 16-32-64 planes, depth 6n+2 (or 9n+2 bottleneck).

    BasicBlock nets use the paper's option A shortcut by default (as akamaster's reference);
    bottleneck nets use projections (option B) since their first block changes 16 -> 64 channels.
    """
    n = cifar_blocks_per_stage(depth, bottleneck)
    kwargs.setdefault("shortcut", "B" if bottleneck else "A")
    block = Bottleneck if bottleneck else BasicBlock
    return ResNet(block, (n, n, n), CIFAR_WIDTHS, stem="cifar", stem_width=16, **kwargs)


def imagenet_resnet(depth: int, *, stem: str = "imagenet", **kwargs: Any) -> ResNet:
    """torchvision's ResNet-18..152 (option B shortcuts); ``stem="cifar"`` gives the popular CIFAR
    variant (3x3 stride-1 stem, no max-pool, 64-128-256-512 widths) of kuangliu/pytorch-cifar."""
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"ImageNet-layout ResNet depth {depth} does not exist; "
                         f"choose one of {sorted(IMAGENET_LAYERS)}")
    block = BasicBlock if depth < 50 else Bottleneck
    kwargs.setdefault("shortcut", "B")
    return ResNet(block, IMAGENET_LAYERS[depth], IMAGENET_WIDTHS, stem=stem, stem_width=64,
                  **kwargs)


def resnext(layers: tuple[int, ...], groups: int, width_per_group: int, *, stem: str = "imagenet",
            **kwargs: Any) -> ResNet:
    """ResNeXt = Bottleneck with grouped 3x3 convs. The CIFAR form (ResNeXt-29 of Xie et al.) has
    a 3x3 64-channel stem, three stages of 64-128-256 planes (256-512-1024 outputs)."""
    widths = IMAGENET_WIDTHS[: len(layers)]
    kwargs.setdefault("shortcut", "B")
    return ResNet(Bottleneck, layers, widths, stem=stem, stem_width=64, groups=groups,
                  width_per_group=width_per_group, **kwargs)


def wide_resnet_cifar(depth: int, widen: int, **kwargs: Any) -> ResNet:
    """Zagoruyko & Komodakis 2016's WRN-depth-widen for CIFAR: depth 6n+4, pre-activation
    BasicBlocks of 16k-32k-64k planes after a 16-channel stem, projections where the shape
    changes, the final BN-ReLU; ``dropout=`` between each block's convs (0.3 in the paper's
    best CIFAR runs, 0 by default)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a Wide ResNet of depth {depth} does not exist (6n+4: 10, 16, 22, 28, "
                         "40, ...)")
    n = (depth - 4) // 6
    widths = tuple(w * widen for w in CIFAR_WIDTHS)
    return ResNet(BasicBlock, (n, n, n), widths, stem="cifar", stem_width=16, shortcut="B",
                  preact=True, head_norm=True, **kwargs)


for _d in (20, 32, 44, 56, 110, 1202):
    register(f"resnet{_d}", cifar_resnet, depth=_d)
for _d in (20, 32, 44, 56, 110):
    register(f"plain{_d}", cifar_resnet, depth=_d, shortcut=None)
register("resnet164", cifar_resnet, depth=164, bottleneck=True)
for _d in IMAGENET_LAYERS:
    register(f"resnet{_d}", imagenet_resnet, depth=_d, stem="imagenet")
    register(f"resnet{_d}_cifar", imagenet_resnet, depth=_d, stem="cifar")
register("resnext50_32x4d", resnext, layers=(3, 4, 6, 3), groups=32, width_per_group=4,
         stem="imagenet")
register("resnext101_32x8d", resnext, layers=(3, 4, 23, 3), groups=32, width_per_group=8,
         stem="imagenet")
register("wide_resnet50_2", imagenet_resnet, depth=50, width_per_group=128, stem="imagenet")
register("wide_resnet101_2", imagenet_resnet, depth=101, width_per_group=128, stem="imagenet")
register("resnext101_64x4d", resnext, layers=(3, 4, 23, 3), groups=64, width_per_group=4,
         stem="imagenet")
# Pre-activation: kuangliu's PreActResNet18 (no final BN), He et al. 2016b's CIFAR nets (with it).
register("preact_resnet18", imagenet_resnet, depth=18, stem="cifar", preact=True)
register("preact_resnet110", cifar_resnet, depth=110, shortcut="B", preact=True, head_norm=True)
register("preact_resnet164", cifar_resnet, depth=164, bottleneck=True, preact=True,
         head_norm=True)
for _d, _k in ((28, 10), (16, 8), (40, 4)):
    register(f"wrn{_d}_{_k}", wide_resnet_cifar, depth=_d, widen=_k)
register("resnext29_8x64d", resnext, layers=(3, 3, 3), groups=8, width_per_group=64, stem="cifar")
register("resnext29_16x64d", resnext, layers=(3, 3, 3), groups=16, width_per_group=64,
         stem="cifar")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, optionally filtered by a regular expression (``list_models("resnext")``)."""
    names = sorted(_REGISTRY, key=_natural_key)
    return [n for n in names if pattern is None or re.search(pattern, n)]


def model_stem(name: str) -> str:
    """``"imagenet"`` or ``"cifar"``: which input size the architecture was designed for."""
    return _builder(name).keywords.get("stem", "cifar")


def default_cfg(name: str) -> ArchCfg:
    """The defaults of a registered architecture (``"resnet50"``: 1000 classes at 224 px)."""
    _builder(name)
    return _CFGS[name]


def _builder(name: str) -> functools.partial:
    if name not in _REGISTRY:
        raise _unknown_name_error(name)
    return _REGISTRY[name]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _unknown_name_error(name: str) -> ValueError:
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if m:
        depth = int(m.group(2))
        return ValueError(
            f"unknown model {name!r}: depth {depth} is not available. CIFAR ResNets have depth "
            "6n+2 with BasicBlocks (8, 14, 20, 26, 32, ...) or 9n+2 with Bottlenecks (11, 20, 29, "
            "..., 164); ImageNet-layout ResNets have depth 18, 34, 50, 101 or 152. Registered: "
            f"{', '.join(list_models('^' + m.group(1)))}. Build another valid CIFAR depth with "
            f"flaxres.cifar_resnet({depth}, bottleneck=...).")
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} flaxres.list_models() lists all "
                      f"{len(_REGISTRY)} names.")


def create_model(name: str, *, pretrained: bool | str | os.PathLike | None = None,
                 num_classes: int | None = None, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, sha256: str | None = None,
                 **overrides: Any) -> ResNet:
    """Builds a registered architecture, with fresh PyTorch-style initial weights or pretrained.

    ``name`` is an architecture (``"resnet20"``) or a named weight set (``"resnet20.cifar10_jpeg_cos90"``,
    see :func:`flaxres.list_pretrained`). ``pretrained=True`` loads that set (an architecture's
    first set when no tag is given), checked against its sha256. ``pretrained`` may instead be a
    PyTorch file (torchvision/timm, akamaster, kuangliu or hand-written layouts), a
    ``.safetensors`` file, an Orbax directory (a training workdir) or an ``https://`` / ``file://``
    URL, downloaded once into ``cache_dir`` and checked against ``sha256`` if given (see
    :mod:`flaxres.weights`). ``num_classes`` defaults to the weights' head, or without weights to
    the architecture's (:func:`default_cfg`); another value keeps a fresh head, for fine-tuning.
    ``overrides`` go to :class:`flaxres.models.ResNet`, e.g. ``shortcut="B"``, ``norm=False``,
    ``dtype=jnp.bfloat16``.
    """
    arch, _, tag = name.partition(".")
    builder = _builder(arch)
    if pretrained is True or tag:
        from flaxres.pretrained import pretrained_cfg

        entry = pretrained_cfg(name)  # an unknown tag fails here, with or without weights
        pretrained = entry.name if pretrained is True else pretrained
    pretrained = pretrained or None

    def build(classes: int) -> ResNet:
        return builder(num_classes=classes, rngs=nnx.Rngs(seed), **overrides)

    if pretrained is None:
        return build(num_classes or default_cfg(arch).num_classes)
    from flaxres.weights import load_pretrained

    return load_pretrained(build, pretrained, num_classes=num_classes, arch=arch,
                           cache_dir=cache_dir, sha256=sha256)


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (BatchNorm running statistics excluded, as PyTorch's numel count)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
