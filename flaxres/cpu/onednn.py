"""oneDNN convolutions and BatchNorm on the CPU, called from the traced program through ``jax.ffi``.

XLA:CPU's convolutions are slower than oneDNN's on ResNet shapes (docs/performance.md). The C++
extension (``flaxres/csrc``, built by ``pip install``, optional) exposes oneDNN's forward,
backward-data and backward-weights convolutions as XLA FFI handlers; :func:`conv` joins them with
``jax.custom_vjp``. :func:`batch_norm` does the same for train-mode BatchNorm with its ReLU fused
in, which XLA:CPU computes in more passes over the activation. :mod:`flaxres.ops` calls them only
inside the CPU branch of ``lax.platform_dependent`` and only for fp32 NHWC tensors (convolutions
without dilation), so other platforms and every other case keep ``lax``.

If the extension was not built, or oneDNN's runtime cannot be loaded, :func:`library` warns once
and returns None, and flaxres.ops uses XLA's convolutions instead (never a crash).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import warnings
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

FORWARD = "flaxres_onednn_conv_fwd"
BACKWARD_DATA = "flaxres_onednn_conv_bwd_data"
BACKWARD_WEIGHTS = "flaxres_onednn_conv_bwd_weights"
CONV_BN_FORWARD = "flaxres_onednn_conv_bn_fwd"
CONV_BN_FORWARD_PACKED = "flaxres_onednn_conv_bn_fwd_packed"
PACK_WEIGHTS = "flaxres_onednn_pack_weights"
BN_FORWARD = "flaxres_onednn_bn_fwd"
BN_BACKWARD = "flaxres_onednn_bn_bwd"
ONEDNN_RUNTIME = "libdnnl.so.3"


def extension_path() -> Path | None:
    """The built extension beside this file (editable installs build it in place)."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_onednn{suffix}"
        if candidate.exists():
            return candidate
    return None


def _runtime_path() -> Path | None:
    """libdnnl from the onednn-cpu-gomp wheel, which installs it in <prefix>/lib (not on the
    loader's search path, and the extension carries no rpath into a build environment)."""
    try:
        dist = metadata.distribution("onednn-cpu-gomp")
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(ONEDNN_RUNTIME):
            return Path(dist.locate_file(f)).resolve()
    return None


def load(path: Path | None) -> ctypes.CDLL:
    """Loads the extension at ``path`` (oneDNN's runtime first) and registers its FFI targets for
    the CPU; raises OSError naming the cause when it cannot."""
    if path is None:
        raise OSError("C++ extension not built; reinstall flaxres with pip on Linux x86-64, "
                      "see docs/onednn.md")
    runtime = _runtime_path()
    if runtime is not None:  # loaded first, so the extension's DT_NEEDED resolves to it
        ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(path))
    try:
        for target in (FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS, CONV_BN_FORWARD,
                       CONV_BN_FORWARD_PACKED, PACK_WEIGHTS, BN_FORWARD, BN_BACKWARD):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                        platform="cpu")
        lib.flaxres_onednn_version.restype = ctypes.c_char_p
        lib.flaxres_onednn_bn_impl.restype = ctypes.c_char_p
        lib.flaxres_onednn_bn_impl.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
        lib.flaxres_onednn_packed_weights_size.restype = ctypes.c_int64
        lib.flaxres_onednn_packed_weights_size.argtypes = [ctypes.c_int64] * 19
    except AttributeError as err:
        raise OSError(f"{path}: {err}") from err
    return lib


@functools.cache
def _load_once() -> ctypes.CDLL | str:
    """The loaded extension, or why it is unavailable; tried once per process."""
    try:
        return load(extension_path())
    except OSError as err:
        return str(err)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"flaxres: oneDNN convolutions unavailable ({reason}); using XLA's "
                  "convolutions on the CPU", RuntimeWarning, stacklevel=4)


def unavailable_reason() -> str | None:
    """Why oneDNN convolutions cannot run here (None when they can); no warning, for CLIs."""
    loaded = _load_once()
    return loaded if isinstance(loaded, str) else None


def library() -> ctypes.CDLL | None:
    """The extension, loaded and registered once per process; None (with one warning per
    process) when unavailable."""
    loaded = _load_once()
    if isinstance(loaded, str):
        _warn_once(loaded)
        return None
    return loaded


def resolve_conv(requested: str | None) -> str:
    """A ``--cpu-conv`` value or ``Config.cpu_conv`` as the one choice every tool makes: None
    means ``"onednn"`` where the extension loads, else ``"xla"`` with the one warning
    :func:`library` gives; an explicit ``"onednn"`` that cannot run raises ValueError naming the
    flag and the cause (an A/B measurement must not silently time XLA twice)."""
    reason = unavailable_reason()
    if requested is None:
        if reason:
            _warn_once(reason)
        return "xla" if reason else "onednn"
    if requested == "onednn" and reason:
        raise ValueError(f"--cpu-conv onednn: {reason}")
    return requested


