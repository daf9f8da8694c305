"""The trainer's learning-rate schedules against PyTorch's own schedulers, at every iteration.

:func:`torch_scheduler` is PyTorch's form of what a :class:`train.config.Config` describes
(``MultiStepLR``, ``CosineAnnealingLR``, the warm-up as ``ConstantLR`` or ``LinearLR`` in
``SequentialLR``), for PyTorch loops stepped once per iteration.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.optim import lr_scheduler as L

from parity import torch_side
from parity.cases import TOL
from parity.measure import Measure, worst
from train.config import Config
from train.optim import (
    PAPER_BOUNDARIES,
    PAPER_TOTAL_STEPS,
    epoch_milestones_to_steps,
    multistep_schedule,
)


def torch_scheduler(cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> L.LRScheduler:
    """The per-iteration PyTorch scheduler for ``cfg``'s schedule, written from the flags'
    documented meaning (not from train.optim), so the two are independent."""
    total = cfg.total_steps(steps_per_epoch)
    warm = cfg.warmup_length(steps_per_epoch)
    if cfg.schedule == "cosine":
        main = L.CosineAnnealingLR(opt, T_max=max(total - warm, 1))
    else:
        if cfg.schedule == "paper":
            bounds = [total // 2, total * 3 // 4]
        else:
            epochs = math.ceil(total / steps_per_epoch)
            ms = cfg.milestones or [m for m in (epochs // 2, epochs * 3 // 4) if m > 0]
            bounds = [m * steps_per_epoch for m in ms]
        main = L.MultiStepLR(opt, [b - warm for b in bounds], gamma=0.1)
    if not warm:
        return main
    first = (L.LinearLR(opt, start_factor=cfg.warmup_factor, total_iters=warm)
             if cfg.warmup_method == "linear" else
             L.ConstantLR(opt, factor=cfg.warmup_factor, total_iters=warm))
    return L.SequentialLR(opt, [first, main], milestones=[warm])


def _compare(label: str, mine, theirs: np.ndarray) -> tuple:
    got = np.asarray(jax.vmap(mine)(jnp.arange(len(theirs))))
    bad = np.flatnonzero(~np.isclose(got, theirs, rtol=TOL["schedule"], atol=1e-7))
    where = f"{label} (first differing iteration {bad[0]})" if len(bad) else label
    return where, got, theirs


def check_schedules() -> list[Measure]:
    """train.optim's schedules and every Config schedule vs PyTorch's schedulers at every
    iteration (hence at each boundary): the paper's per-iteration MultiStepLR over 64k, epoch
    milestones stepped once per epoch, repeated milestones, the 400-iteration warm-up
    (ConstantLR chained with MultiStepLR, and in SequentialLR), the linear warm-up (LinearLR in
    SequentialLR), cosine with and without warm-up (CosineAnnealingLR)."""
    n = PAPER_TOTAL_STEPS
    pairs = [
        _compare("paper", multistep_schedule(0.1, PAPER_BOUNDARIES),
                 torch_side.lrs(lambda o: L.MultiStepLR(o, list(PAPER_BOUNDARIES), 0.1), n)),
        _compare("paper+warmup400 (ChainedScheduler)",
                 multistep_schedule(0.1, PAPER_BOUNDARIES, warmup_steps=400),
                 torch_side.lrs(lambda o: L.ChainedScheduler([
                     L.ConstantLR(o, 0.1, total_iters=400),
                     L.MultiStepLR(o, list(PAPER_BOUNDARIES))]), n)),
        _compare("epochs[3,5]x7", multistep_schedule(0.1, epoch_milestones_to_steps([3, 5], 7)),
                 torch_side.lrs(lambda o: L.MultiStepLR(o, [3, 5], 0.1), 56, per_epoch=7)),
        _compare("repeated[4,4,6]", multistep_schedule(0.1, [4, 4, 6]),
                 torch_side.lrs(lambda o: L.MultiStepLR(o, [4, 4, 6], 0.1), 10)),
    ]
    configs = {
        "Config paper 640 steps": (Config(steps=640), 10),
        "Config multistep 8 epochs": (Config(epochs=8, schedule="multistep"), 10),
        "Config multistep [2,5] + warm-up 7": (Config(epochs=6, schedule="multistep",
                                                      milestones=(2, 5), warmup="on",
                                                      warmup_steps=7), 5),
        "Config resnet110 paper (auto warm-up 400)": (Config(arch="resnet110"), 391),
        "Config cosine 300 steps": (Config(steps=300, schedule="cosine"), 50),
        "Config cosine + warm-up 40": (Config(steps=300, schedule="cosine", warmup="on",
                                              warmup_steps=40), 50),
        "Config cosine + linear warm-up 40 from 0.01 (torchvision)": (
            Config(steps=300, schedule="cosine", warmup="on", warmup_steps=40,
                   warmup_method="linear", warmup_factor=0.01), 50),
        "Config multistep [2,5] + linear warm-up 7": (
            Config(epochs=6, schedule="multistep", milestones=(2, 5), warmup="on",
                   warmup_steps=7, warmup_method="linear"), 5),
    }
    for label, (cfg, spe) in configs.items():
        theirs = torch_side.lrs(lambda o, c=cfg, s=spe: torch_scheduler(c, _with_lr(o, c.lr), s),
                                cfg.total_steps(spe))
        pairs.append(_compare(label, cfg.lr_schedule(spe), theirs))
    return [worst("schedule", "fp32", [p], TOL["schedule"]) for p in pairs]


def _with_lr(opt: torch.optim.Optimizer, lr: float) -> torch.optim.Optimizer:
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] = lr
    return opt
