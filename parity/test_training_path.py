"""The trainer's own training path against a PyTorch loop, step by step.

flaxres side: ``train.loop.setup`` as ``train.cifar`` calls it (the config's optimizer and lr
schedule, ``init_state``, the jitted ``train_step`` with its loss and BatchNorm update, the
dataset on device, the trainer's data order), started from the PyTorch reference's weights in
float64, augmentation off, on uint8 images from ``train.synthetic``. PyTorch side: the same net
and batches in the trainer's order, ``torch.optim.SGD`` and PyTorch's own schedulers
(``MultiStepLR``, ``ConstantLR`` warm-up in ``SequentialLR``, ``CosineAnnealingLR``), stepped
every iteration. Both in float64 (the trainer's normalisation and loss stay fp32, so the bound is
fp32 rounding carried through a few steps), at an lr and weight decay where dropping the decay
moves the result far beyond the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import flaxres
from flaxres.convert import from_torch, named_arrays
from parity import torch_side
from parity.measure import rel_err
from parity.reference import create_torch_model
from parity.schedules import torch_scheduler
from train import data as train_data
from train import loop, synthetic
from train.config import Config

N_TRAIN, BATCH, EPOCHS = 32, 8, 4
SPE = N_TRAIN // BATCH
TOL = {"loss": 1e-5, "state": 1e-4, "lr": 1e-6}
COMMON = {"arch": "resnet8", "batch_size": BATCH, "epochs": EPOCHS, "lr": 0.1, "momentum": 0.9,
          "weight_decay": 5e-3, "augment": False}
CONFIGS = {
    "multistep": Config(schedule="multistep", milestones=(2, 3), **COMMON),
    "multistep+warmup": Config(schedule="multistep", milestones=(2, 3), warmup="on",
                               warmup_steps=3, **COMMON),
    "cosine+warmup": Config(schedule="cosine", warmup="on", warmup_steps=3, **COMMON),
}


@pytest.fixture(scope="module")
def data() -> train_data.Arrays:
    xtr, ytr, xte, yte = synthetic.make_arrays(N_TRAIN, 1, seed=0)
    return train_data.Arrays(xtr, ytr, xte, yte, train_data.CIFAR10_CLASSES)


def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_torch_model("resnet8")


def torch_run(cfg: Config, data: train_data.Arrays, order: list[np.ndarray],
              weight_decay: float | None = None) -> dict:
    """The loop of the popular CIFAR scripts, in float64 on the trainer's fp32 normalisation,
    over the batches ``order`` gives (one permutation per epoch)."""
    xtr, ytr = data.train_images, data.train_labels
    model = reference().double().train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
                          nesterov=cfg.nesterov)
    sched = torch_scheduler(cfg, opt, SPE)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
    losses, lrs = [], []
    for perm in order:
        for i in range(SPE):
            idx = perm[i * BATCH:(i + 1) * BATCH]
            x = torch.from_numpy(xtr[idx]).permute(0, 3, 1, 2).float()
            x = ((x / 255 - mean) / std).double()
            lrs.append(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(model(x), torch.from_numpy(ytr[idx]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return {"losses": losses, "lrs": lrs, "state": torch_side.numpy_state(model)}


def flax_run(cfg: Config, data: train_data.Arrays) -> dict:
    """The trainer's Run (``train.loop.setup``) from the reference's weights, in float64."""
    with jax.enable_x64(True):
        model = from_torch(flaxres.cifar_resnet(8, dtype=jnp.float64, param_dtype=jnp.float64,
                                                rngs=nnx.Rngs(0)), reference().state_dict())
        run = loop.setup(cfg, data, SPE, model=model)
        losses, order = [], []
        for epoch in range(EPOCHS):
            perm = run.permute(epoch)
            order.append(np.asarray(perm))
            for i in range(SPE):
                metrics = loop.zero_metrics(run)
                run.state, metrics = run.train_step(run.state, metrics, perm, run.train_x,
                                                    run.train_y, jnp.int32(i))
                losses.append(float(metrics["loss_sum"]) / BATCH)
        final = nnx.merge(run.eval_def, run.state.params, run.state.batch_stats)
        return {"losses": losses, "state": named_arrays(final), "order": order,
                "lrs": [float(run.schedule(t)) for t in range(EPOCHS * SPE)]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_path_equals_pytorch(name: str, data):
    cfg = CONFIGS[name]
    mine = flax_run(cfg, data)
    theirs = torch_run(cfg, data, mine["order"])
    lr_bad = [t for t, (a, b) in enumerate(zip(mine["lrs"], theirs["lrs"], strict=True))
              if abs(a - b) > TOL["lr"] * b]
    assert not lr_bad, f"lr differs from PyTorch's scheduler from iteration {lr_bad[0]}"
    loss_err = max(rel_err(a, b) for a, b in zip(mine["losses"], theirs["losses"], strict=True))
    assert loss_err <= TOL["loss"], loss_err
    assert set(mine["state"]) == set(theirs["state"])
    worst = max((rel_err(mine["state"][k], v), k) for k, v in theirs["state"].items())
    assert worst[0] <= TOL["state"], worst
    # The bar is sharp: without weight decay PyTorch itself ends far outside it.
    no_decay = torch_run(cfg, data, mine["order"], weight_decay=0.0)["state"]
    moved = max(rel_err(no_decay[k], v) for k, v in theirs["state"].items())
    assert moved > 10 * TOL["state"], moved
