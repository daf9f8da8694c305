"""oneDNN convolutions and BatchNorm through jax.ffi (flaxres.cpu.onednn) compute lax's.

Each of the three convolution primitives (forward, backward-data, backward-weights) and their
autodiff against ``lax.conv_general_dilated`` and its VJP, over the configurations ResNets use and
a few they do not; train-mode BatchNorm (with and without its ReLU) and its gradients, also
through the statistics, against the formula of flaxres.ops; what oneDNN does not take (float64,
bf16, dilation) stays ``lax``; a missing extension warns and falls back. Tests that run oneDNN
skip when the extension is not built.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import flaxres
from flaxres import ops
from flaxres.cpu import onednn

DN = ("NHWC", "HWIO", "NHWC")
ONEDNN = ops.CpuOps(conv="onednn")
needs_extension = pytest.mark.skipif(
    onednn.extension_path() is None,
    reason="oneDNN extension not built (pip install -e . builds it; docs/onednn.md)")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [  # (n, h, w, cin, cout, k, stride, pads, groups)
    (4, 16, 16, 16, 16, 3, 1, ((1, 1), (1, 1)), 1),   # CIFAR 3x3
    (3, 16, 16, 16, 32, 3, 2, ((1, 1), (1, 1)), 1),   # strided downsampling
    (2, 9, 7, 8, 12, 3, 2, ((1, 1), (1, 1)), 1),      # odd sizes with stride (rows dropped)
    (3, 8, 8, 32, 64, 1, 1, ((0, 0), (0, 0)), 1),     # 1x1
    (3, 9, 9, 16, 32, 1, 2, ((0, 0), (0, 0)), 1),     # 1x1 strided projection, odd size
    (2, 23, 23, 3, 16, 7, 2, ((3, 3), (3, 3)), 1),    # ImageNet 7x7/2 stem
    (2, 10, 10, 4, 6, 3, 1, ((0, 2), (1, 0)), 1),     # asymmetric explicit padding
    (2, 8, 8, 32, 32, 3, 1, ((1, 1), (1, 1)), 8),     # grouped (ResNeXt)
    (2, 9, 9, 16, 16, 3, 2, ((1, 1), (1, 1)), 16),    # depthwise, strided
]
IDS = ["3x3", "3x3s2", "odd", "1x1", "1x1s2", "7x7s2", "asym", "groups8", "depthwise"]


def _data(n, h, w, cin, cout, k, stride, pads, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)) * 0.2, jnp.float32)
    lax_conv = lambda x, wt: lax.conv_general_dilated(
        x, wt, (stride, stride), pads, dimension_numbers=DN, feature_group_count=groups)
    y, vjp = jax.vjp(lax_conv, x, wt)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    return x, wt, dy, y, vjp(dy)


@needs_extension
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,pads,groups", CASES, ids=IDS)
def test_primitives_match_lax(n, h, w, cin, cout, k, stride, pads, groups):
    x, wt, dy, y0, (dx0, dw0) = _data(n, h, w, cin, cout, k, stride, pads, groups)
    s = (stride, stride)
    y1 = jax.jit(lambda x, wt: onednn.conv_forward(x, wt, s, pads, groups))(x, wt)
    dx1 = jax.jit(lambda dy, wt: onednn.conv_backward_data(dy, wt, x.shape, s, pads, groups))(
        dy, wt)
    dw1 = jax.jit(lambda x, dy: onednn.conv_backward_weights(x, dy, wt.shape, s, pads, groups))(
        x, dy)
    assert (y1.shape, dx1.shape, dw1.shape) == (y0.shape, dx0.shape, dw0.shape)
    assert rel(y1, y0) <= 1e-6
    assert rel(dx1, dx0) <= 1e-6
    assert rel(dw1, dw0) <= 1e-5


@needs_extension
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,pads,groups", CASES[:3] + CASES[7:8],
                         ids=IDS[:3] + IDS[7:8])
def test_autodiff_through_ops_matches_lax(n, h, w, cin, cout, k, stride, pads, groups):
    """flaxres.ops with CpuOps(conv="onednn"): value and both gradients under jit, as lax."""
    x, wt, dy, y0, (dx0, dw0) = _data(n, h, w, cin, cout, k, stride, pads, groups)

    def f(x, wt):
        return ops.conv_general_dilated(x, wt, (stride, stride), pads, dimension_numbers=DN,
                                        feature_group_count=groups, cpu=ONEDNN)

    y1, (dx1, dw1) = jax.jit(lambda x, wt: (f(x, wt), jax.vjp(f, x, wt)[1](dy)))(x, wt)
    assert "flaxres_onednn_conv_bwd_weights" in jax.jit(
        lambda x, wt: jax.vjp(f, x, wt)[1](dy)).lower(x, wt).as_text()
    assert rel(y1, y0) <= 1e-6 and rel(dx1, dx0) <= 1e-6 and rel(dw1, dw0) <= 1e-5


@needs_extension
def test_thread_count_gives_the_same_result():
    x, wt, dy, y0, (dx0, dw0) = _data(*CASES[1])
    pads = CASES[1][7]
    f = lambda x, wt: onednn.conv(x, wt, (2, 2), pads, 1, 1)  # one thread
    y1, vjp = jax.vjp(f, x, wt)
    dx1, dw1 = vjp(dy)
    assert rel(y1, y0) <= 1e-6 and rel(dx1, dx0) <= 1e-6 and rel(dw1, dw0) <= 1e-5


@needs_extension
def test_concurrent_calls_of_one_primitive_are_correct():
    """XLA may run handlers on several threads at once: the same cached primitive executed
    concurrently must give each caller its own right answer (per-thread scratchpads)."""
    from concurrent.futures import ThreadPoolExecutor

    x, wt, dy, _, (dx0, dw0) = _data(*CASES[0])
    pads = CASES[0][7]
    conv = lambda a, b: onednn.conv(a, b, (1, 1), pads)
    bwd = jax.jit(lambda x, wt, dy: jax.vjp(conv, x, wt)[1](dy))
    scales = [jnp.float32(k + 1) for k in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda k: bwd(x, wt, dy * k), scales))
    for k, (dx1, dw1) in zip(scales, outs, strict=True):
        assert rel(dx1, dx0 * k) <= 1e-6 and rel(dw1, dw0 * k) <= 1e-5


@needs_extension
def test_resnet20_grads_onednn_match_xla():
    """Whole-model gradient of ResNet-20 (train mode) with oneDNN convolutions, as plain lax's.
    At a small input: fp32 rounding flips the odd ReLU input near 0 across its kink, which moves
    the gradients below it by ~1e-3 (parity/checks.py, check_grads); at 8x32x32 that happened
    with one OpenMP thread and not with two."""
    from test_ops import resnet20_value_and_grad

    (l0, g0), (l1, g1) = (resnet20_value_and_grad(ops.CpuOps.off(), batch=4, hw=16),
                          resnet20_value_and_grad(ONEDNN, batch=4, hw=16))
    assert rel(l1, l0) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert rel(a, b) <= 1e-4


@needs_extension
@pytest.mark.parametrize("relu", [False, True], ids=["affine", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[7]], ids=["3x3s2", "1x1", "groups8"])
def test_conv_with_eval_batch_norm_post_ops_matches_lax(case, residual, relu):
    """Eval mode's convolution + BatchNorm [+ residual] [+ ReLU] in one oneDNN call: the value as
    lax's convolution and XLA's elementwise ops give it, and the gradient (unfused) too."""
    x, wt, dy, y0, _ = _data(*case)
    stride, pads, groups = case[6], case[7], case[8]
    rng = np.random.default_rng(2)
    mean, inv, bias = (jnp.asarray(rng.standard_normal(y0.shape[-1]), jnp.float32)
                       for _ in range(3))
    res = jnp.asarray(rng.standard_normal(y0.shape), jnp.float32) if residual else None

    def formula(x):
        y = (lax.conv_general_dilated(x, wt, (stride, stride), pads, dimension_numbers=DN,
                                      feature_group_count=groups) - mean) * inv + bias
        y = y if res is None else y + res
        return jax.nn.relu(y) if relu else y

    mine = lambda x: ops.conv_batch_norm_eval(x, wt, (stride, stride), pads, groups, mean, inv,
                                              bias, res, relu=relu, cpu=ONEDNN)
    assert "flaxres_onednn_conv_bn_fwd" in jax.jit(mine).lower(x).as_text()
    assert rel(jax.jit(mine)(x), formula(x)) <= 1e-6
    grad = lambda f: jax.grad(lambda x: (f(x) * dy).sum())(x)
    assert rel(jax.jit(lambda x: grad(mine))(x), grad(formula)) <= 1e-6


BN_SHAPES = [(4, 8, 8, 16), (3, 5, 7, 3), (1, 2, 2, 64)]  # ResNet-like, odd sizes/channels, tiny


@needs_extension
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["resnet", "odd", "tiny"])
def test_batch_norm_matches_the_formula(shape, relu):
    """Outputs, and the gradients of a loss of all three outputs (y, mean, var) with respect to
    x, scale and shift, as autodiff of flaxres.ops's formula gives them."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5, jnp.float32)
    scale, shift = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    d_mean, d_var = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))

    def formula(x, scale, shift):
        y, mean, var = ops._bn_forward(x, scale, shift, 1e-5)
        return (jax.nn.relu(y) if relu else y), mean, var

    def loss(bn):
        return lambda *a: sum((o * c).sum() for o, c in zip(bn(*a), (dy, d_mean, d_var)))

    mine = lambda x, scale, shift: onednn.batch_norm(x, scale, shift, 1e-5, relu)
    for got, want in zip(jax.jit(mine)(x, scale, shift), formula(x, scale, shift), strict=True):
        assert rel(got, want) <= 1e-6
    grads = jax.jit(jax.grad(loss(mine), argnums=(0, 1, 2)))(x, scale, shift)
    for got, want in zip(grads, jax.grad(loss(formula), argnums=(0, 1, 2))(x, scale, shift),
                         strict=True):
        assert rel(got, want) <= 1e-5


