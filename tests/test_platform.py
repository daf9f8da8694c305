"""Which code each platform runs, read from ``jax.export`` (no GPU needed), and bf16 training.

The CPU fast paths of :mod:`flaxres.ops` are chosen per platform *inside the traced program*:
an export for CUDA must hold plain convolutions only (cuDNN's forward, input-gradient and
weight-gradient kernels), an export for the CPU the measured-fastest path (the weight gradient as
a scan of GEMMs, docs/performance.md).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxres
from flaxres.cpu import onednn

# ResNet-20: 19 convolutions (stem, 18 in blocks; option-A shortcuts have none). A train gradient
# needs each one's forward and weight gradient, and an input gradient for all but the stem's.
R20_CONVS = 19
R20_LAX_TRAIN_CONVS = 19 + 18 + 19


def _train_grad_module(platform: str, cpu_ops: flaxres.CpuOps = flaxres.CpuOps(),
                       dtype=jnp.float32) -> str:
    model = flaxres.create_model("resnet20", cpu_ops=cpu_ops, dtype=dtype)
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def grad_fn(params, stats, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p, stats, copy=True)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jax.grad(loss)(params)

    x = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((128,), jnp.int32)
    exported = jax.export.export(jax.jit(grad_fn), platforms=[platform])(params, stats, x, y)
    return exported.mlir_module()


def _count(module: str, op: str) -> int:
    return len(re.findall(rf"\bstablehlo\.{op}\b", module))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_cuda_export_is_plain_lax(dtype):
    """No CPU scan on the GPU: every convolution of the train step is a convolution op."""
    module = _train_grad_module("cuda", dtype=dtype)
    assert _count(module, "while") == 0
    assert _count(module, "convolution") == R20_LAX_TRAIN_CONVS


def test_cuda_export_has_no_onednn():
    """CpuOps(conv="onednn") changes only the CPU branch: the CUDA export is the same plain
    program, without a oneDNN custom call."""
    module = _train_grad_module("cuda", flaxres.CpuOps(conv="onednn"))
    assert "flaxres_onednn" not in module and _count(module, "custom_call") == 0
    assert _count(module, "while") == 0
    assert _count(module, "convolution") == R20_LAX_TRAIN_CONVS


@pytest.mark.skipif(onednn.extension_path() is None, reason="oneDNN extension not built")
def test_cpu_program_with_onednn_has_no_xla_convolutions():
    """On the CPU every convolution of the train step is a oneDNN call: each layer's forward and
    weight gradient, and an input gradient for all but the stem's; so is every BatchNorm (one per
    convolution in ResNet-20), forward and backward."""
    model = flaxres.create_model("resnet20", cpu_ops=flaxres.CpuOps(conv="onednn"))
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)

    def grad_fn(params, x):
        return jax.grad(lambda p: nnx.merge(graphdef, p, stats, copy=True)(x).sum())(params)

    text = jax.jit(grad_fn).lower(params, x).as_text()
    assert _count(text, "convolution") == 0
    assert (text.count("@flaxres_onednn_conv_fwd"), text.count("@flaxres_onednn_conv_bwd_data"),
            text.count("@flaxres_onednn_conv_bwd_weights")) == (R20_CONVS, R20_CONVS - 1, R20_CONVS)
    assert (text.count("@flaxres_onednn_bn_fwd"), text.count("@flaxres_onednn_bn_bwd")) == (
        R20_CONVS, R20_CONVS)


@pytest.mark.skipif(onednn.extension_path() is None, reason="oneDNN extension not built")
def test_cpu_inference_with_onednn_is_one_call_per_convolution():
    """In eval mode each convolution of ResNet-20 carries its BatchNorm, residual add and ReLU as
    oneDNN post-ops: 19 fused calls, no other convolution, no elementwise pass left over them."""
    model = flaxres.create_model("resnet20")
    model.eval()
    text = jax.jit(lambda x: model(x)).lower(jnp.zeros((2, 32, 32, 3))).as_text()
    assert text.count("@flaxres_onednn_conv_bn_fwd") == R20_CONVS
    assert text.count("@flaxres_onednn_conv_fwd") == 0 and _count(text, "convolution") == 0


def test_cpu_export_uses_fast_paths():
    """With XLA's convolutions (the default's oneDNN calls are outside jax.export's custom-call
    allowlist), the CPU export holds the weight-gradient scan per convolution (the
    measured-fastest XLA path at batch 128) and no weight-gradient convolutions; CpuOps.off()
    gives the plain program."""
    fast = _train_grad_module("cpu", flaxres.CpuOps(conv="xla"))
    assert _count(fast, "while") == R20_CONVS
    assert _count(fast, "convolution") == R20_LAX_TRAIN_CONVS - R20_CONVS
    plain = _train_grad_module("cpu", flaxres.CpuOps.off())
    assert _count(plain, "while") == 0
    assert _count(plain, "convolution") == R20_LAX_TRAIN_CONVS


def _one_step(dtype):
    """Loss, new parameters and new BatchNorm statistics after one SGD step (lr 0.1, momentum,
    weight decay) of resnet20 on a fixed random batch, from the same fp32 initial weights."""
    model = flaxres.create_model("resnet20", dtype=dtype)
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def step(params, stats):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, stats, copy=True)
            logits = m(x)
            return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                    nnx.state(m, nnx.BatchStat))
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, optax.apply_updates(params, updates), new_stats, grads

    return step(params, stats)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Measured on the 2-core CPU (resnet20, batch 64), relative to the fp32 step: loss 6.9e-5,
# gradients 6.7e-2 (whole tree; bf16 keeps 8 mantissa bits through 19 layers), parameters after
# the step 5.5e-4, BatchNorm running statistics 1.9e-4. The bounds are about 2-3x those.
BF16_TOL = {"loss": 2e-4, "grads": 0.15, "params": 1.5e-3, "stats": 6e-4}


def test_bf16_step_close_to_fp32():
    """--precision bf16: bf16 compute, fp32 parameters and fp32 BatchNorm statistics, one step
    within BF16_TOL of the fp32 step."""
    l32, p32, s32, g32 = _one_step(jnp.float32)
    l16, p16, s16, g16 = _one_step(jnp.bfloat16)
    for tree in (p16, s16):
        assert {a.dtype for a in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
    got = {"loss": _rel(l16, l32), "grads": _rel(flat(g16), flat(g32)),
           "params": _rel(flat(p16), flat(p32)), "stats": _rel(flat(s16), flat(s32))}
    assert all(got[k] <= BF16_TOL[k] for k in got), got
    assert got["grads"] > 1e-5, "bf16 compute did not happen (identical to fp32)"
