"""Per-layer summary (output shape, parameters, multiply-adds), like torchsummary's table.

    python -m flaxres.summary resnet20 [--input-size 32] [--num-classes 10]

Shapes come from an abstract trace (``jax.eval_shape``): nothing is computed, so even ResNet-152
at 224x224 is summarised instantly.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from flaxres.models import BatchNorm, PadShortcut, ResNet
from flaxres.registry import count_params, create_model, model_stem

LEAF_TYPES = (nnx.Conv, nnx.Linear, BatchNorm, PadShortcut)


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _macs(module: nnx.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-adds for one image: convs and the classifier (BN, ReLU, adds are not counted,
    following the convention behind the published 40.55M for ResNet-20)."""
    if isinstance(module, nnx.Conv):
        kh, kw, cin_per_group, _ = module.kernel.shape
        return math.prod(out_shape[1:]) * kh * kw * cin_per_group
    if isinstance(module, nnx.Linear):
        return math.prod(module.kernel.shape)
    return 0


@contextmanager
def _record_calls(records: list[tuple[int, tuple[int, ...]]]):
    """Temporarily wraps the leaf types' ``__call__`` to note (module id, output shape)."""
    originals = {cls: cls.__call__ for cls in LEAF_TYPES}

    def wrap(original):
        def call(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            records.append((id(self), tuple(out.shape)))
            return out
        return call

    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def summarize(model: ResNet, input_size: int = 32, in_channels: int = 3) -> list[LayerRow]:
    """One row per leaf layer in call order; the model is left unchanged. The trace runs a
    train-mode copy: in eval mode the CPU backend fuses each convolution with its BatchNorm, and
    neither layer's own call would show."""
    probe = nnx.clone(model)
    probe.train()
    rows: list[LayerRow] = []

    def trace(m: ResNet, x: jax.Array) -> jax.Array:
        modules = {id(mod): (".".join(map(str, path)), mod) for path, mod in nnx.iter_modules(m)}
        records: list[tuple[int, tuple[int, ...]]] = []
        with _record_calls(records):
            y = m(x)
        for module_id, shape in records:
            name, module = modules[module_id]
            rows.append(LayerRow(name, type(module).__name__, shape, count_params(module),
                                 _macs(module, shape)))
        return y

    nnx.eval_shape(trace, probe,
                   jax.ShapeDtypeStruct((1, input_size, input_size, in_channels), jnp.float32))
    return rows


def format_table(rows: list[LayerRow], model: ResNet) -> str:
    params = count_params(model)
    buffers = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    macs = sum(r.macs for r in rows)
    width = max(len(r.name) + len(r.kind) + 3 for r in rows)
    rule = "-" * (width + 52)
    header = (f"{'Layer (type)':>{width}}  {'Output Shape (NHWC)':>22}  {'Param #':>12}  "
              f"{'Mult-Adds':>12}")
    lines = [rule, header, "=" * len(rule)]
    for r in rows:
        shape = str([-1, *r.output_shape[1:]])
        lines.append(f"{f'{r.name} ({r.kind})':>{width}}  {shape:>22}  {r.params:>12,}  "
                     f"{r.macs:>12,}")
    lines += ["=" * len(rule),
              f"Total params: {params:,}",
              f"Trainable params: {params:,}",
              f"Non-trainable (BatchNorm running mean/var): {buffers:,}",
              f"Params size (fp32): {params * 4 / 2**20:.2f} MB",
              f"Forward mult-adds per image: {macs / 1e6:.2f}M ({2 * macs / 1e6:.2f} MFLOPs)",
              rule]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", help="a name from flaxres.list_models()")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side (default: 224 for ImageNet-stem nets, else 32)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier width (default: 1000 for ImageNet-stem nets, else 10)")
    args = p.parse_args(argv)
    imagenet = model_stem(args.arch) == "imagenet"
    num_classes = args.num_classes or (1000 if imagenet else 10)
    model = create_model(args.arch, num_classes=num_classes)
    input_size = args.input_size or (224 if imagenet else 32)
    print(f"{args.arch}: input [-1, {input_size}, {input_size}, 3], {num_classes} classes")
    print(format_table(summarize(model, input_size), model))


if __name__ == "__main__":
    main()
