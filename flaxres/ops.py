"""CPU fast paths that compute exactly the same function as their ``lax`` originals.

XLA:CPU lowers a convolution's weight gradient to an Eigen spatial convolution whose window is the
whole feature map and whose contraction runs over N·H·W (≈ 130k for a CIFAR batch): several
times slower than the forward convolution, it dominates the train step (see
``docs/performance.md``). On the CPU the weight gradient here is instead

    dW[kh, kw, ci, co] = Σ_chunks  dyᵀ(chunk) · patches(x)(chunk)

a ``lax.scan`` over chunks of a few images: each chunk builds its im2col patches (the kh·kw shifted,
strided slices of the padded input, concatenated on the channel axis; they stay in cache) and runs
one well-shaped GEMM (M = Cout, N = kh·kw·Cin, K ≈ 4096 rows), accumulated in fp32. The result is
the same sum in a different order: relative error vs ``lax`` ≈ 1e-6 in fp32. BatchNorm gets a
closed-form backward pass, two reductions and one elementwise pass.

Which code runs is chosen **per platform inside the traced program** (``lax.platform_dependent``):
the CPU gets these paths, every other platform plain ``lax`` and autodiff (cuDNN's kernels on a
GPU), so a ``jax.export`` for CUDA contains none of the CPU code. :class:`CpuOps` says which CPU
paths a model uses; ``CpuOps.off()`` gives plain ``lax`` on the CPU too, for A/B measurements.

Cases the CPU path does not handle (input/kernel dilation, non-NHWC/HWIO layouts, negative
padding, batch_group_count, non-2-D, integer dtypes, grouped convolutions with more than one group,
where the scan-GEMM was not faster) go to ``lax.conv_general_dilated`` unchanged.

By default (``CpuOps(conv="onednn")``) fp32 convolutions (forward and both gradients, groups
included) and train-mode BatchNorm (with the ReLU that follows it) run in oneDNN through
``jax.ffi`` instead (:mod:`flaxres.cpu.onednn`, docs/onednn.md), again only in the CPU branch;
float64, bf16 and the cases above keep the paths described here, and so does everything when the
C++ extension is not built (with one warning). ``CpuOps(conv="xla")`` keeps XLA's convolutions
with the paths described here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from flaxres.cpu import onednn

_NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class CpuOps:
    """The CPU-only fast paths a model traces (other platforms always get plain ``lax``).

    Frozen and compared by value, so models built with equal settings share compiled code.
    """

    wgrad_gemm: bool = True  # convolution weight gradient as a scan of GEMMs
    bn_backward: bool = True  # closed-form BatchNorm backward
    # Rows (images x output pixels) per chunk of the weight-gradient scan: 2k-4k rows keep the
    # chunk's patches in L2/L3 and Eigen's GEMM efficient (docs/performance.md).
    wgrad_chunk_rows: int = 4096
    # Who runs fp32 convolutions on the CPU: oneDNN via jax.ffi (faster, docs/performance.md;
    # XLA when the extension is not built) or XLA (with the paths above).
    conv: Literal["xla", "onednn"] = "onednn"
    # oneDNN's OpenMP threads per call; 0 = OpenMP's default (OMP_NUM_THREADS or all cores).
    onednn_threads: int = 0
    # With conv="onednn": train-mode BatchNorm (and its ReLU) in oneDNN too; False for A/B runs.
    onednn_batch_norm: bool = True
    # With conv="onednn", for serving: eval-mode convolutions whose weights are constants of the
    # traced program (a model closed over by jax.jit) get them in oneDNN's layout once, at trace
    # time, instead of reordering them in every call (conv_batch_norm_eval).
    pack_weights: bool = False

    def __post_init__(self):
        if self.conv not in ("xla", "onednn"):
            raise ValueError(f"CpuOps.conv must be 'xla' or 'onednn', not {self.conv!r}")
        if self.onednn_threads < 0:
            raise ValueError(f"CpuOps.onednn_threads must be >= 0, not {self.onednn_threads}")

    @classmethod
    def off(cls) -> CpuOps:
        """Plain ``lax`` and autodiff on the CPU as well."""
        return cls(wgrad_gemm=False, bn_backward=False, conv="xla")


def accumulation_dtype(dtype) -> jnp.dtype:
    """Sums and statistics run in fp32 for bf16/fp32 compute, in float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _is_nhwc_hwio(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def _explicit_padding(padding, lhs_shape, rhs_shape, strides):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


@dataclasses.dataclass(frozen=True)
class Conv:
    """``lax.conv_general_dilated`` for ``nnx.Conv(conv_general_dilated=...)``, with the CPU weight
    gradient of ``cpu``; hashable, so it is static structure of the model's graph."""

    cpu: CpuOps = CpuOps()

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count: int = 1,
                 batch_group_count: int = 1, precision=None, preferred_element_type=None,
                 **kwargs):
        return conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
            cpu=self.cpu, **kwargs)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, *, cpu: CpuOps = CpuOps(), **kwargs):
    """``lax.conv_general_dilated``; on the CPU with the faster weight gradient or oneDNN's
    convolutions, as ``cpu`` says (same function)."""
    lax_call = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    if kwargs.get("out_sharding") is None:
        kwargs.pop("out_sharding", None)
    if not (not kwargs and lhs.ndim == 4 and rhs.ndim == 4
            and _is_nhwc_hwio(dimension_numbers)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and batch_group_count == 1
            and preferred_element_type is None and precision is None
            and jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == rhs.dtype):
        return lax_call(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides)
    if any(p < 0 for pair in pads for p in pair):
        return lax_call(lhs, rhs)
    groups = feature_group_count
    plain = functools.partial(_lax_conv, strides=strides, pads=pads, groups=groups)
    if (cpu.conv == "onednn" and onednn.supports(lhs, rhs, groups) and onednn.available()):
        return lax.platform_dependent(
            lhs, rhs, default=plain,
            cpu=lambda x, w: onednn.conv(x, w, strides, pads, groups, cpu.onednn_threads))
    if not cpu.wgrad_gemm or groups != 1:
        return lax_call(lhs, rhs)
    return lax.platform_dependent(
        lhs, rhs, cpu=lambda x, w: _conv(x, w, strides, pads, cpu.wgrad_chunk_rows),
        default=plain)


