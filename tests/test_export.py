"""flaxres.export: the ONNX file, run by onnxruntime, gives flaxres's eval logits and those of
PyTorch's own ``torch.onnx.export`` of the same weights, one net per block kind; the StableHLO
artifact, reloaded in a process that cannot import flaxres, gives the jitted model's logits bit
for bit; bad input is one line and writes nothing. The full tier exports every registered net."""

import collections
import io
import subprocess
import sys
import textwrap

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from flax import nnx

import flaxres
from flaxres import export
from flaxres.convert import to_torch
from parity.reference import create_torch_model

# One small net per block kind, each with the PyTorch module its weights load into.
NETS = {
    "basic, option-A shortcut": ("resnet20", 32, lambda: create_torch_model("resnet20")),
    "basic, ImageNet stem": (
        lambda **kw: flaxres.imagenet_resnet(18, **kw), 64,
        lambda: torchvision.models.resnet18(num_classes=10)),
    "bottleneck, ImageNet stem": (
        lambda **kw: flaxres.resnext((1, 1, 1, 1), 1, 64, **kw), 64,
        lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                                 [1, 1, 1, 1], num_classes=10)),
    "ResNeXt groups": (
        lambda **kw: flaxres.resnext((1, 1, 1, 1), 8, 4, **kw), 64,
        lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                                 [1, 1, 1, 1], groups=8, width_per_group=4,
                                                 num_classes=10)),
}


def with_random_statistics(model: flaxres.ResNet, seed: int = 0) -> flaxres.ResNet:
    """BatchNorm scales, shifts and running statistics away from their identity defaults, so
    that folding or dropping a BatchNorm shows."""
    rng = np.random.default_rng(seed)
    for _, bn in model.iter_modules():
        if isinstance(bn, flaxres.BatchNorm):
            c = bn.scale.shape[0]
            bn.scale[...] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            bn.bias[...] = rng.normal(0, 0.2, c).astype(np.float32)
            bn.mean[...] = rng.normal(0, 0.2, c).astype(np.float32)
            bn.var[...] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    return model


def build(kind: str) -> tuple[flaxres.ResNet, int, torch.nn.Module]:
    arch, size, torch_model = NETS[kind]
    kw = {"num_classes": 10, "cpu_ops": flaxres.CpuOps.off()}
    model = flaxres.create_model(arch, **kw) if isinstance(arch, str) else arch(
        rngs=nnx.Rngs(0), **kw)
    model = with_random_statistics(model)
    model.eval()
    ref = torch_model().eval()
    ref.load_state_dict(to_torch(model), strict=True)
    return model, size, ref


def run_onnx(proto: bytes, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", list(NETS))
def test_onnx_in_onnxruntime_equals_flaxres_and_pytorchs_own_export(kind):
    model, size, ref = build(kind)
    images = np.random.default_rng(1).normal(size=(3, size, size, 3)).astype(np.float32)
    proto = export.to_onnx(model, image_size=size)
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    ours = run_onnx(proto.SerializeToString(), images)
    want = np.asarray(jax.jit(model)(images))
    assert relative(ours, want) < 1e-5

    buf = io.BytesIO()
    torch.onnx.export(ref, (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),), buf,
                      dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}})
    theirs = run_onnx(buf.getvalue(), images.transpose(0, 3, 1, 2).copy())
    assert relative(ours, theirs) < 1e-5

    # The graph: no runtime shape arithmetic, pooling in ONNX's own pooling ops, the option-A
    # shortcuts as convolutions (no Slice or Pad), the NHWC input read as it is (a Reshape, no
    # transposed copy).
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    their_ops = collections.Counter(n.op_type for n in onnx.load_from_string(buf.getvalue())
                                    .graph.node)
    assert not ops.keys() & {"Shape", "Gather", "GatherND", "ReduceSum", "Slice", "Pad"}, ops
    assert ops["Conv"] == their_ops["Conv"] + their_ops["Pad"] and ops["GlobalAveragePool"] == 1
    assert [n.op_type for n in proto.graph.node if "images" in n.input] == ["Reshape"]
    assert all(any(a.name == "pads" for a in n.attribute) and n.input[0] in
               {t.output[0] for t in proto.graph.node if t.op_type == "Transpose"}
               for n in proto.graph.node if n.op_type == "MaxPool")


@pytest.mark.parametrize("kind,segment_blocks", [("basic, option-A shortcut", 3),
                                                  ("bottleneck, ImageNet stem", 1)])
