"""The flaxres side: the trainer's own jitted train step (``train.steps`` with
``train.optim.sgd``) and its inference, on one batch held on the device."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxres
from bench.speed import flops
from train import data, optim, steps

# The optimizer both frameworks step with (torch.optim.SGD(lr, momentum, weight_decay)).
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


@dataclass
class JaxRunner:
    """A built flaxres model: synchronous ``train`` / ``infer`` calls to time, and the pieces
    the end-to-end run and the weight export reuse."""

    model: flaxres.ResNet  # its initial weights, for flaxres.convert.to_torch
    train: Callable[[], None]
    infer: Callable[[], None]
    logits: Callable[[], np.ndarray]  # eval-mode logits of the batch, initial weights
    programs: Callable[[], dict[str, str]]  # compiled HLO of "train" and "infer" (the profile)
    flops_per_image: float  # forward
    mesh: jax.sharding.Mesh
    train_def: nnx.GraphDef
    tx: object
    initial_state: steps.TrainState


def normalized(images: np.ndarray, mean, std) -> np.ndarray:
    """What ``train.data.normalize`` makes of a uint8 batch, on the host (PyTorch's input)."""
    return np.asarray(data.normalize(jnp.asarray(images), mean, std))


def build(arch: str, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
          precision: str, cpu_ops: flaxres.CpuOps, mean, std) -> JaxRunner:
    """``images`` uint8 (N, H, W, 3) and ``labels`` go on the device once; each train call is one
    ``steps.train_step`` over all N of them (no augmentation), each infer call one
    ``steps.predict_probs``."""
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    model = flaxres.create_model(arch, num_classes=num_classes, dtype=dtype, cpu_ops=cpu_ops)
    tx = optim.sgd(LR, MOMENTUM, WEIGHT_DECAY)
    mesh = steps.make_mesh()
    rep = steps.replicated(mesh)
    train_def, eval_def, state = steps.init_state(model, tx, seed=0)
    # Copies: the train step donates its state, and the model keeps the initial weights.
    initial = jax.device_put(jax.tree.map(jnp.copy, state), rep)
    n = len(labels)
    step = steps.jit_train_step(mesh, train_def, tx, batch_size=n, mean=mean, std=std,
                                augment=False)
    predict = jax.jit(functools.partial(steps.predict_probs, eval_def, mean=mean, std=std))
    x, y = jax.device_put(images, rep), jax.device_put(labels, rep)
    perm, index = jnp.arange(n), jnp.int32(0)
    live = {"state": jax.tree.map(jnp.copy, initial),
            "metrics": jax.device_put(steps.zero_metrics(), rep)}
    eval_state = jax.tree.map(jnp.copy, initial)

    def train() -> None:
        live["state"], live["metrics"] = step(live["state"], live["metrics"], perm, x, y, index)
        live["metrics"]["loss_sum"].block_until_ready()

    def infer() -> None:
        predict(eval_state, x).block_until_ready()

    def forward(s: steps.TrainState, u8: jax.Array) -> jax.Array:
        return nnx.merge(eval_def, s.params, s.batch_stats)(data.normalize(u8, mean, std))

    def programs() -> dict[str, str]:
        return {"train": step.lower(live["state"], live["metrics"], perm, x, y, index)
                .compile().as_text(),
                "infer": predict.lower(eval_state, x).compile().as_text()}

    return JaxRunner(model=model, train=train, infer=infer,
                     logits=lambda: np.asarray(jax.jit(forward)(eval_state, x), np.float64),
                     programs=programs,
                     flops_per_image=flops.flops_per_image(forward, eval_state, x[:1]),
                     mesh=mesh, train_def=train_def, tx=tx, initial_state=initial)
