"""Fine-tuning in train.cifar: initial weights from a checkpoint (``--init-from``) and a frozen
backbone (``--freeze-backbone``), the two steps of the usual transfer-learning recipe."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from flaxres.weights import load_pretrained
from train.config import Config


def initial_model(cfg: Config, build_model: Callable[[Config], nnx.Module]) -> nnx.Module:
    """``build_model(cfg)``, loaded from ``cfg.init_from`` when given (any source
    ``flaxres.create_model(pretrained=...)`` reads). A head for other classes than the dataset's
    is replaced by a fresh one, and a warning says so."""
    if cfg.init_from is None:
        return build_model(cfg)
    # load_pretrained asks for the dataset's classes only: either the file's head has them, or
    # the head is fresh for them.
    return load_pretrained(lambda classes: build_model(cfg), cfg.init_from,
                           num_classes=cfg.num_classes, arch=cfg.arch)


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the classifier head (``fc``); every other parameter gets a zero update (no
    momentum, no weight decay), as ``requires_grad_(False)`` on a PyTorch backbone. BatchNorm
    running statistics still follow the new data in train mode, as in that PyTorch recipe."""
    return optax.multi_transform({"head": tx, "backbone": optax.set_to_zero()}, _labels)


def _labels(params: nnx.State) -> nnx.State:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "head" if _name(path[0]) == "fc" else "backbone", params)


def _name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))
