"""The flaxres side of the parity checks: the model's own ``__call__``, ``features`` and the
trainer's loss, made affordable for 1000-layer nets on two cores.

Compiling a deep net whole costs minutes per net, so within :func:`jitted_blocks` each residual
block's own ``__call__`` runs as one jitted pure function of (graph definition, weights, input):
equal blocks (all but the first of a stage, and across depths) share one executable, so
ResNet-1202 compiles as fast as ResNet-20. Everything else (stem, max-pool, stage order, pooling,
fc) runs un-jitted from the model's own code; ``parity/test_forward.py``'s blockwise check proves
the jitted blocks change nothing. ``relus`` records where every ReLU input is > 0, or applies
such a record in place of the inputs' own signs (see ``Case.check_grads``), also for the ReLUs
that BatchNorm fuses (``relu=True``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxres import ops
from flaxres.models import BasicBlock, Bottleneck, ResNet


def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The trainer's loss (mean cross-entropy), in the logits' precision: the trainer's
    ``train.steps.cross_entropy`` casts to fp32 (for bf16 logits), which would put fp32 rounding
    into the float64 proof (test_training_path checks the trainer's own)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class _Relus:
    """Records ``v > 0`` at each ReLU, or (given a record) gates the inputs by it."""

    def __init__(self, given: list | None = None):
        self.seen: list = []
        self.given = None if given is None else iter(given)

    def __call__(self, v: jax.Array) -> jax.Array:
        if self.given is None:
            self.seen.append(v > 0)
            return jax.nn.relu(v)
        return jnp.where(next(self.given), v, jnp.zeros_like(v))


_batch_norm_train = ops.batch_norm_train


def _batch_norm_relus(x, scale, bias, epsilon, *, relu=False, cpu=ops.CpuOps()):
    """ops.batch_norm_train whose fused ReLU joins the record of the ``_Relus`` that replaces
    ``nnx.relu`` at the time: recorded as ``y > 0`` (the same as its input > 0), or, given a
    record, applied to the unfused output."""
    if not relu:
        return _batch_norm_train(x, scale, bias, epsilon, cpu=cpu)
    record = nnx.relu
    if record.given is None:
        y, mean, var = _batch_norm_train(x, scale, bias, epsilon, relu=True, cpu=cpu)
        record.seen.append(y > 0)
        return y, mean, var
    y, mean, var = _batch_norm_train(x, scale, bias, epsilon, cpu=cpu)
    return record(y), mean, var


def _block_impl(call, graphdef, state, x, given):
    """One block's own ``__call__``: output, its new BatchNorm statistics, its ReLU record."""
    block, relus = nnx.merge(graphdef, state, copy=True), _Relus(given)
    with mock.patch.object(nnx, "relu", relus):  # the block's own ReLUs, within its trace
        y = call(block, x)
    return y, nnx.state(block, nnx.BatchStat), relus.seen


_block_jit = jax.jit(_block_impl, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_vjp(call, graphdef, state, x, given, gy):
    """The block's vjp, its forward recomputed: one executable per kind of block."""
    _, vjp = jax.vjp(lambda s, v: _block_impl(call, graphdef, s, v, given)[0], state, x)
    return vjp(gy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block(call, graphdef, state, x, given):
    return _block_jit(call, graphdef, state, x, given)


def _block_fwd(call, graphdef, state, x, given):
    return _block_jit(call, graphdef, state, x, given), (state, x, given)


def _block_bwd(call, graphdef, residuals, cotangents):
    state, x, given = residuals
    g_state, g_x = _block_vjp(call, graphdef, state, x, given, cotangents[0])
    return g_state, g_x, None


# Under an outer (un-jitted) gradient, a block runs its compiled forward and, backwards, one
# compiled vjp: JAX's own differentiation of a jitted call would compile each block three times.
_block.defvjp(_block_fwd, _block_bwd)


@contextlib.contextmanager
def jitted_blocks(relus: list | None = None) -> Iterator[list]:
    """Within: every BasicBlock / Bottleneck call runs jitted (see the module docstring), and
    the yielded list fills with the ReLU record (per stem ReLU an array, per block a list), or,
    given ``relus`` (such a record), each ReLU applies it instead of its input's signs."""
    top = _Relus(relus)
    originals = {cls: cls.__dict__["__call__"] for cls in (BasicBlock, Bottleneck)}

    def run(cls):
        def call(self, x, rngs=None):  # the parity cases have no dropout to draw
            graphdef, state = nnx.split(self)
            given = None if top.given is None else next(top.given)
            y, stats, seen = _block(originals[cls], graphdef, state, x, given)
            nnx.update(self, stats)
            if top.given is None:
                top.seen.append(seen)
            return y
        return call

    with contextlib.ExitStack() as stack:
        for cls in originals:
            stack.enter_context(mock.patch.object(cls, "__call__", run(cls)))
        stack.enter_context(mock.patch.object(nnx, "relu", top))  # the stem's ReLU
        stack.enter_context(mock.patch.object(ops, "batch_norm_train", _batch_norm_relus))
        yield top.seen


def flat_relus(record: list) -> list[np.ndarray]:
    """A ReLU record in call order, one array per ReLU (as PyTorch runs them)."""
    out = []
    for r in record:
        out += [np.asarray(a) for a in r] if isinstance(r, list) else [np.asarray(r)]
    return out


def train_relus(model: ResNet, x: jax.Array) -> list[np.ndarray]:
    """Where each ReLU input is > 0 in a train-mode forward of ``model`` (left unchanged), in
    PyTorch's call order: the pattern :func:`parity.torch_side.relu_pattern` applies."""
    probe = nnx.clone(model)
    probe.train()
    return flat_relus(forward(probe, x)[1])


def forward(model: ResNet, x: jax.Array, relus: list | None = None) -> tuple[jax.Array, list]:
    """Logits of the model's own ``__call__`` (BatchNorm statistics update in train mode), and
    its ReLU record."""
    with jitted_blocks(relus) as seen:
        return model(x), seen


def features(model: ResNet, x: jax.Array) -> list[jax.Array]:
    """The model's own ``features``: stem output and each stage's output."""
    with jitted_blocks():
        return model.features(x)


def loss_and_grads(model: ResNet, x: jax.Array, y: jax.Array, relus: list | None = None
                   ) -> tuple[jax.Array, jax.Array, nnx.State, nnx.State]:
    """The trainer's loss (mean cross-entropy of the model's own logits): loss, logits, its
    gradient w.r.t. every parameter, and the BatchNorm statistics after the forward pass."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        with jitted_blocks(relus):
            logits = m(x)
        return loss_fn(logits, y), (logits, nnx.state(m, nnx.BatchStat))

    (loss, (logits, stats)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, logits, grads, stats


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(graphdef: nnx.GraphDef, tx, params: nnx.State, rest: nnx.State, opt_state,
               x: jax.Array, y: jax.Array):
    """One SGD step of the model's own ``__call__`` and the trainer's loss, compiled whole: for
    the tiny trajectory nets, where one compile beats per-block dispatch over 20 steps."""
    def f(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return loss_fn(m(x), y), nnx.state(m, nnx.BatchStat)

    (loss, stats), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), stats, opt_state
