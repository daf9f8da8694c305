"""Pure training and evaluation steps over ``(graphdef, state)``, jitted with shardings.

The model is split once with ``nnx.split``; inside the jitted functions ``nnx.merge`` rebuilds it
at trace time only, so the hot path runs no Python graph traversal. Train and eval mode live in
two graphdefs (BatchNorm's ``use_running_average`` is static structure). The whole dataset sits
on the device as uint8; a step gathers its batch by index, augments and normalises it on device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train import data


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; checkpointed whole, so resuming reproduces the run."""

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32, optimizer steps taken
    key: jax.Array  # uint32[2], base key of the per-step augmentation keys
    ema: dict | None = None  # {"params", "batch_stats"} averaged (--ema-decay), else None


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
               ema: bool = False) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Splits ``model`` into train/eval graphdefs and the state the steps carry; with ``ema``,
    the state starts an average of the weights and statistics from a copy of them."""
    model.eval()
    eval_def = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
    model.train()
    train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # distinct from the init/order keys
    # Copies: a step donates the state's buffers, each only once.
    average = jax.tree.map(jnp.copy, {"params": params, "batch_stats": stats}) if ema else None
    return train_def, eval_def, TrainState(params, stats, tx.init(params),
                                           jnp.zeros((), jnp.int32), key, average)


@dataclasses.dataclass(frozen=True)
class Ema:
    """An exponential moving average of the weights and BatchNorm statistics, kept as
    torchvision's reference trainer keeps its ``ExponentialMovingAverage`` (an ``AveragedModel``
    over parameters and buffers): after iteration ``i`` of each epoch with ``i % every == 0``,
    ``ema = decay * ema + (1 - decay) * current``; an update copies the current values instead
    while no earlier update came after the warm-up (``copy_until`` steps), as torchvision
    restarts the average during the warm-up epochs and its first update copies."""

    decay: float
    every: int
    steps_per_epoch: int
    copy_until: int = 0

    def update(self, ema: dict, params: nnx.State, batch_stats: nnx.State, step: jax.Array
               ) -> dict:
        """``ema`` after optimizer step ``step`` (1 for the first) produced ``params`` and
        ``batch_stats``."""
        i = (step - 1) % self.steps_per_epoch  # the iteration's index in its epoch
        due = i % self.every == 0
        # The previous update: ``every`` steps back, or the last one of the previous epoch.
        previous = jnp.where(i >= self.every, step - self.every,
                             step - 1 - (self.steps_per_epoch - 1) % self.every)
        copy = previous <= self.copy_until

        def mix(e, p):
            return jnp.where(due, jnp.where(copy, p, self.decay * e + (1 - self.decay) * p),
                             e).astype(e.dtype)

        return jax.tree.map(mix, ema, {"params": params, "batch_stats": batch_stats})


def zero_metrics() -> dict[str, jax.Array]:
    """Running sums for one epoch: loss x images, correct predictions, images, non-finite losses."""
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count", "nonfinite")}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
    """Per-image cross-entropy, as PyTorch's ``CrossEntropyLoss(label_smoothing=...)``: the
    one-hot target mixed with the uniform distribution over the classes."""
    logits = logits.astype(jnp.float32)
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, target)


def train_batch(state: TrainState, perm: jax.Array, images: jax.Array, labels: jax.Array,
                index: jax.Array, *, batch_size: int, augment: bool,
                batch_sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
    """Batch ``index`` of the epoch order ``perm`` as uint8 images and labels, sharded over the
    devices; with ``augment`` padded, cropped and flipped under the step's own key, a function
    of the run's seed and its step count only. So every step and every epoch draws new crops,
    each device's shard different ones, and a resumed run the ones it would have drawn."""
    idx = jax.lax.dynamic_slice_in_dim(perm, index * batch_size, batch_size)
    x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)
    if augment:
        x = data.augment(jax.random.fold_in(state.key, state.step), x)
    return x, y


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
               metrics: dict[str, jax.Array], perm: jax.Array, images: jax.Array,
               labels: jax.Array, index: jax.Array, *, batch_size: int, mean: Sequence[float],
               std: Sequence[float], augment: bool, batch_sharding: NamedSharding,
               probe: bool = False, **objective) -> tuple:
    """One SGD step on batch ``index`` of the epoch order ``perm`` of a dataset on the device
    (:func:`train_batch`, then :func:`batch_step`)."""
    x, y = train_batch(state, perm, images, labels, index, batch_size=batch_size,
                       augment=augment, batch_sharding=batch_sharding)
    return batch_step(graphdef, tx, state, metrics, x, y, batch_size=batch_size, mean=mean,
                      std=std, probe=probe, **objective)


