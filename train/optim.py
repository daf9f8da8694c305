"""Learning-rate schedules and the SGD optimizer, with PyTorch's semantics made explicit.

Every schedule is a per-iteration optax schedule (``count`` = optimizer steps taken so far, 0 for
the first update). PyTorch's ``MultiStepLR`` steps once per *epoch*, so its epoch milestones map
to iteration boundaries ``milestone * steps_per_epoch``; the paper's schedule is per iteration.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import optax

PAPER_BOUNDARIES = (32_000, 48_000)  # He et al. 2016, CIFAR-10: lr / 10 at 32k and 48k iterations
PAPER_TOTAL_STEPS = 64_000
PAPER_WARMUP_STEPS = 400  # lr 0.01 until training error < 80% (~400 iterations) for ResNet-110/1202
WARMUP_ARCHS = ("resnet110", "resnet1202")


def warmup_schedule(base_lr: float, steps: int, method: str = "constant",
                    factor: float = 0.1) -> optax.Schedule:
    """The first ``steps`` iterations' lr: ``factor * base_lr`` throughout ('constant', the paper's
    0.01 for lr 0.1), or rising linearly from ``factor * base_lr`` towards ``base_lr`` ('linear':
    torchvision's ``LinearLR(start_factor=factor, total_iters=steps)`` stepped per iteration)."""
    if method == "linear":
        return optax.linear_schedule(factor * base_lr, base_lr, steps)
    return optax.constant_schedule(factor * base_lr)


def multistep_schedule(base_lr: float, boundaries: Sequence[int], gamma: float = 0.1,
                       warmup_steps: int = 0, warmup_method: str = "constant",
                       warmup_factor: float = 0.1) -> optax.Schedule:
    """lr = base_lr * gamma ** (number of boundaries <= count), after an optional warm-up
    (:func:`warmup_schedule`). The boundaries count from the first iteration, warm-up included."""
    main = optax.piecewise_constant_schedule(base_lr, _scales(boundaries, gamma))
    if not warmup_steps:
        return main
    warm = warmup_schedule(base_lr, warmup_steps, warmup_method, warmup_factor)
    # join_schedules feeds the second schedule (count - warmup_steps): keep boundaries absolute.
    shifted = optax.piecewise_constant_schedule(base_lr, _scales(boundaries, gamma, warmup_steps))
    return optax.join_schedules([warm, shifted], [warmup_steps])


def _scales(boundaries: Sequence[int], gamma: float, shift: int = 0) -> dict[int, float]:
    """A boundary listed k times scales by gamma ** k, as MultiStepLR's repeated milestones do."""
    scales: dict[int, float] = {}
    for b in boundaries:
        scales[int(b) - shift] = scales.get(int(b) - shift, 1.0) * gamma
    return scales


def epoch_milestones_to_steps(milestones: Sequence[int], steps_per_epoch: int) -> list[int]:
    """PyTorch ``MultiStepLR(milestones)`` stepped once per epoch, as iteration boundaries."""
    return [int(m) * steps_per_epoch for m in milestones]


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0,
                    warmup_method: str = "constant", warmup_factor: float = 0.1) -> optax.Schedule:
    """Per-iteration cosine decay to 0 (PyTorch's per-epoch CosineAnnealingLR is a staircase of it),
    over the iterations after an optional warm-up (:func:`warmup_schedule`), as torchvision's
    ``SequentialLR([warm-up, CosineAnnealingLR(T_max=total - warm-up)])``."""
    if not warmup_steps:
        return optax.cosine_decay_schedule(base_lr, total_steps)
    return optax.join_schedules(
        [warmup_schedule(base_lr, warmup_steps, warmup_method, warmup_factor),
         optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1))],
        [warmup_steps])


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = False, norm_weight_decay: float | None = None,
        bias_weight_decay: float | None = None) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` in optax.

    PyTorch adds ``weight_decay * p`` to the gradient *before* momentum, keeps
    ``buf = momentum * buf + g`` (buf = g at the first step, i.e. a zero-initialised trace) and
    steps ``p -= lr * buf`` (nesterov: ``p -= lr * (g + momentum * buf)``): exactly
    ``add_decayed_weights`` followed by ``optax.sgd``'s trace. Decay applies to every parameter,
    BatchNorm and biases included, as in the paper's and the seeds' code, unless
    ``norm_weight_decay`` or ``bias_weight_decay`` give those groups their own
    (:func:`decay_groups`).
    """
    rates = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    if norm_weight_decay is None and bias_weight_decay is None:
        decay = [optax.add_decayed_weights(weight_decay)]
    else:
        decay = [optax.add_decayed_weights(rate, mask=functools.partial(
                     _in_group, group, norm=norm_weight_decay is not None,
                     bias=bias_weight_decay is not None))
                 for group, rate in rates.items() if rate]
    step = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
    return optax.chain(*decay, step)


def decay_groups(params: Any, *, norm: bool, bias: bool) -> Any:
    """Each parameter's weight-decay group, as torchvision's ``set_weight_decay`` forms them:
    with ``bias``, every parameter named ``bias`` (BatchNorm's too) is in 'bias'; else, with
    ``norm``, the parameters of BatchNorm layers (the modules that hold a ``scale``: no other flax
    layer of these nets has one) are in 'norm'; everything else is in 'other'."""
    names = [_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    norm_layers = {n[:-1] for n in names if n[-1] == "scale"}

    def group(path, _):
        n = _names(path)
        if bias and n[-1] == "bias":
            return "bias"
        return "norm" if norm and n[:-1] in norm_layers else "other"

    return jax.tree_util.tree_map_with_path(group, params)


def _names(path: tuple) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _in_group(group: str, params: Any, *, norm: bool, bias: bool) -> Any:
    return jax.tree.map(lambda g: g == group, decay_groups(params, norm=norm, bias=bias))