def _lax_conv(x, w, strides, pads, groups: int = 1):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                    feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, chunk_rows):
    return _lax_conv(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads, chunk_rows):
    return _lax_conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, chunk_rows, res, g):
    x, w = res
    _, vjp_x = jax.vjp(lambda a: _lax_conv(a, w, strides, pads), x)
    (dx,) = vjp_x(g)
    dw = weight_grad(x, g, w.shape, strides, pads, chunk_rows).astype(w.dtype)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _patches(x, kh: int, kw: int, strides, pads, ho: int, wo: int):
    """im2col of an NHWC block: (n, ho, wo, kh*kw*c), taps ordered (kh, kw, c) like HWIO."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    sh, sw = strides
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(lax.slice(xp, (0, i, j, 0),
                                  (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                                   xp.shape[3]), (1, sh, sw, 1)))
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def weight_grad(x, g, w_shape: Sequence[int], strides, pads, chunk_rows: int = 4096):
    """dL/dW of an NHWC/HWIO convolution (no dilation, one group) from its input ``x`` and the
    output cotangent ``g``, as a scan of GEMMs over batch chunks; at least fp32 accumulation."""
    kh, kw, cin, cout = w_shape
    acc_dtype = accumulation_dtype(x.dtype)
    n, ho, wo, _ = g.shape
    per = max(1, min(n, chunk_rows // max(ho * wo, 1)))
    nchunks = -(-n // per)
    extra = nchunks * per - n  # zero images add nothing to the sum
    if extra:
        x = jnp.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0)))
        g = jnp.pad(g, ((0, extra), (0, 0), (0, 0), (0, 0)))
    xs = x.reshape((nchunks, per) + x.shape[1:])
    gs = g.reshape((nchunks, per) + g.shape[1:])

    def chunk(xc, gc):
        p = _patches(xc, kh, kw, strides, pads, ho, wo).reshape(per * ho * wo, kh * kw * cin)
        return lax.dot_general(gc.reshape(per * ho * wo, cout), p, (((0,), (0,)), ((), ())),
                               preferred_element_type=acc_dtype)  # (cout, kh*kw*cin)

    if nchunks == 1:
        acc = chunk(xs[0], gs[0])
    else:
        def body(acc, xg):
            return acc + chunk(*xg), None
        acc, _ = lax.scan(body, jnp.zeros((cout, kh * kw * cin), acc_dtype), (xs, gs))
    return acc.T.reshape(kh, kw, cin, cout)


def conv_batch_norm_eval(x, w, strides, padding, groups: int, mean, inv, bias, residual=None,
                         *, relu: bool = False, cpu: CpuOps = CpuOps()):
    """``[relu]((conv(x, w) - mean) * inv + bias [+ residual])``: a convolution (NHWC/HWIO,
    symmetric or explicit padding) followed by an eval-mode BatchNorm (``inv = scale * rsqrt(var +
    eps)``) and what comes after it in a block. On the CPU with oneDNN (fp32) one call computes it
    all, the BatchNorm and the rest as post-ops of the convolution (inference writes each
    activation once; under autodiff the forward runs unfused, as below); elsewhere the
    convolution of ``cpu`` and XLA's elementwise ops.

    With ``cpu.pack_weights``, a concrete ``w`` (not a tracer: a model closed over by
    ``jax.jit``) is reordered into oneDNN's layout for this input shape right here, on the CPU,
    and the program keeps that copy as a constant of its CPU branch: a batch-1 ResNet-50 forward
    pass otherwise spends a large share of its time reordering weights (docs/deploy.md).
    Weights that are arguments of the program (``nnx.jit``) are reordered in every call."""
    strides = tuple(int(s) for s in strides)
    pads = _explicit_padding(padding, x.shape, w.shape, strides)

    def plain(x, w, mean, inv, bias, residual):
        y = conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                 feature_group_count=groups, cpu=cpu)
        y = (y - mean) * inv + bias
        y = y if residual is None else y + residual
        return jax.nn.relu(y) if relu else y

    operands = (x, w, mean, inv, bias, residual)
    if (cpu.conv == "onednn" and cpu.onednn_batch_norm and onednn.supports(x, w, groups)
            and all(a.dtype == x.dtype for a in operands if a is not None)
            and not any(p < 0 for pair in pads for p in pair) and onednn.available()):
        packed = _packed_weights(x, w, strides, pads, groups, relu, residual, cpu)

        @jax.custom_vjp
        def fused(x, w, mean, inv, bias, residual):
            if packed is None:
                return onednn.conv_batch_norm_forward(x, w, mean, inv, bias, residual, strides,
                                                      pads, groups, relu, cpu.onednn_threads)
            return onednn.conv_batch_norm_forward_packed(x, packed, w.shape, mean, inv, bias,
                                                         residual, strides, pads, groups, relu,
                                                         cpu.onednn_threads)

        fused.defvjp(lambda *a: jax.vjp(plain, *a), lambda vjp, dy: vjp(dy))
        return lax.platform_dependent(*operands, cpu=fused, default=plain)
    return plain(*operands)


def _packed_weights(x, w, strides, pads, groups: int, relu: bool, residual, cpu: CpuOps):
    """``w`` packed for oneDNN's fused convolution on ``x``'s shape, computed now on the CPU, if
    ``cpu.pack_weights`` and ``w`` is a constant of the program being traced; else None."""
    if (not cpu.pack_weights or isinstance(w, jax.core.Tracer)
            or not all(isinstance(d, int) for d in x.shape)):
        return None
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        return onednn.pack_weights(w, x.shape, strides, pads, groups, relu,
                                   residual is not None, cpu.onednn_threads)


# ----------------------------------------------------------------------------- BatchNorm


def batch_norm_train(x, scale, bias, epsilon: float, *, relu: bool = False,
                     cpu: CpuOps = CpuOps()):
    """Train-mode batch normalisation over all axes but the last, in the input's dtype (fp32),
    followed by a ReLU if ``relu``.

    Returns ``(y, mean, var)`` with the biased variance, exactly the forward formula of
    :class:`flaxres.models.BatchNorm`: ``mean = x.mean(axes)``, ``var = ((x - mean)**2).mean(axes)``,
    ``y = (x - mean) * (rsqrt(var + eps) * scale) + bias`` (then ``jax.nn.relu``). The backward pass
    is the closed form ``dx = scale * rsqrt(var + eps) * (g - mean(g) - x̂ * mean(g * x̂))`` (plus
    the terms from ``mean``/``var`` if those outputs are differentiated): two reductions and one
    elementwise pass, where autodiff of the forward leaves XLA:CPU several more passes over the
    activation. That backward runs on the CPU only (``cpu.bn_backward``), and with
    ``cpu.conv == "onednn"`` oneDNN computes fp32 BatchNorm and its ReLU instead; elsewhere
    autodiff of the forward.
    """
    def activated(bn):
        def run(x, scale, bias):
            y, mean, var = bn(x, scale, bias, epsilon)
            return (jax.nn.relu(y) if relu else y), mean, var
        return run

    plain = activated(_bn_forward)
    if (cpu.conv == "onednn" and cpu.onednn_batch_norm and onednn.supports_batch_norm(x)
            and onednn.available()):
        return lax.platform_dependent(
            x, scale, bias, default=plain,
            cpu=lambda x, s, b: onednn.batch_norm(x, s, b, epsilon, relu, cpu.onednn_threads))
    if not cpu.bn_backward:
        return plain(x, scale, bias)
    return lax.platform_dependent(x, scale, bias, cpu=activated(_bn), default=plain)


def _bn_forward(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    inv = lax.rsqrt(var + epsilon) * scale
    return (x - mean) * inv + bias, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x, scale, bias, epsilon):
    return _bn_forward(x, scale, bias, epsilon)


def _bn_fwd(x, scale, bias, epsilon):
    y, mean, var = _bn_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, var, scale)


def _bn_bwd(epsilon, res, cts):
    x, mean, var, scale = res
    g, g_mean, g_var = cts
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    r = lax.rsqrt(var + epsilon)
    xc = x - mean
    xhat = xc * r
    sum_g = g.sum(axes)
    sum_gx = (g * xhat).sum(axes)
    dx = (scale * r) * (g - sum_g / m - xhat * (sum_gx / m)) + (g_mean / m + (2.0 / m) * g_var * xc)
    return dx.astype(x.dtype), sum_gx.astype(scale.dtype), sum_g.astype(scale.dtype)


_bn.defvjp(_bn_fwd, _bn_bwd)