def batch_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
               metrics: dict[str, jax.Array], x: jax.Array, y: jax.Array, *, batch_size: int,
               mean: Sequence[float], std: Sequence[float], probe: bool = False,
               label_smoothing: float = 0.0, ema: Ema | None = None) -> tuple:
    """One SGD step (mean cross-entropy, with ``label_smoothing``) on a uint8 batch ``x`` with
    labels ``y``, already gathered and augmented (on the device, or by a streaming input
    pipeline); the state's EMA moves by the rule ``ema``.

    Returns ``(state, metrics)``; with ``probe`` (static) also a third item, the measurements of
    the degradation study (``train.degradation``) taken from this very step, so they cost no
    second forward or backward pass: ``grad_norm`` (the L2 norm of each weight kernel's gradient,
    keyed by its dotted module path, e.g. ``layer2.0.conv1``), ``act_std`` (the std of the stem's
    and every block's output, in depth order) and ``logit_std`` (the logits' spread over the
    batch, mean over classes: near 0 when the net ignores its input).
    """
    x = data.normalize(x, mean, std)

    def loss_fn(params):
        # copy=True: fresh Variables at the grad trace level, so BatchNorm may update its stats.
        model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
        # Dropout's masks: a key of the step's own, apart from the augmentation's.
        rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.fold_in(state.key, state.step), 1))
        if probe:  # the same forward as model(x), keeping every block's output
            feats = model.features(x, every_block=True, rngs=rngs)
            logits = model.forward_head(model.head_norm(feats[-1]))
            act_std = jnp.stack([f.astype(jnp.float32).std() for f in feats])
        else:
            logits, act_std = model(x, rngs), None
        stats = nnx.state(model, nnx.BatchStat)
        return cross_entropy(logits, y, label_smoothing).mean(), (logits, stats, act_std)

    (loss, (logits, stats, act_std)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    average = state.ema if ema is None else ema.update(state.ema, params, stats, state.step + 1)
    new = TrainState(params, stats, opt_state, state.step + 1, state.key, average)
    metrics = {
        "loss_sum": metrics["loss_sum"] + loss * batch_size,
        "correct": metrics["correct"] + (logits.argmax(-1) == y).sum(),
        "count": metrics["count"] + batch_size,
        "nonfinite": metrics["nonfinite"] + ~jnp.isfinite(loss),
    }
    if not probe:
        return new, metrics
    grad_norm = {".".join(map(str, path[:-1])): jnp.linalg.norm(g[...].astype(jnp.float32))
                 for path, g in nnx.to_flat_state(grads) if path[-1] == "kernel"}
    logit_std = logits.astype(jnp.float32).std(axis=0).mean()
    return new, metrics, {"grad_norm": grad_norm, "act_std": act_std, "logit_std": logit_std}


def eval_step(graphdef: nnx.GraphDef, state: TrainState, metrics: dict[str, jax.Array],
              images: jax.Array, labels: jax.Array, index: jax.Array, *, batch_size: int,
              num_valid: int, mean: Sequence[float], std: Sequence[float],
              batch_sharding: NamedSharding) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over eval batch ``index`` of a split on the device;
    rows past ``num_valid`` (padding to a whole batch) are masked out."""
    start = index * batch_size
    x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
    y = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    valid = (start + jnp.arange(batch_size)) < num_valid
    return eval_batch(graphdef, state, metrics, x, y, valid, mean=mean, std=std)


def eval_batch(graphdef: nnx.GraphDef, state: TrainState, metrics: dict[str, jax.Array],
               x: jax.Array, y: jax.Array, valid: jax.Array, *, mean: Sequence[float],
               std: Sequence[float]) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the rows of a uint8 batch where ``valid``."""
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    logits = model(data.normalize(x, mean, std))
    loss = jnp.where(valid, cross_entropy(logits, y), 0.0)
    return {
        "loss_sum": metrics["loss_sum"] + loss.sum(),
        "correct": metrics["correct"] + ((logits.argmax(-1) == y) & valid).sum(),
        "count": metrics["count"] + valid.sum(),
        "nonfinite": metrics["nonfinite"] + (~jnp.isfinite(loss)).sum(),
    }


def predict_logits(graphdef: nnx.GraphDef, state: TrainState, images: jax.Array, *,
                   mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Logits of a uint8 batch (eval mode)."""
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    return model(data.normalize(images, mean, std))


def predict_probs(graphdef: nnx.GraphDef, state: TrainState, images: jax.Array, *,
                  mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Class probabilities of a uint8 batch (eval mode)."""
    return jax.nn.softmax(predict_logits(graphdef, state, images, mean=mean, std=std))


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process: pure data parallelism on axis 'data'."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def jit_train_step(mesh: Mesh, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   **static) -> Callable:
    """``train_step`` with everything but the arrays bound; state and metrics buffers donated."""
    rep = replicated(mesh)
    fn = functools.partial(train_step, graphdef, tx, batch_sharding=NamedSharding(mesh, P("data")),
                           **static)
    outs = (rep, rep, rep) if static.get("probe") else (rep, rep)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=outs)


def jit_eval_step(mesh: Mesh, graphdef: nnx.GraphDef, **static) -> Callable:
    fn = functools.partial(eval_step, graphdef, batch_sharding=NamedSharding(mesh, P("data")),
                           **static)
    return jax.jit(fn, donate_argnums=(1,), out_shardings=replicated(mesh))


def jit_batch_step(mesh: Mesh, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   **static) -> Callable:
    """``batch_step`` for global batches the input pipeline made; state and metrics donated."""
    rep = replicated(mesh)
    fn = functools.partial(batch_step, graphdef, tx, **static)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=(rep, rep))


def jit_eval_batch(mesh: Mesh, graphdef: nnx.GraphDef, **static) -> Callable:
    return jax.jit(functools.partial(eval_batch, graphdef, **static), donate_argnums=(1,),
                   out_shardings=replicated(mesh))
