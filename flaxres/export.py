"""A model as a file that serves without flaxres: ONNX (onnxruntime or any ONNX runtime) or
serialized StableHLO (``jax.export``: JAX alone). Either takes the normalised NHWC float32 image
batch, as the model's ``__call__`` does, and returns the logits; the weights are inside.

    python -m flaxres.export resnet50 --pretrained resnet50.tv_in1k --format onnx --output r50.onnx
    python -m flaxres.export resnet20 --weights runs/r20 --format stablehlo --output r20.shlo

The batch dimension is symbolic unless ``--batch`` fixes it. The exported program is the model
in eval mode with plain ``lax`` operations (``CpuOps.off()``): oneDNN's kernels are a choice of
the JAX runtime on the CPU, not part of a portable program, and the StableHLO artifact is
lowered for the CPU and CUDA alike. Convolutions and matmuls are exported at full fp32
precision, so a GPU does not fall back to TF32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from flaxres.convert import WeightsError
from flaxres.models import BasicBlock, BatchNorm, ResNet
from flaxres.ops import CpuOps
from flaxres.registry import create_model, default_cfg

FORMATS = ("onnx", "stablehlo")
PLATFORMS = ("cpu", "cuda")


class ExportError(ValueError):
    """The model cannot be exported in this format; the message names the cause."""


def load(arch: str, *, weights: str | os.PathLike | None = None,
         pretrained: str | None = None) -> ResNet:
    """``arch`` built for export (eval mode, plain ``lax``), with ``weights`` (a file, workdir or
    URL that :func:`flaxres.create_model` reads) or the named ``pretrained`` set (``tag`` or
    ``arch.tag``), else freshly initialised."""
    if weights is not None and pretrained is not None:
        raise ValueError("give --weights or --pretrained, not both")
    if pretrained is not None:
        name = pretrained if "." in pretrained else f"{arch}.{pretrained}"
        if name.partition(".")[0] != arch:
            raise ValueError(f"--pretrained {pretrained}: weights of {name.partition('.')[0]}, "
                             f"not {arch}")
        model = create_model(name, pretrained=True, cpu_ops=CpuOps.off())
    else:
        model = create_model(arch, pretrained=weights, cpu_ops=CpuOps.off())
    model.eval()
    return model


def fold_batch_norm(model: ResNet) -> ResNet:
    """A copy of an eval-mode model in which each BatchNorm that follows a convolution is folded
    into it: the kernel scaled by ``scale / sqrt(var + eps)`` per output channel, plus a bias of
    ``bias - mean * that``. The same function up to fp32 rounding, as one convolution where a
    runtime would otherwise see a convolution and four elementwise operations (``torch.onnx``
    folds them the same way). Pre-activation BatchNorms, which precede their convolution, stay."""
    model = nnx.clone(model)

    def fold(conv: nnx.Conv, bn: BatchNorm) -> None:
        inv = bn.running_scale()
        conv.kernel[...] = conv.kernel[...] * inv
        conv.bias = nnx.Param(bn.bias[...] - bn.mean[...] * inv)
        conv.use_bias = True

    for _, m in model.iter_modules():
        if isinstance(m, (ResNet, BasicBlock)) and not m.preact:
            for i in (1, 2, 3):
                conv, bn = getattr(m, f"conv{i}", None), getattr(m, f"bn{i}", None)
                if conv is not None and bn is not None:
                    fold(conv, bn)
                    setattr(m, f"bn{i}", None)
        if isinstance(m, BasicBlock) and m.downsample is not None:
            layers = m.downsample.layers
            if len(layers) == 2:
                fold(*layers)
                m.downsample = nnx.Sequential(layers[0])
    return model


def forward(model: ResNet) -> Callable[[jax.Array], jax.Array]:
    """The model's eval-mode forward pass as a pure function of the image batch."""
    graphdef, state = nnx.split(model)

    def logits(images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(images)

    return logits


def to_stablehlo(model: ResNet, *, image_size: int, batch: int | None = None,
                 platforms: tuple[str, ...] = PLATFORMS) -> jax.export.Exported:
    """``jax.export`` of the forward pass for ``platforms``; ``.serialize()`` is the artifact."""
    b = batch if batch is not None else jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jax.export.export(jax.jit(forward(model)), platforms=platforms)(spec)


def to_onnx(model: ResNet, *, image_size: int, batch: int | None = None, name: str = "flaxres"):
    """The forward pass, BatchNorm folded (:func:`fold_batch_norm`), as an ONNX ``ModelProto``
    (jax2onnx), checked by ``onnx.checker`` with shape inference. A JAX operation jax2onnx has no
    ONNX form for, or a missing ``export`` extra, is an :class:`ExportError` naming it."""
    try:
        import onnx
        from jax2onnx import to_onnx as jax2onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs {e.name}: pip install 'flaxres[export]'") from None

    try:
        proto = jax2onnx(forward(fold_batch_norm(model)),
                         [(batch or "batch", image_size, image_size, 3)],
                         model_name=name, input_names=["images"], output_names=["logits"])
    except NotImplementedError as e:
        primitive = str(e).rsplit("primitive", 1)[-1].strip(" '\"")
        raise ExportError(f"--format onnx: jax2onnx has no ONNX form for the JAX operation "
                          f"{primitive!r} in {name}") from None
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(arch: str, output: str | os.PathLike, *, format: str, weights=None,
           pretrained: str | None = None, image_size: int | None = None,
           batch: int | None = None) -> Path:
    """Writes ``arch`` (with its weights) to ``output`` in ``format``: all of it or nothing."""
    if format not in FORMATS:
        raise ExportError(f"--format {format}: one of {', '.join(FORMATS)}")
    model = load(arch, weights=weights, pretrained=pretrained)
    size = image_size or default_cfg(arch).input_size
    if format == "onnx":
        blob = to_onnx(model, image_size=size, batch=batch, name=arch).SerializeToString()
    else:
        blob = bytes(to_stablehlo(model, image_size=size, batch=batch).serialize())
    output = Path(output)
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.",
                                     delete=False) as tmp:
        tmp.write(blob)
    os.replace(tmp.name, output)  # readers never see a half-written file
    return output


def load_stablehlo(path: str | os.PathLike) -> jax.export.Exported:
    """A serialized artifact back; ``.call(images)`` runs it (this needs JAX only)."""
    return jax.export.deserialize(bytearray(Path(path).read_bytes()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message}\n")

    p = Parser(prog="python -m flaxres.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="architecture: any flaxres.list_models() name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a PyTorch or .safetensors file, a training workdir or an "
                     "https:// URL (default: fresh weights)")
    src.add_argument("--pretrained", help="a shipped weight set: tag or arch.tag "
                     "(flaxres.list_pretrained())")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="the file to write")
    p.add_argument("--image-size", type=int, help="input height and width (default: the "
                   "architecture's, 32 for CIFAR nets and 224 for ImageNet nets)")
    p.add_argument("--batch", type=int, help="a fixed batch size (default: symbolic)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = export(args.arch, args.output, format=args.format, weights=args.weights,
                     pretrained=args.pretrained, image_size=args.image_size, batch=args.batch)
    except (ValueError, WeightsError, FileNotFoundError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg = default_cfg(args.arch)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): NHWC float32 images normalised "
          f"with mean {cfg.mean} and std {cfg.std} -> logits")


if __name__ == "__main__":
    main()