def available() -> bool:
    """Whether oneDNN convolutions can run (warns once if not)."""
    return library() is not None


def version() -> str | None:
    """oneDNN's version ("3.2.0"), or None when unavailable; for results files."""
    lib = library()
    return lib.flaxres_onednn_version().decode() if lib is not None else None


def supports(x: jax.Array, w: jax.Array, groups: int) -> bool:
    """fp32 only (oneDNN has no float64 convolution; bf16 stays on XLA), channels divisible by
    the groups."""
    fp32 = np.dtype(np.float32)
    return (x.dtype == fp32 and w.dtype == fp32 and x.ndim == 4 and w.ndim == 4
            and groups >= 1 and x.shape[3] == w.shape[2] * groups and w.shape[3] % groups == 0)


def _attrs(strides, pads, groups: int, threads: int) -> dict[str, np.int64]:
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    return {name: np.int64(v) for name, v in (
        ("stride_h", sh), ("stride_w", sw), ("pad_top", pt), ("pad_bottom", pb),
        ("pad_left", pl), ("pad_right", pr), ("groups", groups), ("threads", threads))}


def _call(target: str, out_shapes, *args, **attrs):
    if library() is None:  # registers the targets on first use
        raise RuntimeError("flaxres: oneDNN unavailable (extension not loaded)")
    return jax.ffi.ffi_call(target, out_shapes, vmap_method="sequential")(*args, **attrs)


def _f32(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), np.float32)


def _out_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def conv_forward(x, w, strides, pads, groups: int = 1, threads: int = 0):
    """y = conv(x, w): x NHWC, w HWIO (I = C / groups), explicit (lo, hi) pads per axis."""
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    shape = (n, _out_size(h, kh, strides[0], pads[0]), _out_size(wd, kw, strides[1], pads[1]), o)
    return _call(FORWARD, _f32(shape), x, w, **_attrs(strides, pads, groups, threads))


def conv_backward_data(dy, w, x_shape, strides, pads, groups: int = 1, threads: int = 0):
    """dL/dx of :func:`conv_forward` from the output cotangent ``dy``."""
    return _call(BACKWARD_DATA, _f32(x_shape), dy, w, **_attrs(strides, pads, groups, threads))


def conv_backward_weights(x, dy, w_shape, strides, pads, groups: int = 1, threads: int = 0):
    """dL/dw of :func:`conv_forward` from its input ``x`` and the output cotangent ``dy``."""
    return _call(BACKWARD_WEIGHTS, _f32(w_shape), x, dy,
                 **_attrs(strides, pads, groups, threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv(x, w, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]],
         groups: int = 1, threads: int = 0):
    """The convolution ``lax.conv_general_dilated(x, w, strides, pads, ("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups)`` computed by oneDNN, differentiable; CPU only, fp32 only.
    ``threads``: oneDNN's OpenMP threads per call (0 = OpenMP's default)."""
    return conv_forward(x, w, strides, pads, groups, threads)


def _conv_fwd(x, w, strides, pads, groups, threads):
    return conv_forward(x, w, strides, pads, groups, threads), (x, w)


def _conv_bwd(strides, pads, groups, threads, residuals, dy):
    x, w = residuals
    return (conv_backward_data(dy, w, x.shape, strides, pads, groups, threads),
            conv_backward_weights(x, dy, w.shape, strides, pads, groups, threads))


conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_bn_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
    n, h, wd, _ = x_shape
    kh, kw, _, o = w_shape
    return (n, _out_size(h, kh, strides[0], pads[0]), _out_size(wd, kw, strides[1], pads[1]), o)


def _post_attrs(relu: bool, residual) -> dict[str, np.int64]:
    return {"relu": np.int64(relu), "residual": np.int64(residual is not None)}


def _residual_operand(residual):
    """The FFI call's residual buffer: one unused element where there is none."""
    return np.zeros(1, np.float32) if residual is None else residual


def conv_batch_norm_forward(x, w, mean, inv, bias, residual, strides, pads, groups: int = 1,
                            relu: bool = False, threads: int = 0):
    """``[relu]((conv(x, w) - mean) * inv + bias [+ residual])``, an eval-mode BatchNorm (``inv =
    scale * rsqrt(var + eps)``) and what follows it computed as oneDNN post-ops of the
    convolution, so the activation is written once; ``residual`` None or of the output's shape.
    Not differentiable itself (flaxres.ops.conv_batch_norm_eval differentiates it unfused)."""
    return _call(CONV_BN_FORWARD, _f32(_conv_bn_shape(x.shape, w.shape, strides, pads)), x, w,
                 mean, inv, bias, _residual_operand(residual),
                 **_attrs(strides, pads, groups, threads), **_post_attrs(relu, residual))


