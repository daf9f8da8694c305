"""The parity checks, shared by the ``parity/test_*.py`` tests and ``python -m parity.report``.

A :class:`Case` holds one :class:`parity.cases.Arch` in both frameworks with identical weights
(the PyTorch reference, its BatchNorm affine parameters randomised and running statistics
calibrated on a batch, converted into flaxres with ``from_torch``). Each ``check_*`` returns
:class:`parity.measure.Measure` objects. flaxres always runs its own code: the model's
``__call__`` for logits, ``ResNet.features`` for features, the trainer's loss for gradients
(:mod:`parity.flax_side`); the reference is PyTorch in float64.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import flaxres
from flaxres.convert import from_torch, named_arrays, to_torch
from parity import flax_side, torch_side
from parity.cases import BATCHES, CHAOS_JITTER, CHAOS_LIMIT, TOL, Arch, Trajectory
from parity.measure import FLOOR_FACTOR, Floor, Measure, fp32_floor, one_sided, same_classes, worst
from train.optim import multistep_schedule, sgd

NP_DTYPE = {"fp32": np.float32, "fp64": np.float64}  # also flaxres's dtype / param_dtype
# PyTorch fp32's rounding error is measured in both memory formats (different oneDNN kernels):
# the floor is the larger, the error of an equally valid PyTorch fp32 run.
TORCH_LAYOUTS = ("nchw", "channels_last")


def torch_schedulers(plan: Trajectory) -> Callable[[torch.optim.Optimizer], object]:
    """PyTorch's form of ``trajectory_schedule``: constant warm-up, then MultiStepLR."""
    L = torch.optim.lr_scheduler
    return lambda opt: L.ChainedScheduler([
        L.ConstantLR(opt, factor=0.1, total_iters=plan.warmup),
        L.MultiStepLR(opt, milestones=list(plan.boundaries), gamma=0.1)])


def trajectory_schedule(plan: Trajectory) -> optax.Schedule:
    return multistep_schedule(plan.lr, plan.boundaries, warmup_steps=plan.warmup)


