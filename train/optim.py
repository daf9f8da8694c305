"""Learning-rate schedules and the SGD optimizer, with PyTorch's semantics made explicit.

Every schedule is a per-iteration optax schedule (``count`` = optimizer steps taken so far, 0 for
the first update). PyTorch's ``MultiStepLR`` steps once per *epoch*, so its epoch milestones map
to iteration boundaries ``milestone * steps_per_epoch``; the paper's schedule is per iteration.
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

PAPER_BOUNDARIES = (32_000, 48_000)  # He et al. 2016, CIFAR-10: lr / 10 at 32k and 48k iterations
PAPER_TOTAL_STEPS = 64_000
PAPER_WARMUP_STEPS = 400  # lr 0.01 until training error < 80% (~400 iterations) for ResNet-110/1202
WARMUP_ARCHS = ("resnet110", "resnet1202")


def multistep_schedule(base_lr: float, boundaries: Sequence[int], gamma: float = 0.1,
                       warmup_steps: int = 0, warmup_lr: float | None = None) -> optax.Schedule:
    """lr = base_lr * gamma ** (number of boundaries <= count), after an optional constant warm-up.

    ``warmup_lr`` defaults to ``base_lr / 10`` (0.01 for the paper's 0.1).
    """
    main = optax.piecewise_constant_schedule(base_lr, _scales(boundaries, gamma))
    if not warmup_steps:
        return main
    warm = optax.constant_schedule(base_lr / 10 if warmup_lr is None else warmup_lr)
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


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Per-iteration cosine decay to 0 (PyTorch's per-epoch CosineAnnealingLR is a staircase of it)."""
    if not warmup_steps:
        return optax.cosine_decay_schedule(base_lr, total_steps)
    return optax.join_schedules(
        [optax.constant_schedule(base_lr / 10),
         optax.cosine_decay_schedule(base_lr, max(total_steps - warmup_steps, 1))],
        [warmup_steps])


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = False) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` in optax.

    PyTorch adds ``weight_decay * p`` to the gradient *before* momentum, keeps
    ``buf = momentum * buf + g`` (buf = g at the first step, i.e. a zero-initialised trace) and
    steps ``p -= lr * buf`` (nesterov: ``p -= lr * (g + momentum * buf)``): exactly
    ``add_decayed_weights`` followed by ``optax.sgd``'s trace. Decay applies to every parameter,
    BatchNorm and biases included, as in the paper's and the seeds' code.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )
