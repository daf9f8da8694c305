"""flaxres.ops.conv_general_dilated computes the same function as lax.conv_general_dilated.

Correctness only (outputs and both gradients to fp32 noise); speed lives in ``python -m bench.speed``.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flaxres import ops

DN = ("NHWC", "HWIO", "NHWC")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def both(x, w, strides, padding, groups=1, dtype=jnp.float32):
    x, w = x.astype(dtype), w.astype(dtype)
    rng = np.random.default_rng(1)

    def run(conv):
        def f(x, w):
            return conv(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)
        y = jax.jit(f)(x, w)
        g = jnp.asarray(rng.standard_normal(y.shape), dtype)
        dx, dw = jax.jit(lambda x, w: jax.vjp(f, x, w)[1](g))(x, w)
        return y, dx, dw

    rng = np.random.default_rng(1)
    ref = run(lax.conv_general_dilated)
    rng = np.random.default_rng(1)
    new = run(ops.conv_general_dilated)
    return ref, new


CASES = [  # (n, h, cin, cout, k, stride, pad, groups)
    (8, 32, 16, 16, 3, 1, 1, 1),    # CIFAR 3x3
    (7, 16, 16, 32, 3, 2, 1, 1),    # strided, odd batch (chunk padding)
    (6, 9, 8, 12, 3, 2, 1, 1),      # odd spatial size with stride
    (8, 8, 32, 64, 1, 1, 0, 1),     # 1x1
    (8, 16, 32, 64, 1, 2, 0, 1),    # 1x1 strided (projection shortcut)
    (2, 40, 3, 16, 7, 2, 3, 1),     # ImageNet 7x7/2 stem
    (4, 8, 32, 32, 3, 1, 1, 8),     # grouped (ResNeXt): falls back to lax
    (16, 4, 64, 64, 3, 1, 1, 1),    # many images per chunk
]


@pytest.mark.parametrize("n,h,cin,cout,k,s,p,groups", CASES)
def test_matches_lax_fp32(n, h, cin, cout, k, s, p, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)) * 0.1, jnp.float32)
    (y0, dx0, dw0), (y1, dx1, dw1) = both(x, w, (s, s), ((p, p), (p, p)), groups)
    assert y1.shape == y0.shape and dw1.shape == dw0.shape and dw1.dtype == dw0.dtype
    assert rel(y1, y0) <= 1e-6
    assert rel(dx1, dx0) <= 1e-6
    assert rel(dw1, dw0) <= 1e-5


def test_small_chunks_and_string_padding():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 12, 12, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((5, 6, 6, 6)), jnp.float32)
    pads = ops._explicit_padding("SAME", x.shape, w.shape, (2, 2))
    f = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=DN)
    dw0 = jax.vjp(f, x, w)[1](g)[1]
    for rows in (36, 72, 100, 10_000):  # 1, 2, 2 (+padding), all images per chunk
        dw1 = ops.weight_grad(x, g, w.shape, (2, 2), pads, chunk_rows=rows)
        assert rel(dw1, dw0) <= 1e-5
    g2 = jax.grad(lambda w: ops.conv_general_dilated(x, w, (2, 2), "SAME",
                                                      dimension_numbers=DN).sum() * 1.0)(w)
    g3 = jax.grad(lambda w: f(x, w).sum())(w)
    assert rel(g2, g3) <= 1e-5


def test_bf16():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 16, 16, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) * 0.1, jnp.float32)
    (y0, dx0, dw0), (y1, dx1, dw1) = both(x, w, (1, 1), ((1, 1), (1, 1)), dtype=jnp.bfloat16)
    assert y1.dtype == dx1.dtype == dw1.dtype == jnp.bfloat16
    assert rel(y1, y0) == 0.0 and rel(dx1, dx0) == 0.0
    assert rel(dw1, dw0) <= 1e-2  # bf16 rounding of a sum taken in a different order


def test_fallbacks_are_lax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
    for kw in ({"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 2)}):
        a = ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, **kw)
        b = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, **kw)
        np.testing.assert_array_equal(a, b)
    xn = jnp.transpose(x, (0, 3, 1, 2))
    a = ops.conv_general_dilated(xn, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))
    b = lax.conv_general_dilated(xn, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))
    np.testing.assert_array_equal(a, b)


def resnet20_value_and_grad(cpu_ops: ops.CpuOps, batch: int = 16, hw: int = 32):
    """ResNet-20's train-mode loss and parameter gradient with ``cpu_ops``, jitted."""
    import optax
    from flax import nnx

    import flaxres

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, hw, hw, 3)), jnp.float32)
    y = jnp.arange(batch) % 10
    model = flaxres.create_model("resnet20", cpu_ops=cpu_ops)
    gd, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(gd, p, rest, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.jit(jax.value_and_grad(loss))(params)


def test_resnet20_grads_match_lax():
    (_, g0), (_, g1) = resnet20_value_and_grad(ops.CpuOps.off()), resnet20_value_and_grad(ops.CpuOps(conv="xla"))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert rel(a, b) <= 1e-4


def test_sharded_batch_under_jit():
    """Two host devices, batch sharded: same gradient as unsharded lax."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax import lax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from flaxres import ops
        assert jax.device_count() == 2
        dn = ("NHWC", "HWIO", "NHWC")
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 16, 16, 8)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.1, jnp.float32)
        def loss(conv):
            return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=dn)))
        ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
        ws = jax.device_put(w, NamedSharding(mesh, P()))
        got = jax.jit(jax.grad(loss(ops.conv_general_dilated), (0, 1)))(xs, ws)
        for a, b in zip(got, ref):
            e = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            assert e <= 1e-5, e
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("shape", [(16, 8, 8, 16), (7, 5, 5, 32)])
def test_batch_norm_train_matches_autodiff(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.7, jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    b = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    gm = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)

    def loss(bn):
        def f(x, s, b):
            y, mean, var = bn(x, s, b, 1e-5)
            return jnp.vdot(jnp.sin(y), g) + jnp.vdot(mean, gm) + jnp.vdot(var, gm)
        return f

    # Forward against the textbook formula in float64 numpy (biased variance).
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(axis=(0, 1, 2))
    var = x64.var(axis=(0, 1, 2))
    y64 = (x64 - mean) / np.sqrt(var + 1e-5) * np.asarray(s, np.float64) + np.asarray(b, np.float64)
    got_fwd = jax.jit(lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-5))(x, s, b)
    for a, r in zip(got_fwd, (y64, mean, var)):
        assert rel(a, r) <= 1e-6
    # Backward (the closed form on the CPU) against autodiff of the plain formula.
    def autodiff_bn(x, s, b, eps):
        return ops.batch_norm_train(x, s, b, eps, cpu=ops.CpuOps.off())

    ref = jax.jit(jax.grad(loss(autodiff_bn), (0, 1, 2)))(x, s, b)
    got = jax.jit(jax.grad(loss(ops.batch_norm_train), (0, 1, 2)))(x, s, b)
    for a, r in zip(got, ref):
        assert rel(a, r) <= 1e-5
