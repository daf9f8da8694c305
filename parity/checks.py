"""The parity measurements, shared by the ``parity/test_*.py`` tests and ``python -m parity.report``.

A :class:`Case` holds one architecture in both frameworks with identical weights (the PyTorch
reference, its BatchNorm affine parameters randomised and running statistics calibrated on a
batch so that no mapping bug can hide behind 1/0 values, converted into flaxres with
``from_torch``). Each ``check_*`` returns :class:`Measure` objects: the worst relative error
``||a - b|| / ||b||`` over the compared tensors, the tolerance, and which tensor was worst.

JAX runs block by block: each stem / residual block / head is a jitted pure function of its own
(graph definition static, weights as arguments), and gradients are chained block to block with
``jax.vjp``. Equal blocks (all but the first of a stage, and across depths) share one compiled
executable, so ResNet-1202 compiles as fast as ResNet-20; compiling each net whole costs minutes
per deep net on 2 cores. ``check_blockwise`` proves the composition equals the whole model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import flaxres
from flaxres.convert import from_torch, named_arrays, to_torch
from parity.reference import create_torch_model
from train.optim import multistep_schedule, sgd

jax.config.update("jax_default_matmul_precision", "highest")

# (name, flaxres/reference overrides): every registered net plus the no-BN and shortcut variants.
CASES: list[tuple[str, dict]] = [(n, {}) for n in flaxres.list_models()] + [
    ("resnet20", {"norm": False}), ("plain20", {"norm": False}),
    ("resnet20", {"shortcut": "B"}), ("resnet20", {"shortcut": "C"})]

# Architectures for the composition check: every stem, block, shortcut and norm kind once.
SUBSETS = {"blockwise": [("resnet20", {}), ("plain20", {"norm": False}), ("resnet20", {"shortcut": "C"}),
                         ("resnet18", {}), ("resnext29_8x64d", {})]}
TOL = {"schedule": 1e-6, "eval": 1e-5, "train": 1e-5, "features": 1e-5, "grads": 1e-4, "optim": 1e-6,
       "traj_loss": 1e-4, "traj_state": 1e-3, "checkpoint": 1e-5, "blockwise": 1e-5}
TRAJ_STEPS = 20
TRAJ_BASE_LR = 2e-4  # see check_trajectory: larger rates make 20-step trajectories chaotic
TRAJ_LR = multistep_schedule(TRAJ_BASE_LR, boundaries=(10, 15), gamma=0.1, warmup_steps=3)


def case_id(name: str, overrides: dict) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in overrides.items())


@dataclasses.dataclass
class Measure:
    check: str
    error: float
    tol: float
    where: str
    extra_ok: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol and self.extra_ok)

    def __str__(self) -> str:
        s = f"{self.check}: max rel err {self.error:.2e} (tol {self.tol:.0e}) worst at {self.where}"
        return s + (f"; {self.note}" if self.note else "")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|` (b the PyTorch value); the absolute error where b is all zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    return float(d / nb) if nb > 0 else float(d)


def worst(check: str, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], tol: float | None = None,
          **kw) -> Measure:
    """Measure over named (flaxres, torch) pairs; shapes must agree exactly."""
    err, where = 0.0, "-"
    for name, a, b in pairs:
        if np.shape(a) != np.shape(b):
            return Measure(check, float("inf"), TOL.get(check, tol), f"{name} shape "
                           f"{np.shape(a)} vs {np.shape(b)}")
        e = rel_err(a, b)
        if not e <= err:  # NaN counts as worst
            err, where = e, name
    return Measure(check, err, TOL[check] if tol is None else tol, where, **kw)


def input_size(name: str) -> tuple[int, int]:
    """(batch, height=width): small inputs for big nets, batch > 1 for train-mode BatchNorm."""
    if name.startswith("resnext29"):
        return 4, 8
    if name in flaxres.list_models("^(resnet|resnext)(18|34|50|101|152)(_32x4d|_32x8d)?$"):
        return 2, 64  # ImageNet stem: /32 overall, stage 4 is 2x2
    if name.endswith("_cifar") or re.fullmatch(r"(resnet|plain)(110|164|1202)", name):
        return 4, 16
    return 8, 32


# ---------------------------------------------------------------- JAX, block by block


class _Stem(nnx.Module):
    def __init__(self, model: flaxres.ResNet):
        self.conv1, self.bn1, self.pool = model.conv1, model.bn1, model.stem == "imagenet"

    def __call__(self, x):
        x = self.conv1(x)
        x = nnx.relu(x if self.bn1 is None else self.bn1(x))
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))) if self.pool else x


class _Head(nnx.Module):
    def __init__(self, model: flaxres.ResNet):
        self.fc = model.fc

    def __call__(self, x):
        return self.fc(x.mean(axis=(1, 2)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(gd, params, stats, x):
    m = nnx.merge(gd, params, stats, copy=True)
    y = m(x)
    return y, nnx.state(m, nnx.BatchStat)


@functools.partial(jax.jit, static_argnums=0)
def _vjp(gd, params, stats, x, gy):
    return jax.vjp(lambda p, x: nnx.merge(gd, p, stats, copy=True)(x), params, x)[1](gy)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(gd, params, stats, x, y):
    def f(p, x):
        logits = nnx.merge(gd, p, stats, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
    return loss, logits, grads


@functools.partial(jax.jit, static_argnums=0)
def _opt_step(tx, params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class Blockwise:
    """A flaxres ResNet as a chain of jitted units: stem, each block, head (pool + fc)."""

    def __init__(self, model: flaxres.ResNet, train: bool):
        model.train() if train else model.eval()
        stages = model.stages()
        self.modules = [_Stem(model)] + [b for s in stages for b in s] + [_Head(model)]
        self.prefixes = [""] + [f"layer{i + 1}.{j}." for i, s in enumerate(stages)
                                for j in range(len(s))] + [""]
        ends = np.cumsum([1] + [len(s) for s in stages]) - 1
        self.feature_units = set(ends.tolist())  # stem and last block of each stage
        self.gd, self.params, self.stats = zip(
            *(nnx.split(m, nnx.Param, nnx.BatchStat) for m in self.modules), strict=True)
        self.params, self.stats = list(self.params), list(self.stats)

    def forward(self, x) -> tuple[jax.Array, list[jax.Array], list, list]:
        """Logits, features (stem + stage outputs), each unit's input, each unit's new stats."""
        feats, inputs, new_stats = [], [], []
        for i, gd in enumerate(self.gd):
            inputs.append(x)
            x, s = _forward(gd, self.params[i], self.stats[i], x)
            new_stats.append(s)
            if i in self.feature_units:
                feats.append(x)
        return x, feats, inputs, new_stats

    def grads(self, x, y) -> tuple[jax.Array, jax.Array, list[jax.Array], list, list]:
        """Mean cross-entropy, logits, features, per-unit gradients and new BN statistics."""
        _, feats, inputs, new_stats = self.forward(x)
        loss, logits, (g_head, g) = _loss_and_grads(self.gd[-1], self.params[-1], self.stats[-1],
                                                    inputs[-1], y)
        grads = [None] * len(self.gd)
        grads[-1] = g_head
        for i in reversed(range(len(self.gd) - 1)):
            grads[i], g = _vjp(self.gd[i], self.params[i], self.stats[i], inputs[i], g)
        return loss, logits, feats, grads, new_stats

    def named(self, states: list | None = None) -> dict[str, np.ndarray]:
        """Per-unit states (e.g. gradients) under PyTorch names; default: weights and BN stats."""
        if states is None:
            states = [nnx.merge_state(p, s) for p, s in zip(self.params, self.stats, strict=True)]
        out = {}
        for m, prefix, st in zip(self.modules, self.prefixes, states, strict=True):
            out.update({prefix + k: v for k, v in named_arrays(m, st).items()})
        return out


# ---------------------------------------------------------------- PyTorch side


def _torch_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    feats = []
    names = ["maxpool"] + [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o: feats.append(o.clone()))
             for n in names]
    try:
        return model(x), feats
    finally:
        for h in hooks:
            h.remove()


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _bn_stats(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


def _float64_grads(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> dict[str, np.ndarray]:
    """Train-mode gradients of the reference computed in float64: the exact function's gradient.

    Measured: PyTorch's own fp32 gradients differ from these by up to 7e-3 (resnet20,
    ``layer1.1.bn1.bias``; ~1e-2 on resnet56: cancellation in sums of nearly opposite terms)
    while flaxres fp32 stays within ~1e-6, so fp32 PyTorch cannot serve as the yardstick.
    """
    ref = copy.deepcopy(model).double().train()
    F.cross_entropy(ref(x.double()), torch.from_numpy(y)).backward()
    return {n: p.grad.numpy() for n, p in ref.named_parameters()}


def _randomize_bn(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """BN weight/bias random, running stats = statistics of a calibration batch (not 0/1)."""
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


# ---------------------------------------------------------------- the checks


class Case:
    """One architecture (plus overrides) in both frameworks with the same weights and inputs."""

    def __init__(self, name: str, overrides: dict | None = None, seed: int = 0):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        self.name, self.overrides = name, dict(overrides or {})
        self.id = case_id(name, self.overrides)
        self.batch, self.hw = input_size(name)
        rng = np.random.default_rng(seed)
        self.batches = [(rng.standard_normal((self.batch, 3, self.hw, self.hw), np.float32),
                         rng.integers(0, 10, self.batch)) for _ in range(TRAJ_STEPS + 2)]
        self.torch_model = create_torch_model(name, **self.overrides)
        _randomize_bn(self.torch_model, torch.from_numpy(self.batches[-1][0]), seed)
        self.model = flaxres.create_model(name, **self.overrides)
        from_torch(self.model, self.torch_model.state_dict())

    def _x(self, i: int) -> tuple[torch.Tensor, jax.Array, np.ndarray]:
        x, y = self.batches[i]
        return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1)), y

    @functools.cached_property
    def _eval(self):
        tx, jx, _ = self._x(-2)
        ref = copy.deepcopy(self.torch_model).eval()
        with torch.no_grad():
            t_logits, t_feats = _torch_features(ref, tx)
        j_logits, j_feats, _, _ = Blockwise(self.model, train=False).forward(jx)
        return t_logits.numpy(), [_nhwc(f) for f in t_feats], np.asarray(j_logits), j_feats

    @functools.cached_property
    def _train(self):
        tx, jx, y = self._x(0)
        ref = copy.deepcopy(self.torch_model).train()
        t_logits, t_feats = _torch_features(ref, tx)
        t_loss = F.cross_entropy(t_logits, torch.from_numpy(y))
        t_loss.backward()
        t_grads = _float64_grads(self.torch_model, tx, y)
        net = Blockwise(self.model, train=True)
        loss, logits, feats, grads, new_stats = net.grads(jx, jnp.asarray(y))
        return {"t_loss": t_loss.item(), "t_logits": t_logits.detach().numpy(),
                "t_feats": [_nhwc(f) for f in t_feats], "t_grads": t_grads,
                "t_stats": _bn_stats(ref), "loss": float(loss), "logits": np.asarray(logits),
                "feats": feats, "grads": net.named(grads), "stats": net.named(new_stats)}

    def check_eval(self) -> list[Measure]:
        """1. eval-mode logits, and the predicted classes identical."""
        t, _, j, _ = self._eval
        same = bool((t.argmax(1) == j.argmax(1)).all())
        return [worst("eval", [("logits", j, t)], extra_ok=same,
                      note="" if same else "argmax differs")]

    def check_train(self) -> list[Measure]:
        """2. train-mode logits and the BN running mean/var after one forward (PyTorch momentum,
        unbiased running variance)."""
        r = self._train
        stats = [(k, r["stats"][k], v) for k, v in r["t_stats"].items()]
        missing = set(r["t_stats"]) ^ set(r["stats"])
        return [worst("train", [("logits", r["logits"], r["t_logits"]), *stats],
                      extra_ok=not missing, note=f"stats only on one side: {sorted(missing)}"
                      if missing else "")]

    def check_features(self) -> list[Measure]:
        """3. stem and per-stage activations, eval and train mode."""
        _, tf, _, jf = self._eval
        r = self._train
        names = ["stem"] + [f"layer{i}" for i in range(1, len(tf))]
        pairs = [(f"eval:{n}", a, b) for n, a, b in zip(names, jf, tf, strict=True)]
        pairs += [(f"train:{n}", a, b) for n, a, b in zip(names, r["feats"], r["t_feats"], strict=True)]
        return [worst("features", pairs)]

    def check_grads(self) -> list[Measure]:
        """4. gradient of the mean cross-entropy w.r.t. every parameter (and the loss), against
        the reference's float64 gradients (see ``_float64_grads``)."""
        r = self._train
        missing = set(r["t_grads"]) ^ set(r["grads"])
        pairs = [("loss", r["loss"], r["t_loss"])]
        pairs += [(k, r["grads"][k], g) for k, g in r["t_grads"].items() if k in r["grads"]]
        return [worst("grads", pairs, extra_ok=not missing,
                      note=f"gradients only on one side: {sorted(missing)}" if missing else "")]

    def check_optim(self) -> list[Measure]:
        """5. train.optim.sgd vs torch.optim.SGD, three steps (momentum matters from the second)
        fed the same gradients (this net's, scaled 1, -0.5, 2), nesterov off and on. SGD is
        elementwise, so the JAX side runs on all parameters as one flat vector: one tiny compile."""
        grads = {k: v.astype(np.float32) for k, v in self._train["t_grads"].items()}
        ref = copy.deepcopy(self.torch_model)
        params = dict(ref.named_parameters())
        w0 = {k: v.detach().numpy().copy() for k, v in params.items()}

        def flat(d: dict[str, np.ndarray]) -> jax.Array:
            return jnp.asarray(np.concatenate([d[k].ravel() for k in params]))

        out = []
        for nesterov, wd in ((False, 1e-4), (True, 5e-4)):
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(torch.from_numpy(w0[k]))
            opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=wd,
                                  nesterov=nesterov)
            tx = sgd(0.1, momentum=0.9, weight_decay=wd, nesterov=nesterov)
            p, g = flat(w0), flat(grads)
            state = tx.init(p)
            for scale in (1.0, -0.5, 2.0):
                for k, v in params.items():
                    v.grad = torch.from_numpy(scale * grads[k])
                opt.step()
                p, state = _opt_step(tx, p, g * scale, state)
            theirs = np.concatenate([v.detach().numpy().ravel() for v in params.values()])
            offsets = np.cumsum([0] + [v.numel() for v in params.values()])
            mine = np.asarray(p)
            out.append(worst("optim", [(f"{k} (nesterov={nesterov})", mine[a:b], theirs[a:b])
                                       for k, a, b in zip(params, offsets, offsets[1:])]))
        return [max(out, key=lambda m: m.error)]

    def check_trajectory(self) -> list[Measure]:
        """6. TRAJ_STEPS SGD steps (warm-up, two lr drops) from the same weights on the same
        batches: the loss at every step, then the final weights and running statistics. The
        reference runs in float64, so the tolerance bounds flaxres's own fp32 drift. The lr is
        small because the dynamics are chaotic (at lr >= 5e-4, 1e-7 differences in the start
        grow past 1e-4 within 20 steps); dropping momentum still shows as a 3e-2 loss error,
        while weight decay's effect is below tolerance here (check 5 tests it exactly)."""
        ref = copy.deepcopy(self.torch_model).double().train()  # the exact trajectory
        opt = torch.optim.SGD(ref.parameters(), lr=TRAJ_BASE_LR, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.ChainedScheduler([
            torch.optim.lr_scheduler.ConstantLR(opt, factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 15], gamma=0.1)])
        model = nnx.clone(self.model)
        net = Blockwise(model, train=True)
        tx = sgd(TRAJ_LR, momentum=0.9, weight_decay=5e-4)
        opt_states = [tx.init(p) for p in net.params]
        losses = []
        for step in range(TRAJ_STEPS):
            tx_, jx, y = self._x(step)
            opt.zero_grad()
            t_loss = F.cross_entropy(ref(tx_.double()), torch.from_numpy(y))
            t_loss.backward()
            opt.step()
            sched.step()
            loss, _, _, grads, new_stats = net.grads(jx, jnp.asarray(y))
            for i, g in enumerate(grads):
                net.params[i], opt_states[i] = _opt_step(tx, net.params[i], g, opt_states[i])
            net.stats = new_stats
            losses.append((f"loss step {step}", float(loss), t_loss.item()))
        mine, theirs = net.named(), {k: v.numpy() for k, v in ref.state_dict().items()}
        return [worst("traj_loss", losses),
                worst("traj_state", [(k, v, theirs[k]) for k, v in mine.items()])]

    def check_checkpoint(self) -> list[Measure]:
        """7. train the reference 3 steps in PyTorch, torch.save it bare and DataParallel-wrapped
        in an akamaster-style checkpoint dict, load each file into flaxres: same predictions;
        and to_torch() of it loads into a fresh reference (strict) bit-exactly."""
        ref = copy.deepcopy(self.torch_model).train()
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        for step in range(3):
            tx_, _, y = self._x(step)
            opt.zero_grad()
            F.cross_entropy(ref(tx_), torch.from_numpy(y)).backward()
            opt.step()
        tx_, jx, _ = self._x(-2)
        with torch.no_grad():
            t_logits = ref.eval()(tx_).numpy()
        out, exact = [], True
        with tempfile.TemporaryDirectory() as d:
            bare, wrapped = os.path.join(d, "bare.pth"), os.path.join(d, "dp.pth")
            torch.save(ref.state_dict(), bare)
            torch.save({"epoch": 3, "state_dict": torch.nn.DataParallel(ref).state_dict(),
                        "optimizer": opt.state_dict()}, wrapped)
            for label, path in (("bare", bare), ("DataParallel", wrapped)):
                model = from_torch(flaxres.create_model(self.name, **self.overrides), path)
                j_logits = np.asarray(Blockwise(model, train=False).forward(jx)[0])
                same = bool((j_logits.argmax(1) == t_logits.argmax(1)).all())
                out.append(worst("checkpoint", [(f"{label} logits", j_logits, t_logits)],
                                 extra_ok=same, note="" if same else "argmax differs"))
            back = create_torch_model(self.name, **self.overrides)
            back.load_state_dict(to_torch(model), strict=True)
            want = ref.state_dict()
            exact = all(torch.equal(v, want[k]) for k, v in back.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
        m = max(out, key=lambda m: m.error)
        if not exact:
            m.extra_ok, m.note = False, "to_torch round trip not bit-exact"
        return [m]

    def check_blockwise(self) -> list[Measure]:
        """The block-by-block composition used above equals the whole model's __call__/features
        (un-jitted), in eval and train mode, including the BN statistics it updates."""
        _, jx, _ = self._x(0)
        pairs = []
        for train in (False, True):
            mode = "train" if train else "eval"
            net = Blockwise(nnx.clone(self.model), train=train)
            logits, feats, _, new_stats = net.forward(jx)
            whole_f, whole = nnx.clone(self.model), nnx.clone(self.model)
            for m in (whole_f, whole):
                m.train() if train else m.eval()
            pairs += [(f"{mode}:features[{i}]", a, b)
                      for i, (a, b) in enumerate(zip(feats, whole_f.features(jx), strict=True))]
            pairs.append((f"{mode}:logits", logits, whole(jx)))
            stats = net.named(new_stats)
            pairs += [(f"{mode}:{k}", stats[k], v) for k, v in named_arrays(whole).items()
                      if k in stats]
        return [worst("blockwise", pairs)]


CHECKS = ("eval", "train", "features", "grads", "optim", "trajectory", "checkpoint")


def _torch_lrs(make_scheduler, steps: int, per_epoch: int = 1) -> np.ndarray:
    """The lr torch.optim.SGD uses at each iteration, the scheduler stepped every ``per_epoch``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched, lrs = make_scheduler(opt), []
    for it in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if (it + 1) % per_epoch == 0:
            sched.step()
    return np.array(lrs)


def check_schedules() -> list[Measure]:
    """5b. train.optim schedules vs PyTorch's at every iteration (hence at each boundary): the
    paper's per-iteration MultiStepLR, epoch milestones stepped once per epoch, the 400-iteration
    lr-0.01 warm-up of ResNet-110/1202 (ConstantLR chained with MultiStepLR), repeated milestones."""
    from torch.optim import lr_scheduler as L

    from train.optim import PAPER_BOUNDARIES, PAPER_TOTAL_STEPS, epoch_milestones_to_steps

    n = PAPER_TOTAL_STEPS
    cases = {
        "paper": (multistep_schedule(0.1, PAPER_BOUNDARIES),
                  _torch_lrs(lambda o: L.MultiStepLR(o, list(PAPER_BOUNDARIES), 0.1), n)),
        "paper+warmup400": (
            multistep_schedule(0.1, PAPER_BOUNDARIES, warmup_steps=400),
            _torch_lrs(lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.1, total_iters=400),
                                                     L.MultiStepLR(o, list(PAPER_BOUNDARIES))]), n)),
        "epochs[3,5]x7": (multistep_schedule(0.1, epoch_milestones_to_steps([3, 5], 7)),
                          _torch_lrs(lambda o: L.MultiStepLR(o, [3, 5], 0.1), 56, per_epoch=7)),
        "repeated[4,4,6]": (multistep_schedule(0.1, [4, 4, 6]),
                            _torch_lrs(lambda o: L.MultiStepLR(o, [4, 4, 6], 0.1), 10)),
    }
    pairs = []
    for label, (mine, theirs) in cases.items():
        got = np.asarray(jax.vmap(mine)(jnp.arange(len(theirs))))
        bad = np.flatnonzero(np.abs(got - theirs) > TOL["schedule"] * theirs)
        where = f"{label} (first differing iteration {bad[0]})" if len(bad) else label
        pairs.append((where, got, theirs))
    return [worst("schedule", pairs)]


def run_case(case: Case, checks: Iterable[str] = CHECKS) -> list[Measure]:
    return [m for c in checks for m in getattr(case, f"check_{c}")()]
