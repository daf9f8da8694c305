"""bench.speed: its flags parse, the package imports no framework before the thread settings,
the FLOP counter gives ResNet-20's 40.55M multiply-adds, and the precision policy is set alike
in both frameworks and recorded."""

import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

import flaxres
from bench.speed import cli, flops, report

ROOT = Path(__file__).resolve().parents[1]


def test_flags_parse_with_their_defaults_and_refuse_unknown_values(capsys):
    a = cli.parse_args([])
    assert (a.arch, a.batch_size, a.precision, a.matmul_precision) == ("resnet20", 128, "fp32",
                                                                       "highest")
    a = cli.parse_args(["--arch", "resnet20,resnet56", "--matmul-precision", "tf32", "--precision",
                        "bf16", "--frameworks", "flaxres-jit,torch-compile", "--interleave"])
    assert a.matmul_precision == "tf32" and a.precision == "bf16" and a.interleave
    for bad in (["--matmul-precision", "fp16"], ["--frameworks", "flaxres-jit,jaxx"],
                ["--modes", "train,fit"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "jaxx" in err and "--modes" in err


def test_help_runs_without_importing_jax_or_torch():
    """XLA_FLAGS and the core pinning must be set before jax is imported."""
    code = ("import sys; from bench.speed import cli; "
            "print(sorted(m for m in ('jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-m", "bench.speed", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60)
    assert "--matmul-precision {highest,tf32}" in out.stdout


@pytest.mark.parametrize("cpu_ops", [flaxres.CpuOps(), flaxres.CpuOps.off()], ids=["cpu", "lax"])
def test_flops_of_resnet20_are_40_55m_multiply_adds(cpu_ops):
    """He et al.'s ResNet-20 forward: 40.55M multiply-adds per 32x32 image (convs + classifier).
    With the CPU paths each convolution sits in a per-platform ``cond``; one branch counts."""
    model = nnx.eval_shape(lambda: flaxres.create_model("resnet20", cpu_ops=cpu_ops))
    model.eval()  # shapes only: counting needs no weights
    graphdef, state = nnx.split(model)
    fwd = lambda s, x: nnx.merge(graphdef, s)(x)
    assert flops.flops_per_image(fwd, state, jnp.zeros((2, 32, 32, 3))) == 2 * 40_551_040


def test_precision_policy_is_set_in_both_frameworks_and_restored():
    torch = pytest.importorskip("torch")
    import jax

    from bench.speed import precision

    before = precision.describe()
    with precision.policy("highest") as p:
        assert jax.config.jax_default_matmul_precision == "highest"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert p["policy"] == "highest" and p == {"policy": "highest", **precision.describe()}
    with precision.policy("tf32") as p:
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.backends.mkldnn.conv.fp32_precision == "ieee"  # the CPU stays fp32
    assert precision.describe() == before


def test_markdown_states_the_precision_policy():
    timing = {"img_s": 100.0, "img_s_range": [90.0, 110.0], "compile_s": 1.0}
    results = {
        "machine": {"cpu": "cpu", "cores": 2, "jax": "j", "flax": "f", "torch": "t",
                    "date_utc": "now", "loadavg_start": None},
        "args": {"threads": 2, "precision": "fp32", "batch_size": 8},
        "peak": {"matmul_n": 8, "peak_flop_s": 1e9, "jax_flop_s": 1e9, "torch_flop_s": 1e9},
        "flaxres_ops": "on", "cpu_conv": "onednn 3.2.0", "malloc": "retain",
        "precision_policy": {"policy": "highest", "jax_default_matmul_precision": "highest",
                             "torch.backends.cuda.matmul.fp32_precision": "ieee"},
        "archs": {"resnet20": {"flops_per_image": 8.1e7, "weights": "w", "frameworks": {
            "flaxres-jit": {"train": timing}, "torch-eager": {"train": timing}}}},
    }
    md = report.markdown(results)
    assert "precision policy `highest`" in md and "cuda.matmul=ieee" in md
    assert "CPU convolutions: onednn 3.2.0, malloc: retain." in md
    assert "flaxres ÷ the fastest PyTorch: train 1.00×." in md
    assert "| resnet20 | flaxres-jit | 100 (90–110) | 2430% | 1.00× |" in md


def test_rounds_keep_each_frameworks_median_round():
    """--rounds: each framework's median round, the range over all rounds, and per-round ratios to
    the fastest PyTorch variant (rounds pair runs made close in time)."""
    def timing(img_s):
        return {"img_s": img_s, "img_s_range": [img_s - 5, img_s + 5], "compile_s": 1.0}

    rounds = [{"flaxres-jit": {"train": timing(t)}, "torch-compile": {"train": timing(c)}}
              for t, c in ((100, 90), (130, 140), (110, 100))]
    merged = cli.median_round(rounds)
    assert merged["flaxres-jit"]["train"]["img_s"] == 110
    assert merged["flaxres-jit"]["train"]["img_s_range"] == [95, 135]
    assert merged["torch-compile"]["train"]["img_s"] == 100
    line = report._against_fastest("resnet20", {"frameworks": merged, "rounds": rounds})
    assert line == ("- resnet20: flaxres ÷ the fastest PyTorch: train 1.10× (rounds: 1.11×, "
                    "0.93×, 1.10×).")


@pytest.mark.full
def test_tiny_run_writes_json_and_markdown(tmp_path):
    """The whole CLI, both frameworks in one process, 1 rep of a batch of 4 (~1 min on 2 cores)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--batch-size", "4", "--reps", "1", "--warmup",
         "0", "--threads", "1", "--interleave", "--frameworks", "flaxres-jit,torch-eager",
         "--skip-e2e", "--matmul-precision", "tf32", "--json", str(tmp_path / "r.json"),
         "--md", str(tmp_path / "r.md")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["precision_policy"]["policy"] == "tf32"
    assert set(r["archs"]["resnet20"]["frameworks"]) == {"flaxres-jit", "torch-eager"}
    assert r["archs"]["resnet20"]["flops_per_image"] == 2 * 40_551_040
    assert r["archs"]["resnet20"]["logits_rel_err"] < 1e-5
    assert "precision policy `tf32`" in (tmp_path / "r.md").read_text()


def test_profile_classifies_the_compiled_step():
    """bench.speed.profile names each thunk by its HLO instruction: convolutions, fusions with a
    reduction, and the backward pass (where JAX's metadata names it) are told apart in a compiled
    gradient."""
    import jax

    from bench.speed import profile

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.square(jax.nn.relu(y) - y.mean((0, 1, 2))).sum()

    w, x = jnp.ones((3, 3, 4, 4)), jnp.ones((2, 8, 8, 4))
    kinds = set(profile.classify_hlo(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text())
                .values())
    assert "convolution" in kinds and "fusion with a reduction" in kinds, kinds
    assert "fusion with a reduction (backward)" in kinds, kinds


def test_profile_names_multi_output_custom_calls():
    """A custom call with several results (oneDNN's BatchNorm: output, mean, variance,
    workspace) has a tuple type; it is named by its target like the single-output ones."""
    from bench.speed import profile

    hlo = ("ENTRY %main (p: f32[2,4,4,8]) -> f32[2,4,4,8] {\n"
           "  %bn = (f32[2,4,4,8]{3,2,1,0}, f32[8]{0}, f32[8]{0}, u8[256]{0}) custom-call("
           'f32[2,4,4,8]{3,2,1,0} %p), custom_call_target="flaxres_onednn_bn_fwd"\n}\n')
    assert profile.classify_hlo(hlo) == {"bn": "custom-call flaxres_onednn_bn_fwd"}


def test_per_convolution_timings_cover_every_shape_and_variant():
    """bench.speed.convs: flaxres's three oneDNN variants and PyTorch's convolution per shape."""
    from bench.speed import convs
    from flaxres.cpu import onednn

    want = {f"{hw}x{hw}x{c}" for hw, c in convs.SHAPES}
    got = convs.time_torch(batch=2, reps=1)
    assert {k.split()[0] for k in got} == want and min(got.values()) > 0
    if onednn.available():
        got = convs.time_flaxres(batch=2, reps=1)
        assert len(got) == 3 * len(want) and min(got.values()) > 0


def test_kernel_log_lines_of_both_onednn_versions_are_read():
    """bench.speed.kernels reads oneDNN 3.2's verbose lines (flaxres) and 3.12's (PyTorch),
    sums them per convolution shape and per batch, and ignores everything else."""
    from bench.speed import kernels

    shape = "mb128_ic16oc32_ih32oh16kh3sh2dh0ph1_iw32ow16kw3sw2dw0pw1"
    old = ("onednn_verbose,exec,cpu,convolution,brgconv:avx2,forward_training,src_f32::blocked:"
           f"acdb::f0 attr-post-ops:binary_sub:f32:2+eltwise_relu ,alg:convolution_direct,{shape},"
           "5.5")
    new = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,"
           f"src:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,{shape},4.5")
    reorder = ("onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:cdba::f0 "
               "dst_f32::blocked:Acdb8a::f0,attr-scratchpad:user ,,16x3x3x3,0.25")
    conv = "conv 32x32 16->32 k3 s2"
    assert kernels.parse_line(old) == (conv, 5.5)
    assert kernels.parse_line(new) == (conv, 4.5)
    assert kernels.parse_line(reorder) == ("reorder", 0.25)
    assert kernels.parse_line("onednn_verbose,info,cpu,runtime:OpenMP") is None
    assert kernels.parse_line("epoch 1") is None
    log = [old, kernels.MARK, old, new, reorder, '{"wall_ms": 12.0}']  # warm-up line first
    assert kernels.summarize("\n".join(log), reps=2) == {
        conv: 5.0, "convolutions": 5.0, "other oneDNN primitives": 0.125,
        "wall (with the logging)": 12.0}


def test_kernels_name_the_failing_worker_in_one_line(capsys):
    from bench.speed import kernels

    with pytest.raises(SystemExit) as e:
        kernels.main(["--arch", "resnet21", "--rounds", "1", "--reps", "1", "--batch", "2"])
    assert re.fullmatch(r"error: the flaxres worker failed: .*unknown model 'resnet21'.*",
                        str(e.value))
    with pytest.raises(SystemExit):
        kernels.main(["--reps", "0"])
    assert "--reps" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--rounds", "two"]])
def test_speed_commands_refuse_counts_below_one(argv, capsys):
    from bench.speed import cli, convs

    for parse in (convs.main, cli.parse_args):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "argument --rounds: must be a whole number of at least 1" in capsys.readouterr().err