def test_a_net_converted_in_segments_is_the_same_graph_and_function(kind, segment_blocks):
    # Nets deeper than export.SEGMENT_BLOCKS convert in segments joined at NCHW activations; here
    # shallow ones, cut at stage starts (an option-A shortcut or a projection after the seam).
    model, size, _ = build(kind)
    images = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
    pieces = export.to_onnx(model, image_size=size, segment_blocks=segment_blocks)
    assert relative(run_onnx(pieces.SerializeToString(), images),
                    np.asarray(jax.jit(model)(images))) < 1e-5
    # The seams add no work: the whole net's operations, no Transpose of a Transpose.
    whole = export.to_onnx(model, image_size=size)
    ops = collections.Counter(n.op_type for n in pieces.graph.node)
    assert not ops - collections.Counter(n.op_type for n in whole.graph.node), ops
    producer = {out: n.op_type for n in pieces.graph.node for out in n.output}
    assert not [n.name for n in pieces.graph.node
                if n.op_type == "Transpose" and producer.get(n.input[0]) == "Transpose"]


_RELOAD = textwrap.dedent("""
    import sys
    sys.modules["flaxres"] = None  # this process cannot import flaxres
    try:
        import flaxres
    except ImportError:
        pass
    else:
        raise SystemExit("flaxres was importable")
    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    assert exported.platforms == ("cpu", "cuda"), exported.platforms
    np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
""")


def test_stablehlo_reloads_without_flaxres_and_gives_the_jitted_models_logits(tmp_path):
    path = export.export("resnet20", tmp_path / "r20.shlo", format="stablehlo")
    model = export.load("resnet20")
    for n in (1, 5):  # the batch dimension is symbolic
        images = np.random.default_rng(n).normal(size=(n, 32, 32, 3)).astype(np.float32)
        np.save(tmp_path / "x.npy", images)
        subprocess.run([sys.executable, "-c", _RELOAD, str(path), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], check=True, cwd=tmp_path)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(jax.jit(export.forward(model))(images))
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)


@pytest.mark.parametrize("args,message", [
    (["resnet8", "--format", "onnx"], "error: unknown model 'resnet8'"),
    (["resnet20", "--format", "onnx", "--pretrained", "resnet18.tv_in1k"],
     "error: --pretrained resnet18.tv_in1k: weights of resnet18, not resnet20"),
    (["resnet20", "--format", "tflite"], "python -m flaxres.export: error: argument --format"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as e:
        export.main([*args, "--output", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_weights_of_another_arch_are_one_line(tmp_path, capsys):
    weights = tmp_path / "r32.safetensors"
    flaxres.weights.save_safetensors(flaxres.create_model("resnet32"), weights)
    with pytest.raises(SystemExit):
        export.main(["resnet20", "--weights", str(weights), "--format", "onnx", "--output",
                     str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "resnet20" in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_export_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(SystemExit) as e:
        export.main(["resnet20", "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1, err
    assert "--format onnx needs jax2onnx: pip install 'flaxres[export]'" in err
    assert not list(tmp_path.iterdir())


def test_an_operation_without_an_onnx_form_is_named(monkeypatch):
    # oneDNN's fused convolution + BatchNorm, chosen per platform in the program, has no ONNX
    # form; flaxres.export folds BatchNorm away first, so this takes leaving it in.
    monkeypatch.setattr(export, "fold_batch_norm", lambda model: model)
    model = flaxres.create_model("resnet20")
    model.eval()
    with pytest.raises(export.ExportError, match="no ONNX form for the JAX operation "
                                                 "'platform_index' in flaxres"):
        export.to_onnx(model, image_size=32)


def with_bounded_depth(model: flaxres.ResNet) -> flaxres.ResNet:
    """Each residual branch's last convolution scaled by 1/(number of blocks), so that fresh
    weights, whose eval-mode BatchNorms have unit statistics, keep resnet1202's activations
    finite: unscaled, they pass 1e30 by block 180 and overflow fp32 before the head."""
    blocks = model.blocks()
    for block in blocks:
        if block.has_shortcut:
            last = getattr(block, "conv3", None) or block.conv2
            last.kernel[...] = last.kernel[...] / len(blocks)
    return model


@pytest.mark.full
@pytest.mark.parametrize("arch", flaxres.list_models())
def test_every_registered_net_exports_to_a_checked_onnx_file(arch, tmp_path):
    size = min(flaxres.default_cfg(arch).input_size, 64)
    model = with_bounded_depth(export.load(arch))
    flaxres.weights.save_safetensors(model, tmp_path / "weights.safetensors")
    path = export.export(arch, tmp_path / f"{arch}.onnx", format="onnx", image_size=size,
                         weights=tmp_path / "weights.safetensors")
    onnx.checker.check_model(str(path), full_check=True)
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    assert relative(run_onnx(path.read_bytes(), images), np.asarray(jax.jit(model)(images))) < 1e-5
