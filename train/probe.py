"""Turns what ``train_step(probe=True)`` and the eval logits return into the study's numbers:
gradient norms in depth order, prediction histograms, logit statistics.

Kept apart from the driver (:mod:`train.degradation`) so the measurements are plain functions of
arrays that a test can check on hand-made inputs.
"""

from __future__ import annotations

import math
import re

import numpy as np

LN10 = math.log(10.0)


def depth_key(name: str) -> tuple:
    """Sort key placing kernels in forward order: stem ``conv1``, then ``layerS.B.conv1/2/3``
    (a block's projection ``downsample`` after its convs), ``fc`` last."""
    if name == "conv1":
        return (0, 0, 0)
    if name == "fc":
        return (math.inf, 0, 0)
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv(\d+)|downsample\.0)", name)
    if m is None:
        raise ValueError(f"unexpected kernel path {name!r}")
    return (int(m.group(1)), int(m.group(2)), int(m.group(4)) if m.group(4) else 9)


def ordered_grad_norms(grad_norm: dict[str, float]) -> tuple[list[str], list[float]]:
    """The weight layers along the main path (projection shortcuts left out, since they are not
    a layer of the depth) and their gradient norms, input to output."""
    names = sorted((n for n in grad_norm if "downsample" not in n), key=depth_key)
    return names, [float(grad_norm[n]) for n in names]


def first_to_last_ratio(norms: list[float]) -> float:
    """Gradient norm of the first conv over that of the last conv before ``fc``: how much of
    the gradient reaches the input end (about 1 with a direct path, tiny when it vanishes)."""
    return norms[0] / norms[-2] if norms[-2] > 0 else math.inf


def logit_stats(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Loss, error, predicted-class histogram and how much the logits depend on the image."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = logits.argmax(axis=1)
    hist = np.bincount(pred, minlength=num_classes)
    return {
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "error": float((pred != labels).mean()),
        "pred_hist": hist.tolist(),
        "top_class_share": float(hist.max() / len(labels)),
        "mean_max_prob": float(np.exp(logp.max(axis=1)).mean()),
        "logit_spread": float(logits.std(axis=0).mean()),  # over images: ~0 = input ignored
    }


def logit_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean absolute change of the logits of the same images (in nats, as the logits are)."""
    return float(np.abs(after.astype(np.float64) - before).mean())