@needs_extension
def test_batch_norm_of_resnet_shapes_runs_a_jit_kernel():
    """The speed premise: oneDNN has a vectorised (not a reference) kernel for NHWC fp32:
    "bnorm_jit:avx512_core", or on AVX2 "bnorm_jit:avx2" forward and "bnorm_tbb_jit:avx2"
    backward (another work split of the same JIT kernel)."""
    for relu in (False, True):
        for backward in (False, True):
            impl = onednn.batch_norm_impl((128, 32, 32, 16), relu, backward)
            assert impl.startswith(("bnorm_jit:", "bnorm_tbb_jit:")), impl


def _lowered_bn(dtype, cpu: ops.CpuOps = ONEDNN) -> str:
    x = jax.ShapeDtypeStruct((2, 4, 4, 8), dtype)
    c = jax.ShapeDtypeStruct((8,), dtype)
    loss = lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-5, relu=True, cpu=cpu)[0].sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, c, c).as_text()


@needs_extension
def test_only_fp32_batch_norm_goes_to_onednn():
    assert "flaxres_onednn_bn_bwd" in _lowered_bn(jnp.float32)
    assert "flaxres_onednn" not in _lowered_bn(jnp.bfloat16)
    assert "flaxres_onednn" not in _lowered_bn(
        jnp.float32, dataclasses.replace(ONEDNN, onednn_batch_norm=False))
    with jax.enable_x64(True):
        assert "flaxres_onednn" not in _lowered_bn(jnp.float64)