@functools.partial(jax.jit, static_argnums=0)
def _opt_step(tx, params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def momentum_buffers(model: flaxres.ResNet, opt_state) -> dict[str, np.ndarray]:
    """``train.optim.sgd``'s momentum trace under PyTorch names and layouts: the
    ``momentum_buffer`` of each parameter in ``torch.optim.SGD``'s state."""
    return named_arrays(model, optax.tree_utils.tree_get(opt_state, "trace"))


def _flat(key: str, value) -> dict[str, np.ndarray]:
    """One result entry by tensor name: a dict of tensors as is, the features list as stem,
    layer1, ..., a scalar or array under ``key``."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return dict(zip(["stem"] + [f"layer{i}" for i in range(1, len(value))], value, strict=True))
    return {key: value}


def _loss_and_grads(out: dict) -> dict[str, np.ndarray]:
    return {"loss": out["loss"], **out["grads"]}


def _flag_chaos(m: Measure) -> Measure:
    """Marks an fp32 measure ``chaotic``: a miss where PyTorch fp32 itself is beyond
    CHAOS_LIMIT of float64 (no fp32 run can then be held to another), or any measure where the
    bound of some tensor admits an all-zero result (PyTorch fp32 50% or more off: plain110's
    gradients, 130-360%), which says nothing even where it passes."""
    m.chaotic = ((not m.ok and m.floor > CHAOS_LIMIT)
                 or FLOOR_FACTOR * m.largest_floor >= 1.0)
    return m


def _whole_trajectory(p: str, mine: tuple[list[float], dict], ref: tuple[list[float], dict]
                      ) -> list[Measure]:
    """Two trajectories (losses, final state) compared: every step's loss, then the state."""
    (losses, state), (ref_losses, ref_state) = mine, ref
    note = one_sided(state, ref_state)
    return [worst("traj_loss", p, [(f"loss step {i}", a, b) for i, (a, b) in
                                   enumerate(zip(losses, ref_losses, strict=True))],
                  TOL["traj_loss"]),
            worst("traj_state", p, [(k, state.get(k), v) for k, v in ref_state.items()],
                  TOL["traj_state"], extra_ok=not note, note=note)]


class Case:
    """One architecture in both frameworks with the same weights and inputs.

    The checks run flaxres at ``precision`` ("fp64": ``jax.enable_x64``, the same-function proof;
    "fp32": what users run) against PyTorch float64; PyTorch fp32 runs too where flaxres fp32
    misses the tolerance, to measure how far fp32 rounding alone moves this net.
    """

    def __init__(self, arch: Arch, seed: int = 0, cpu_ops: flaxres.CpuOps = flaxres.CpuOps(),
                 matmul_precision: str = "highest"):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        self.arch, self.id, self.cpu_ops = arch, arch.id, cpu_ops
        self.matmul_precision = matmul_precision
        self.batch, self.hw, self.plan = arch.batch, arch.hw, arch.trajectory
        rng = np.random.default_rng(seed)
        self.batches = [(rng.standard_normal((self.batch, 3, self.hw, self.hw), np.float32),
                         rng.integers(0, 10, self.batch)) for _ in range(BATCHES)]
        self.torch_model = arch.build_torch()
        torch_side.randomize_bn(self.torch_model, torch.from_numpy(self.batches[-1][0]), seed)
        self._models: dict[str, flaxres.ResNet] = {}
        self._cache: dict[tuple, object] = {}

    def release(self) -> None:
        """Drops the models and results kept for the next check (a deep net's take GBs)."""
        self._models.clear()
        self._cache.clear()

    @contextlib.contextmanager
    def numerics(self, precision: str) -> Iterator[None]:
        """flaxres at ``precision`` ("fp64": ``jax.enable_x64``) with the case's matmul and
        convolution precision ("highest": true fp32 products; JAX's GPU default is TF32,
        which a proof of equality must not use)."""
        with jax.enable_x64(precision == "fp64"), jax.default_matmul_precision(
                self.matmul_precision):
            yield

    def model(self, precision: str, source=None) -> flaxres.ResNet:
        """A fresh copy of the flaxres net with the reference's weights (or ``source``'s) at
        ``precision``; fp64 models must be used inside ``jax.enable_x64(True)``."""
        with self.numerics(precision):
            if precision not in self._models:
                dt = NP_DTYPE[precision]
                # Abstract: random initial weights would only be overwritten, and compiling
                # their initialisers costs seconds per net.
                shapes = nnx.eval_shape(lambda: self.arch.build_flax(dtype=dt, param_dtype=dt,
                                                                     cpu_ops=self.cpu_ops))
                self._models[precision] = from_torch(shapes, self.torch_model.state_dict())
            model = nnx.clone(self._models[precision])  # cheaper than building a deep net anew
            return model if source is None else from_torch(model, source)

    def _x(self, i: int, precision: str = "fp32") -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Batch i as NCHW torch tensor, NHWC array for JAX, labels; at ``precision``."""
        x, y = self.batches[i]
        x = x.astype(NP_DTYPE[precision])
        return torch.from_numpy(x), x.transpose(0, 2, 3, 1), y

    def _cached(self, key: tuple, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def _ref(self, precision: str, train: bool, relus: tuple | None = None,
             layout: str = "nchw") -> dict:
        """PyTorch at ``precision`` on batch 0 (train mode: also loss, grads, BN stats) or on
        batch -2 (eval mode); ``relus``: flaxres's ReLU record to follow (see check_grads);
        ``layout``: PyTorch's memory format (its kernels, hence its rounding, differ)."""
        def run():
            tx, _, y = self._x(0 if train else -2, precision)
            ref = copy.deepcopy(self.torch_model).to(torch_side.TORCH_DTYPE[precision]).train(train)
            if layout == "channels_last":
                ref, tx = (t.to(memory_format=torch.channels_last) for t in (ref, tx))
            with torch.set_grad_enabled(train), torch_side.relu_pattern(relus):
                logits, feats = torch_side.features(ref, tx)
                out = {"logits": logits.detach().numpy(),
                       "feats": [torch_side.nhwc(f) for f in feats]}
                if train:
                    loss = F.cross_entropy(logits, torch.from_numpy(y).long())
                    loss.backward()
                    out.update(loss=loss.item(), stats=torch_side.bn_stats(ref),
                               grads={n: p.grad.numpy() for n, p in ref.named_parameters()})
            return out
        return self._cached(("torch", precision, train, relus is not None, layout), run)

    def _flax(self, precision: str, train: bool) -> dict:
        """flaxres at ``precision`` on the batch of ``_ref``: the model's own logits; in train
        mode the loss, gradients and BatchNorm statistics."""
        def run():
            _, jx, y = self._x(0 if train else -2, precision)
            with self.numerics(precision):
                out = {}
                model = self.model(precision)
                model.train() if train else model.eval()
                if train:
                    loss, logits, grads, stats = flax_side.loss_and_grads(model, jx, jnp.asarray(y))
                    out.update(loss=float(loss), grads=named_arrays(model, grads),
                               stats=named_arrays(model, stats))
                else:
                    logits, _ = flax_side.forward(model, jx)
                out["logits"] = np.asarray(logits)
            return out
        return self._cached(("flax", precision, train), run)

    def _flax_features(self, precision: str, train: bool) -> dict:
        """``ResNet.features`` of a fresh model on the batch of ``_ref``, as ``_flax``'s
        ``feats``: apart, as only the features check needs them."""
        def run():
            _, jx, _ = self._x(0 if train else -2, precision)
            with self.numerics(precision):
                model = self.model(precision)
                model.train() if train else model.eval()
                return {"feats": [np.asarray(f) for f in flax_side.features(model, jx)]}
        return self._cached(("flax-features", precision, train), run)

    def _t32(self, train: bool, key: str, name: str) -> tuple[np.ndarray, ...]:
        """PyTorch fp32's result for one tensor in each of its memory layouts."""
        return tuple(_flat(key, self._ref("fp32", train, layout=lay)[key])[name]
                     for lay in TORCH_LAYOUTS)

    def loss_floor(self, relus: tuple | None = None) -> Floor:
        """The loss's fp32 floor. A scalar's rounding error is one random draw: PyTorch fp32's
        own loss error lands near zero by chance (resnet152_cifar on a 2-core Xeon: 3e-5 against
        flaxres's 1.1e-4, while flaxres's logits were within 1.3x of PyTorch's), so a loss
        measured against it fails at random. The floor is instead the first-order bound on the
        loss error of any logits as far from float64 as PyTorch fp32's (in either layout):
        ``||dL/dz|| * ||z32 - z64|| / |L|``. ``relus``: on that ReLU pattern (check_grads)."""
        ref = self._ref("fp64", True, relus)
        z = ref["logits"]
        y = self._x(0)[2]
        dz = np.exp(z - z.max(1, keepdims=True))
        dz /= dz.sum(1, keepdims=True)
        dz[np.arange(len(y)), y] -= 1.0  # d mean-cross-entropy / d logits, times the batch
        off = max(np.linalg.norm(self._ref("fp32", True, relus, lay)["logits"] - z)
                  for lay in TORCH_LAYOUTS)
        return Floor(np.linalg.norm(dz) / len(y) * off / abs(ref["loss"]))

    def _fp32_reference(self, name: str, relus: tuple | None,
                        torch_fp32: Callable[[], tuple]) -> Callable:
        """What the fp32 floor of tensor ``name`` is drawn from: for the loss, the first-order
        bound of :meth:`loss_floor` (a scalar's own error is one random draw); for any other
        tensor, PyTorch fp32's results, ``torch_fp32()``."""
        return functools.partial(self.loss_floor, relus) if name == "loss" else torch_fp32

    def _pairs(self, mine: dict, train: bool, keys, p: str) -> tuple[list[tuple], str]:
        """(name, flaxres at p or None, PyTorch float64[, PyTorch fp32]) for every reference
        tensor, and a note naming tensors only one side has."""
        r = self._ref("fp64", train)
        out, notes = [], []
        for key in keys:
            jk, rk = _flat(key, mine[key]), _flat(key, r[key])
            out += [(n, jk.get(n), v) + ((self._fp32_reference(
                n, None, functools.partial(self._t32, train, key, n)),) if p == "fp32" else ())
                    for n, v in rk.items()]
            notes.append(one_sided(jk, rk))
        return out, "; ".join(n for n in notes if n)

    def _measure(self, check: str, p: str, train: bool, keys) -> Measure:
        pairs, note = self._pairs(self._flax(p, train), train, keys, p)
        return worst(check, p, pairs, TOL[check], extra_ok=not note, note=note)

    def check_eval(self, p: str) -> Measure:
        """Eval-mode logits of ``model(x)``, and the predicted classes identical (in fp32:
        unless fp32 itself moves PyTorch's logits beyond the tolerance, where classes near a
        tie are a coin toss)."""
        m = self._measure("eval", p, False, ["logits"])
        if m.ok and (p == "fp64" or m.floor <= m.tol):
            m.extra_ok, m.note = same_classes(self._flax(p, False)["logits"],
                                              self._ref("fp64", False)["logits"])
        return m

    def check_train(self, p: str) -> Measure:
        """Train-mode logits and the BatchNorm running mean/var after one forward (PyTorch
        momentum, unbiased running variance)."""
        return self._measure("train", p, True, ["logits", "stats"])

    def check_features(self, p: str) -> Measure:
        """``ResNet.features``: the stem and per-stage activations, eval and train mode."""
        out = []
        note = ""
        for mode, train in (("eval", False), ("train", True)):
            pairs, n = self._pairs(self._flax_features(p, train), train, ["feats"], p)
            out += [(f"{mode}:{name}", *rest) for name, *rest in pairs]
            note = note or n
        return worst("features", p, out, TOL["features"], extra_ok=not note, note=note)

    def check_grads(self, p: str) -> Measure:
        """The trainer's loss and its gradient w.r.t. every parameter. The gradient jumps at a
        ReLU kink, and fp32 rounding moves some ReLU inputs within ~1e-5 of 0 across it (in
        PyTorch too, at other inputs); each such flip shifts the gradients below it by ~1e-3.
        Where the fp32 gradients miss the bound, PyTorch float64 runs again on flaxres fp32's
        side of every kink (its ReLUs gated by flaxres's record), and flaxres fp32 is measured
        against that; PyTorch fp32 on the same pattern gives the rounding floor. Where even
        PyTorch fp32 is more than CHAOS_LIMIT off float64 (plain110 at initialisation: 62%; a
        deep plain BatchNorm net explodes rounding backwards) no fp32 run can be held to
        another, and the measure says ``chaotic``."""
        m = self._measure("grads", p, True, ["loss", "grads"])
        if p == "fp32" and not m.ok and m.extra_ok:
            m = self._grads_on_fp32_side()
        return _flag_chaos(m) if p == "fp32" else m

    def _grads_on_fp32_side(self) -> Measure:
        relus = tuple(flax_side.train_relus(self.model("fp32"), self._x(0)[1]))
        ref = _loss_and_grads(self._ref("fp64", True, relus))
        mine = _loss_and_grads(self._flax("fp32", True))
        t32 = [_loss_and_grads(self._ref("fp32", True, relus, lay)) for lay in TORCH_LAYOUTS]
        return worst("grads", "fp32", [
            (k, mine.get(k), v,
             self._fp32_reference(k, relus, lambda k=k: tuple(t[k] for t in t32)))
            for k, v in ref.items()],
                     TOL["grads"],
                     note="against PyTorch float64 on flaxres fp32's side of every ReLU kink")

    def check_optim(self) -> Measure:
        """train.optim.sgd vs torch.optim.SGD, three steps (momentum matters from the second)
        fed the same gradients (this net's, scaled 1, -0.5, 2), nesterov off and on; in fp32
        only, as SGD is elementwise (nothing to amplify rounding). The JAX side runs on all
        parameters as one flat vector: one tiny compile."""
        ref = copy.deepcopy(self.torch_model)
        grads = {k: v.astype(np.float32) for k, v in self._ref("fp64", True)["grads"].items()}
        params = dict(ref.named_parameters())
        w0 = {k: v.detach().numpy().copy() for k, v in params.items()}
        offsets = np.cumsum([0] + [v.numel() for v in params.values()])
        measures = []
        for nesterov, wd in ((False, 1e-4), (True, 5e-4)):
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(torch.from_numpy(w0[k]))
            opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=wd,
                                  nesterov=nesterov)
            tx = sgd(0.1, momentum=0.9, weight_decay=wd, nesterov=nesterov)
            w, g = (jnp.asarray(np.concatenate([d[k].ravel() for k in params])) for d in (w0, grads))
            state = tx.init(w)
            for scale in (1.0, -0.5, 2.0):
                for k, v in params.items():
                    v.grad = torch.from_numpy(scale * grads[k])
                opt.step()
                w, state = _opt_step(tx, w, g * scale, state)
            mine = np.asarray(w)
            theirs = np.concatenate([v.detach().numpy().ravel() for v in params.values()])
            measures.append(worst("optim", "fp32", [
                (f"{k} (nesterov={nesterov})", mine[a:b], theirs[a:b])
                for k, a, b in zip(params, offsets, offsets[1:])], TOL["optim"]))
        return max(measures, key=lambda m: m.error)

    def torch_trajectory(self, precision: str, momentum: float | None = None,
                         weight_decay: float | None = None, jitter: float = 0.0
                         ) -> tuple[list[float], dict]:
        """PyTorch's run of the case's trajectory (``momentum``, ``weight_decay``: other than
        the plan's; ``jitter``: from weights moved by that relative amount, see
        :func:`parity.torch_side.sgd_run`)."""
        plan = self.plan
        momentum = plan.momentum if momentum is None else momentum
        weight_decay = plan.weight_decay if weight_decay is None else weight_decay
        return self._cached(("torch-traj", precision, momentum, weight_decay, jitter),
                            lambda: torch_side.sgd_run(
                                self.torch_model, self.batches[:plan.steps], precision,
                                plan.lr, momentum, weight_decay, torch_schedulers(plan), jitter))

    def flax_trajectory(self, precision: str, before_step: Callable | None = None
                        ) -> tuple[list[float], dict[str, np.ndarray]]:
        """flaxres's run of the case's trajectory: whole-compiled steps for nets of a few blocks, else the
        jitted-blocks path of the other checks; ``before_step(step, model, opt_state)`` sees
        the weights and the optimiser state (:func:`momentum_buffers`) each step starts from."""
        with self.numerics(precision):
            model = self.model(precision)
            model.train()
            tx = sgd(trajectory_schedule(self.plan), momentum=self.plan.momentum,
                     weight_decay=self.plan.weight_decay)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            opt_state = tx.init(params)
            whole = sum(len(s) for s in model.stages()) <= 4
            losses = []
            for step in range(self.plan.steps):
                if before_step:
                    before_step(step, model, opt_state)
                _, jx, y = self._x(step, precision)
                if whole:
                    loss, params, stats, opt_state = flax_side.train_step(
                        graphdef, tx, params, rest, opt_state, jx, jnp.asarray(y))
                else:
                    loss, _, grads, stats = flax_side.loss_and_grads(model, jx, jnp.asarray(y))
                    params, opt_state = _opt_step(tx, params, grads, opt_state)
                nnx.update(model, params, stats)
                rest = nnx.state(model, nnx.Not(nnx.Param))
                losses.append(float(loss))
            return losses, named_arrays(model)

    def check_trajectory(self, p: str) -> list[Measure]:
        """The case's trajectory (SGD with a warm-up and lr drops) from the same weights on the
        same batches. float64: the loss at every step, then the final weights and running
        statistics (:func:`_whole_trajectory`): both frameworks compute the same function, so the
        trajectories agree unless the dynamics amplify float64's own rounding past the
        tolerance. Where they do not agree, every step is checked from flaxres's own state
        instead (:meth:`check_trajectory_steps` at each step, which leaves no step of a wrong
        update unseen), and the note gives how far PyTorch float64 itself moves from weights
        moved by 1e-15 (plain44 grows a 4e-14 loss difference 100x per step to 6e-2;
        resnext101_32x8d's jittered run 6e-14 to 2.8e-7 in three steps). fp32: always per step,
        at the probed steps."""
        if p == "fp32":
            return self.check_trajectory_steps()
        whole = _whole_trajectory(p, self.flax_trajectory(p), self.torch_trajectory(p))
        if all(m.ok for m in whole):
            return whole
        spread = _whole_trajectory("fp64", self.torch_trajectory(p, jitter=CHAOS_JITTER),
                                   self.torch_trajectory(p))
        note = (f"whole float64 trajectories {max(m.error for m in whole):.1e} apart, PyTorch "
                f"float64 from weights moved by {CHAOS_JITTER:.0e} up to "
                f"{max(m.error for m in spread):.1e} from itself: every step is checked from "
                "flaxres's own state")
        steps = self.check_trajectory_steps(steps=range(self.plan.steps), precision=p)
        for m in steps:
            m.note = note
        return steps

    def check_trajectory_steps(self, steps: Sequence[int] | None = None,
                               momentum: float | None = None, weight_decay: float | None = None,
                               precision: str = "fp32") -> list[Measure]:
        """flaxres's own trajectory at ``precision``, probed at ``steps`` (default: the plan's
        ``probed_steps``): from the weights, BatchNorm statistics and momentum buffers flaxres
        reached, PyTorch float64 takes the same
        SGD step on the same batch (the lr from PyTorch's schedulers); the loss, and every weight
        and running statistic after the step, are measured against it, in fp32 with PyTorch fp32
        taking that step (both layouts) as the floor. Comparing whole fp32 trajectories would measure
        the dynamics instead: a net at initialisation often amplifies a rounding-sized difference
        (a ReLU input crossing 0) into percents within 20 steps, in either framework (PyTorch
        fp32 ends 91% from float64 on resnet56). One step from shared weights amplifies nothing,
        while a wrong optimiser or BatchNorm update still shows (without weight decay the tiny
        nets' states are 2.5e-4 off, ~1000x their rounding error). ``momentum`` and
        ``weight_decay`` are PyTorch's step's if given (to show that the check sees either
        missing)."""
        plan = self.plan
        steps = plan.probed_steps if steps is None else steps
        momentum = plan.momentum if momentum is None else momentum
        weight_decay = plan.weight_decay if weight_decay is None else weight_decay
        lrs = torch_side.lrs(torch_schedulers(plan), plan.steps, base_lr=plan.lr)
        fp32 = precision == "fp32"
        losses64, states, pending = {}, [], None

        def probe(step: int, state: dict, buffers: dict, start: flaxres.ResNet,
                  after: dict[str, np.ndarray]) -> None:
            def run(torch_precision: str, layout: str = "nchw", relus=None) -> tuple[float, dict]:
                return torch_side.sgd_step(self.torch_model, state, buffers, self.batches[step],
                                           torch_precision, lrs[step], momentum, weight_decay,
                                           layout, relus)

            # PyTorch fp32 taking this step in each layout, run once for the loss and the state.
            plain32 = functools.cache(lambda: [run("fp32", lay) for lay in TORCH_LAYOUTS])

            def measure(state64: dict, relus=None, note: str = "") -> Measure:
                t32 = plain32 if relus is None else functools.cache(
                    lambda: [run("fp32", lay, relus) for lay in TORCH_LAYOUTS])
                return worst("step_state", precision, [
                    (f"step {step}: {k}", after.get(k), v)
                    + ((lambda k=k: tuple(t[1][k] for t in t32()),) if fp32 else ())
                    for k, v in state64.items()], TOL["step_state"], note=note)

            loss64, state64 = run("fp64")
            losses64[step] = (loss64,) + (
                (lambda: tuple(t[0] for t in plain32()),) if fp32 else ())
            m = measure(state64)
            if not m.ok and fp32:  # as check_grads: the gradient jumps where rounding crosses a
                relus = flax_side.train_relus(start, self._x(step)[1])  # ReLU kink
                m = measure(run("fp64", relus=relus)[1], relus,
                            "against PyTorch on flaxres fp32's side of every ReLU kink")
            states.append(m)

        def before_step(step: int, model: flaxres.ResNet, opt_state) -> None:
            nonlocal pending
            if pending:
                probe(*pending, named_arrays(model))
            pending = ((step, to_torch(model), momentum_buffers(model, opt_state),
                        nnx.clone(model)) if step in steps else None)

        losses, final = self.flax_trajectory(precision, before_step)
        if pending:
            probe(*pending, final)
        loss_pairs = [(f"step {k}", losses[k], *ref) for k, ref in losses64.items()]
        loss = worst("step_loss", precision, loss_pairs, TOL["step_loss"])
        if fp32 and not loss.ok:
            # The loss's fp32 rounding error is the net's, not one step's: PyTorch fp32's own
            # swings tenfold between the probed steps (resnet152: 2.0e-5 at step 0, 2.5e-4 at
            # step 1, and flaxres's at the same steps 9.6e-5 and 2.5e-4), so every step is held
            # to twice the largest of them.
            loss = worst("step_loss", precision, [p[:3] for p in loss_pairs], TOL["step_loss"],
                         note="against PyTorch fp32's largest loss error over the probed steps")
            loss.floor = max(fp32_floor(t32(), ref64) for ref64, t32 in losses64.values())
        # As check_grads: a step PyTorch fp32 itself cannot take says nothing.
        return [_flag_chaos(loss), _flag_chaos(max(states, key=lambda m: m.error / m.allowed))]

    def check_checkpoint(self) -> Measure:
        """Train the reference 3 steps in PyTorch, torch.save it bare and DataParallel-wrapped
        in an akamaster-style checkpoint dict, load each file into flaxres: the same predictions
        (in float64, so that fp32 rounding cannot blur a loading bug); and the file loaded into
        an fp32 model exports with to_torch() into a fresh reference (strict) bit-exactly."""
        ref = copy.deepcopy(self.torch_model).train()
        opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        for step in range(3):
            tx_, _, y = self._x(step)
            opt.zero_grad()
            F.cross_entropy(ref(tx_), torch.from_numpy(y).long()).backward()
            opt.step()
        tx_, jx, _ = self._x(-2, "fp64")
        with torch.no_grad():
            t64 = copy.deepcopy(ref).double().eval()(tx_).numpy()
        measures = []
        with tempfile.TemporaryDirectory() as d:
            bare, wrapped = os.path.join(d, "bare.pth"), os.path.join(d, "dp.pth")
            torch.save(ref.state_dict(), bare)
            torch.save({"epoch": 3, "state_dict": torch.nn.DataParallel(ref).state_dict(),
                        "optimizer": opt.state_dict()}, wrapped)
            for label, path in (("bare", bare), ("DataParallel", wrapped)):
                with self.numerics("fp64"):
                    model = self.model("fp64", source=path)
                    model.eval()
                    j = np.asarray(flax_side.forward(model, jx)[0])
                m = worst("checkpoint", "fp64", [(f"{label} logits", j, t64)], TOL["checkpoint"])
                m.extra_ok, m.note = same_classes(j, t64)
                measures.append(m)
            back = self.arch.build_torch()
            back.load_state_dict(to_torch(self.model("fp32", source=bare)), strict=True)
        want = ref.state_dict()
        m = max(measures, key=lambda m: m.error)
        if not all(torch.equal(v, want[k]) for k, v in back.state_dict().items()
                   if not k.endswith("num_batches_tracked")):
            m.extra_ok, m.note = False, "fp32 to_torch round trip not bit-exact"
        return m

    def check_blockwise(self) -> Measure:
        """Diagnostic: the jitted-blocks path the checks use (:mod:`parity.flax_side`) equals
        the plain un-jitted model, in eval and train mode, including the BN statistics; in
        float64, where two orders of the same fp32 operations cannot differ by more than the
        tolerance (in fp32, resnet164's stage-3 features did: 1.7e-4, jitted against eager)."""
        _, jx, _ = self._x(0, "fp64")
        pairs = []
        with self.numerics("fp64"):
            for train in (False, True):
                mode = "train" if train else "eval"
                fast, plain, fast_f, plain_f = (self.model("fp64") for _ in range(4))
                for m in (fast, plain, fast_f, plain_f):
                    m.train() if train else m.eval()
                logits, _ = flax_side.forward(fast, jx)
                pairs += [(f"{mode}:features[{i}]", a, b) for i, (a, b) in enumerate(
                    zip(flax_side.features(fast_f, jx), plain_f.features(jx), strict=True))]
                pairs.append((f"{mode}:logits", logits, plain(jx)))
                mine = named_arrays(fast)
                pairs += [(f"{mode}:{k}", mine.get(k), v) for k, v in named_arrays(plain).items()]
        return worst("blockwise", "fp64", pairs, TOL["blockwise"])
