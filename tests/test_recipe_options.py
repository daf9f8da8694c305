"""torchvision's recipe options against PyTorch: the weight-decay groups of its reference trainer
(``--norm-weight-decay``, ``--bias-weight-decay``), an SGD update with those groups, and its
``ExponentialMovingAverage`` as its training loop updates it (``--model-ema``)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn
from torch.optim.swa_utils import AveragedModel

import flaxres
from flaxres.convert import from_torch, named_arrays
from parity.reference import create_torch_model
from train import optim, steps

CODES = {"other": 0, "norm": 1, "bias": 2}


def torchvision_groups(model: nn.Module, norm: bool, bias: bool) -> dict[str, str]:
    """references/classification/utils.py ``set_weight_decay``: the custom key 'bias' first, then
    the parameters of norm layers, then the rest."""
    groups = {}

    def add(module: nn.Module, prefix: str) -> None:
        for name, _ in module.named_parameters(recurse=False):
            if bias and name == "bias":
                group = "bias"
            elif norm and isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                              nn.LayerNorm)):
                group = "norm"
            else:
                group = "other"
            groups[prefix + name] = group
        for name, child in module.named_children():
            add(child, f"{prefix}{name}.")

    add(model, "")
    return groups


def flaxres_groups(model: nnx.Module, norm: bool, bias: bool) -> dict[str, str]:
    params = nnx.state(model, nnx.Param)
    labels = optim.decay_groups(params, norm=norm, bias=bias)
    coded = jax.tree.map(lambda g, p: np.full(p.shape, CODES[g]), labels, params)
    names = {v: k for k, v in CODES.items()}
    return {k: names[int(a.flat[0])] for k, a in named_arrays(model, coded).items()}


@pytest.mark.parametrize("arch", ["resnet20", "resnet50", "preact_resnet18"])
@pytest.mark.parametrize("norm,bias", [(True, False), (False, True), (True, True)])
def test_weight_decay_groups_are_torchvisions(arch, norm, bias):
    classes = flaxres.default_cfg(arch).num_classes
    model = flaxres.create_model(arch, num_classes=classes)
    want = torchvision_groups(create_torch_model(arch, classes), norm, bias)
    assert flaxres_groups(model, norm, bias) == want


def test_sgd_with_decay_groups_steps_as_torch_sgd_with_param_groups():
    torch.manual_seed(0)
    ref = create_torch_model("resnet8")
    model = from_torch(flaxres.cifar_resnet(8, rngs=nnx.Rngs(0)), ref.state_dict())
    groups = torchvision_groups(ref, norm=True, bias=True)
    rates = {"other": 1e-2, "norm": 0.0, "bias": 5e-3}  # large, so a wrong group shows
    named = dict(ref.named_parameters())
    opt = torch.optim.SGD([{"params": [p for k, p in named.items() if groups[k] == g],
                            "weight_decay": r} for g, r in rates.items()], lr=0.1, momentum=0.9)
    tx = optim.sgd(0.1, 0.9, rates["other"], norm_weight_decay=rates["norm"],
                   bias_weight_decay=rates["bias"])
    grads = {k: torch.randn_like(p) for k, p in named.items()}
    grad_model = from_torch(copy.deepcopy(model), {k: g.numpy() for k, g in grads.items()},
                            strict=False)
    params, g = nnx.state(model, nnx.Param), nnx.state(grad_model, nnx.Param)
    state = tx.init(params)
    for scale in (1.0, -0.5):
        for k, p in named.items():
            p.grad = scale * grads[k]
        opt.step()
        updates, state = tx.update(jax.tree.map(lambda a, s=scale: s * a, g), state, params)
        params = optax.apply_updates(params, updates)
    got = named_arrays(model, params)
    for k, p in named.items():
        np.testing.assert_allclose(got[k], p.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


class ExponentialMovingAverage(AveragedModel):
    """torchvision's references/classification/utils.py, verbatim in substance."""

    def __init__(self, model: nn.Module, decay: float):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, "cpu", ema_avg, use_buffers=True)


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_ema_follows_torchvisions_loop(warmup_epochs):
    epochs, spe, every, decay = 4, 5, 2, 0.9
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema_ref = ExponentialMovingAverage(net, decay)
    rule = steps.Ema(decay, every, spe, copy_until=warmup_epochs * spe)

    def tensors(module):
        return ({k: v for k, v in module.named_parameters()},
                {k: v for k, v in module.named_buffers() if k.endswith(("mean", "var"))})

    def as_jax(module):
        p, b = tensors(module)
        return ({k: jnp.asarray(v.detach().numpy()) for k, v in p.items()},
                {k: jnp.asarray(v.numpy()) for k, v in b.items()})

    params, stats = as_jax(net)
    ema = {"params": params, "batch_stats": stats}
    step = 0
    for epoch in range(epochs):
        for i in range(spe):
            with torch.no_grad():  # an optimizer step: new weights and statistics
                for t in (*tensors(net)[0].values(), *tensors(net)[1].values()):
                    t.copy_(torch.randn_like(t))
            step += 1
            if i % every == 0:  # torchvision's train_one_epoch
                ema_ref.update_parameters(net)
                if epoch < warmup_epochs:
                    ema_ref.n_averaged.fill_(0)
            ema = rule.update(ema, *as_jax(net), jnp.int32(step))
            want_p, want_b = as_jax(ema_ref.module)
            for got, want in ((ema["params"], want_p), (ema["batch_stats"], want_b)):
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7,
                                               err_msg=f"{k} after step {step}")