def _lowered(dtype, cpu: ops.CpuOps = ONEDNN, **kw) -> str:
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), dtype)
    w = jax.ShapeDtypeStruct((3, 3, 4, 4), dtype)
    f = lambda x, w: ops.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, cpu=cpu, **kw)
    return jax.jit(jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1))).lower(x, w).as_text()


@needs_extension
def test_only_fp32_undilated_goes_to_onednn():
    assert "flaxres_onednn_conv_bwd_data" in _lowered(jnp.float32)
    assert "flaxres_onednn" not in _lowered(jnp.bfloat16)
    assert "flaxres_onednn" not in _lowered(jnp.float32, rhs_dilation=(2, 2))
    assert "flaxres_onednn" not in _lowered(jnp.float32, cpu=ops.CpuOps(conv="xla"))


def test_float64_and_bf16_are_not_supported():
    """oneDNN has no float64 convolution and bf16 stays on XLA: both keep the lax paths."""
    w = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
    for dtype in (jnp.float64, jnp.bfloat16):
        assert not onednn.supports(jax.ShapeDtypeStruct((2, 8, 8, 4), dtype), w, 1)
    assert onednn.supports(jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), w, 1)
    assert not onednn.supports(jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32), w, 1)


@pytest.mark.parametrize("path", [None, Path("/nonexistent/_onednn.so")], ids=["unbuilt",
                                                                                    "missing"])
