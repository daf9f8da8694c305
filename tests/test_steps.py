"""The trainer's own step against PyTorch on one batch: the loss it minimises and reports is
``nn.CrossEntropyLoss(label_smoothing=...)`` (the batch mean), and its gradient is PyTorch's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import flaxres
from flaxres.convert import from_torch, named_arrays
from parity.reference import create_torch_model
from train import data, steps
from train.config import CIFAR_MEAN, CIFAR_STD

BATCH = 16


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_trainers_loss_and_gradient_are_pytorchs_cross_entropy(smoothing):
    torch.manual_seed(0)
    ref = create_torch_model("resnet8").train()
    model = from_torch(flaxres.cifar_resnet(8, rngs=nnx.Rngs(0)), ref.state_dict())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, BATCH).astype(np.int32)

    out = ref(torch.from_numpy(np.asarray(data.normalize(images, CIFAR_MEAN, CIFAR_STD))
                               .transpose(0, 3, 1, 2).copy()))
    want_loss = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
        out, torch.from_numpy(labels).long())
    want_loss.backward()
    want_grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}

    # SGD at lr 1 without momentum or decay: the parameters move by exactly minus the gradient.
    mesh = steps.make_mesh()
    train_def, _, state = steps.init_state(model, optax.sgd(1.0), seed=0)
    before = jax.tree.map(np.asarray, state.params)
    step = steps.jit_train_step(mesh, train_def, optax.sgd(1.0), batch_size=BATCH,
                                mean=CIFAR_MEAN, std=CIFAR_STD, augment=False,
                                label_smoothing=smoothing)
    state, metrics = step(state, steps.zero_metrics(), jnp.arange(BATCH), jnp.asarray(images),
                          jnp.asarray(labels), jnp.int32(0))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)

    loss = float(metrics["loss_sum"] / metrics["count"])
    assert loss == pytest.approx(want_loss.item(), rel=1e-5)
    got = named_arrays(model, grads)
    assert set(got) == set(want_grads)
    for name, g in got.items():
        np.testing.assert_allclose(g, want_grads[name], rtol=2e-3, atol=2e-6, err_msg=name)