def pack_weights(w, x_shape, strides, pads, groups: int = 1, relu: bool = False,
                 residual: bool = False, threads: int = 0) -> jax.Array:
    """``w`` (HWIO) reordered into the layout oneDNN's :func:`conv_batch_norm_forward` primitive
    for an input of ``x_shape`` wants, as a flat float32 array: what every call of that
    convolution would otherwise reorder again (a sizeable share of a batch-1 forward pass)."""
    lib = library()
    if lib is None:
        raise RuntimeError("flaxres: oneDNN unavailable (extension not loaded)")
    n, h, wd, c = x_shape
    _, ho, wo, o = _conv_bn_shape(x_shape, w.shape, strides, pads)
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    size = lib.flaxres_onednn_packed_weights_size(
        n, h, wd, c, o, ho, wo, w.shape[0], w.shape[1], sh, sw, pt, pb, pl, pr, groups, threads,
        relu, residual)
    if size < 0:
        raise ValueError(f"oneDNN has no convolution of {tuple(w.shape)} on {tuple(x_shape)}")
    return _call(PACK_WEIGHTS, _f32((size,)), w, **_attrs(strides, pads, groups, threads),
                 relu=np.int64(relu), residual=np.int64(residual), n=np.int64(n), h=np.int64(h),
                 w=np.int64(wd), ho=np.int64(ho), wo=np.int64(wo))


def conv_batch_norm_forward_packed(x, packed, w_shape, mean, inv, bias, residual, strides, pads,
                                   groups: int = 1, relu: bool = False, threads: int = 0):
    """:func:`conv_batch_norm_forward` with the weights of shape ``w_shape`` already reordered by
    :func:`pack_weights` (for the same input shape, post-ops and threads)."""
    kh, kw, _, o = w_shape
    return _call(CONV_BN_FORWARD_PACKED, _f32(_conv_bn_shape(x.shape, w_shape, strides, pads)),
                 x, packed, mean, inv, bias, _residual_operand(residual),
                 **_attrs(strides, pads, groups, threads), **_post_attrs(relu, residual),
                 kh=np.int64(kh), kw=np.int64(kw), o=np.int64(o))


# ----------------------------------------------------------------------------- BatchNorm


def supports_batch_norm(x: jax.Array) -> bool:
    """fp32 NHWC activations (float64 and bf16 stay on XLA)."""
    return x.dtype == np.dtype(np.float32) and x.ndim == 4


def batch_norm_impl(shape, relu: bool, backward: bool = False) -> str:
    """The oneDNN implementation a BatchNorm of NHWC ``shape`` runs, e.g.
    "bnorm_jit:avx512_core" (a "ref:" one would be slow)."""
    n, h, w, c = shape
    return library().flaxres_onednn_bn_impl(n, h, w, c, int(relu), int(backward)).decode()


def _bn_attrs(epsilon: float, relu: bool, threads: int) -> dict:
    return {"epsilon": np.float32(epsilon), "relu": np.int64(relu), "threads": np.int64(threads)}


def _bn_forward(x, scale, shift, epsilon, relu, threads):
    c = x.shape[-1]
    # The workspace (the ReLU's mask) is declared one byte per element: at least what oneDNN keeps.
    return _call(BN_FORWARD, (_f32(x.shape), _f32((c,)), _f32((c,)),
                              jax.ShapeDtypeStruct((x.size,), np.uint8)),
                 x, scale, shift, **_bn_attrs(epsilon, relu, threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm(x, scale, shift, epsilon: float, relu: bool = False, threads: int = 0):
    """Train-mode BatchNorm over N, H, W of an NHWC ``x``: ``(y, mean, var)`` with the biased
    variance and ``y = [relu]((x - mean) * rsqrt(var + epsilon) * scale + shift)``, computed by
    oneDNN, differentiable (also through ``mean`` and ``var``); CPU only, fp32 only."""
    return _bn_forward(x, scale, shift, epsilon, relu, threads)[:3]


def _batch_norm_fwd(x, scale, shift, epsilon, relu, threads):
    y, mean, var, workspace = _bn_forward(x.value, scale.value, shift.value, epsilon, relu,
                                          threads)
    return (y, mean, var), (x.value, mean, var, scale.value, workspace)


def _batch_norm_bwd(epsilon, relu, threads, residuals, cotangents):
    x, mean, var, scale, workspace = residuals
    dy, d_mean, d_var = cotangents
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        dy = jax.numpy.zeros(x.shape, x.dtype)
    dx, d_scale, d_shift = _call(BN_BACKWARD, (_f32(x.shape), _f32(scale.shape),
                                               _f32(scale.shape)),
                                 x, mean, var, dy, scale, workspace,
                                 **_bn_attrs(epsilon, relu, threads))
    # mean and var are outputs too; their cotangents (zero in a model, which only keeps them as
    # running statistics) add d mean/dx = 1/m and d var/dx = 2 (x - mean)/m.
    m = x.size // x.shape[-1]
    if not isinstance(d_mean, jax.custom_derivatives.SymbolicZero):
        dx = dx + d_mean / m
    if not isinstance(d_var, jax.custom_derivatives.SymbolicZero):
        dx = dx + (2.0 / m) * d_var * (x - mean)
    return dx, d_scale, d_shift


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)