def test_load_names_the_cause(path):
    with pytest.raises(OSError, match="not built|nonexistent"):
        onednn.load(path)


def test_missing_extension_warns_and_falls_back_to_lax(monkeypatch):
    """Without the extension CpuOps(conv="onednn") warns and traces XLA's convolutions."""
    monkeypatch.setattr(onednn, "_load_once", lambda: "simulated: extension not built")
    with pytest.warns(RuntimeWarning, match="simulated: extension not built.*XLA's conv"):
        text = _lowered(jnp.float32)
    assert "flaxres_onednn" not in text and "convolution" in text
    assert onednn.unavailable_reason() == "simulated: extension not built"


def test_cpu_ops_rejects_unknown_backend():
    with pytest.raises(ValueError, match="CpuOps.conv"):
        ops.CpuOps(conv="mkl")
    with pytest.raises(ValueError, match="onednn_threads"):
        ops.CpuOps(onednn_threads=-1)


def test_cli_flags_select_the_backend():
    from bench.speed import cli
    from train import cifar, loop

    for argv in (["--cpu-conv", "xla", "--no-fast-ops"], ["--no-fast-ops"]):
        assert cli._cpu_ops(cli.parse_args(argv)) == ops.CpuOps(wgrad_gemm=False,
                                                                bn_backward=False, conv="xla")
    assert cli.parse_args([]).cpu_conv == onednn.resolve_conv(None)
    cfg = cifar.parse_args(["--arch", "resnet8", "--cpu-conv", "xla"])
    assert loop.build_model(cfg).conv1.conv_general_dilated.cpu == ops.CpuOps(conv="xla")


def test_default_falls_back_to_xla_without_the_extension(monkeypatch, capsys):
    """oneDNN is the default where it is built; without it every tool runs XLA's convolutions
    with a warning and no error, and CpuOps() warns and traces lax."""
    from bench.speed import cli
    from train import cifar, loop
    from train.config import Config

    monkeypatch.setattr(onednn, "_load_once", lambda: "simulated: no extension here")
    for resolved in (lambda: cli.parse_args([]).cpu_conv,
                     lambda: cifar.parse_args(["--arch", "resnet8"]).cpu_conv,
                     lambda: loop.build_model(Config(arch="resnet8"))
                     .conv1.conv_general_dilated.cpu.conv):
        onednn._warn_once.cache_clear()  # once per process: each tool here is a process
        with pytest.warns(RuntimeWarning, match="simulated: no extension here"):
            assert resolved() == "xla"
    onednn._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="simulated: no extension here"):
        assert "flaxres_onednn" not in _lowered(jnp.float32, cpu=ops.CpuOps())


