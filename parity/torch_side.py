"""The PyTorch side of the parity checks: reference runs, their features and statistics, a
ReLU-pattern override, and the reference optimiser loops."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

TORCH_DTYPE = {"fp32": torch.float32, "fp64": torch.float64}


def features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits, and the stem output (after the max-pool) and each stage's output."""
    feats = []
    names = ["maxpool"] + [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o: feats.append(o.clone()))
             for n in names]
    try:
        return model(x), feats
    finally:
        for h in hooks:
            h.remove()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def bn_stats(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


def randomize_bn(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """BN weight/bias random, running stats = statistics of a calibration batch (not 0/1), so
    that no mapping bug can hide behind ones and zeros."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen).abs())  # no dead ReLUs
            m.momentum = 1.0
        model.train()
        model(x)
    for m in bns:
        m.momentum = 0.1


@contextlib.contextmanager
def relu_pattern(masks: Sequence[np.ndarray] | None):
    """Within: every ``F.relu`` (which the references and ``nn.ReLU`` call) passes its input
    where the next of ``masks`` (NHWC, flaxres's order of ReLUs) is True, else 0: PyTorch float64
    on the same side of every ReLU kink as a flaxres fp32 run. ``None``: ReLUs as they are."""
    if masks is None:
        yield
        return
    pending = iter(masks)

    def relu(x, inplace=False):
        m = torch.from_numpy(np.ascontiguousarray(next(pending).transpose(0, 3, 1, 2)))
        return torch.where(m, x, torch.zeros_like(x))

    with mock.patch.object(F, "relu", relu):
        yield
    if next(pending, None) is not None:
        raise AssertionError("PyTorch ran fewer ReLUs than flaxres recorded")


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy, without ``num_batches_tracked`` (flaxres keeps no such count)."""
    return {k: v.numpy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def sgd_run(model: torch.nn.Module, batches, precision: str, lr: float, momentum: float,
            weight_decay: float, schedulers: Callable, jitter: float = 0.0
            ) -> tuple[list[float], dict]:
    """``torch.optim.SGD`` over ``batches`` (NCHW float arrays, labels), the scheduler stepped
    every iteration: the loss at each step and the final state dict (numpy). ``jitter``: each
    initial weight first moves by this relative amount at random (a rounding-sized change)."""
    dt = TORCH_DTYPE[precision]
    ref = copy.deepcopy(model).to(dt).train()
    if jitter:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1 + jitter * torch.randn(p.shape, generator=gen, dtype=dt))
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = schedulers(opt)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ref(torch.from_numpy(x).to(dt)), torch.from_numpy(y).long())
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, numpy_state(ref)


def sgd_step(model: torch.nn.Module, state: dict, momentum_buffers: dict[str, np.ndarray],
             batch, precision: str, lr: float, momentum: float, weight_decay: float,
             layout: str = "nchw", relus: Sequence[np.ndarray] | None = None
             ) -> tuple[float, dict]:
    """One ``torch.optim.SGD`` step of ``model``'s architecture from ``state`` (weights and BN
    statistics) and the optimiser's ``momentum_buffers`` (by parameter name; zeros before the
    first step give PyTorch's first-step rule, buf = g), on ``batch``, in ``layout``, its ReLUs
    following ``relus`` if given (:func:`relu_pattern`): the loss and the state dict (numpy)
    after the step."""
    dt = TORCH_DTYPE[precision]
    ref = copy.deepcopy(model).to(dt)
    ref.load_state_dict(state)  # after .to(dt): a float64 state loaded into fp32 would round
    ref.train()
    x = torch.from_numpy(batch[0]).to(dt)
    if layout == "channels_last":
        ref, x = (t.to(memory_format=torch.channels_last) for t in (ref, x))
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for name, p in ref.named_parameters():
        opt.state[p]["momentum_buffer"] = torch.tensor(momentum_buffers[name], dtype=dt)
    with relu_pattern(relus):
        loss = F.cross_entropy(ref(x), torch.from_numpy(batch[1]).long())
        loss.backward()
    opt.step()
    return loss.item(), numpy_state(ref)


def lrs(make_scheduler: Callable, steps: int, per_epoch: int = 1, base_lr: float = 0.1
        ) -> np.ndarray:
    """The lr torch.optim.SGD uses at each iteration, the scheduler stepped every ``per_epoch``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr, momentum=0.9)
    sched, out = make_scheduler(opt), []
    for it in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if (it + 1) % per_epoch == 0:
            sched.step()
    return np.array(out)