@needs_extension
def test_cli_flags_select_onednn():
    from bench.speed import cli
    from train import cifar, loop

    args = cli.parse_args(["--cpu-conv", "onednn"])
    assert cli._cpu_ops(args) == ONEDNN == ops.CpuOps()
    assert cli._cpu_ops(cli.parse_args(["--no-onednn-batch-norm"])) == ops.CpuOps(
        onednn_batch_norm=False)
    assert cli._cpu_conv("onednn") == f"onednn {onednn.version()}"
    cfg = cifar.parse_args(["--arch", "resnet8", "--cpu-conv", "onednn"])
    assert loop.build_model(cfg).conv1.conv_general_dilated.cpu == ONEDNN


@pytest.mark.parametrize("prog", ["bench.speed", "train.cifar"])
def test_cli_onednn_without_extension_is_a_clear_error(prog, monkeypatch, capsys):
    """--cpu-conv onednn where the extension is missing: exit 2, one line naming the flag and
    the cause (an A/B measurement must not silently time XLA)."""
    from bench.speed import cli
    from train import cifar

    monkeypatch.setattr(onednn, "_load_once", lambda: "simulated: extension not built")
    parse = cli.parse_args if prog == "bench.speed" else cifar.parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse(["--cpu-conv", "onednn"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --cpu-conv onednn: simulated: extension not built")


PACKING_NETS = {  # (builder, image size)
    "basic, option-A shortcut": (lambda rngs, **kw: flaxres.create_model("resnet20", **kw), 32),
    "bottleneck, ImageNet stem": (lambda **kw: flaxres.resnext((1, 1, 1, 1), 1, 64, **kw), 64),
    "ResNeXt groups": (lambda **kw: flaxres.resnext((1, 1, 1, 1), 8, 4, **kw), 64),
}


@needs_extension
@pytest.mark.parametrize("kind", [  # the default tier keeps one net; --full runs the rest
    kind if i == 0 else pytest.param(kind, marks=pytest.mark.full)
    for i, kind in enumerate(PACKING_NETS)])
def test_weights_packed_at_trace_time_give_the_same_logits_and_gradients(kind):
    """CpuOps(pack_weights=True): a model closed over by jax.jit gets its weights in oneDNN's
    layout once, at trace time (no packing left in the program), with bit-identical logits and
    input gradients for every batch size; as an argument (nnx.jit) its weights stay unpacked."""
    builder, size = PACKING_NETS[kind]
    plain = builder(num_classes=10, rngs=nnx.Rngs(0))
    packed = builder(num_classes=10, rngs=nnx.Rngs(1), cpu_ops=ops.CpuOps(pack_weights=True))
    rng = np.random.default_rng(0)
    for _, bn in plain.iter_modules():  # BatchNorm statistics away from the identity
        if isinstance(bn, flaxres.BatchNorm):
            bn.mean[...] = rng.normal(0, 0.2, bn.mean.shape).astype(np.float32)
            bn.var[...] = rng.uniform(0.5, 1.5, bn.var.shape).astype(np.float32)
    nnx.update(packed, nnx.state(plain))
    plain.eval()
    packed.eval()
    run = jax.jit(lambda x: packed(x))
    x = jnp.asarray(rng.standard_normal((2, size, size, 3)), jnp.float32)
    convs = sum(isinstance(m, nnx.Conv) for _, m in plain.iter_modules())
    text = run.lower(x).as_text()
    assert text.count("@flaxres_onednn_conv_bn_fwd_packed(") == convs
    assert "@flaxres_onednn_conv_bn_fwd(" not in text and "pack_weights" not in text
    for batch in (2, 3):
        x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
        expected = jax.jit(lambda x: plain(x))(x)
        assert np.array_equal(run(x), expected)
        as_argument = nnx.jit(lambda m, x: m(x))
        assert np.array_equal(as_argument(packed, x), as_argument(plain, x))
    grad = lambda model: jax.jit(jax.grad(lambda x: model(x).sum()))(x)
    assert np.array_equal(grad(packed), grad(plain))
