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
import functools
import itertools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxres.convert import WeightsError
from flaxres.models import BasicBlock, BatchNorm, ResNet
from flaxres.ops import CpuOps
from flaxres.registry import create_model, default_cfg

FORMATS = ("onnx", "stablehlo")
PLATFORMS = ("cpu", "cuda")
# jax2onnx's graph optimizer takes time that grows much faster than the graph (its transpose pass
# re-sweeps the graph and rebuilds a set of every node for each lookup), so deeper nets convert in
# segments of at most this many blocks, joined into one graph.
SEGMENT_BLOCKS = 64


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


def forward(model: ResNet, start: int = 0, stop: int | None = None
            ) -> Callable[[jax.Array], jax.Array]:
    """The model's eval-mode forward pass as a pure function of the image batch; with ``start``
    and ``stop``, of blocks ``start`` to ``stop`` only (:meth:`ResNet.blocks`): from the images
    through the stem where ``start`` is 0, to the logits through the head where ``stop`` is the
    last block, NHWC activations in and out between."""
    graphdef, state = nnx.split(model)
    num_blocks = len(model.blocks())
    stop = num_blocks if stop is None else stop

    def segment(x: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, state)
        if start == 0:
            x = net.forward_stem(x)
        for block in net.blocks()[start:stop]:
            x = block(x)
        return net.forward_head(net.head_norm(x)) if stop == num_blocks else x

    return segment


def to_stablehlo(model: ResNet, *, image_size: int, batch: int | None = None,
                 platforms: tuple[str, ...] = PLATFORMS) -> jax.export.Exported:
    """``jax.export`` of the forward pass for ``platforms``; ``.serialize()`` is the artifact."""
    b = batch if batch is not None else jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jax.export.export(jax.jit(forward(model)), platforms=platforms)(spec)


def to_onnx(model: ResNet, *, image_size: int, batch: int | None = None, name: str = "flaxres",
            segment_blocks: int = SEGMENT_BLOCKS):
    """The forward pass, BatchNorm folded (:func:`fold_batch_norm`), as an ONNX ``ModelProto``
    (jax2onnx), checked by ``onnx.checker`` with shape inference. A net of more than
    ``segment_blocks`` blocks converts in as few equal segments as that allows, joined at NCHW
    activations. A JAX operation jax2onnx has no ONNX form for, or a missing ``export`` extra, is
    an :class:`ExportError` naming it."""
    try:
        import onnx
        from jax2onnx import to_onnx as jax2onnx
    except ImportError as e:
        raise ExportError(f"--format onnx needs {e.name}: pip install 'flaxres[export]'") from None

    model = fold_batch_norm(model)
    num_blocks = len(model.blocks())
    cuts = np.linspace(0, num_blocks, -(-num_blocks // segment_blocks) + 1).round().astype(int)
    shape = (batch or "batch", image_size, image_size, 3)
    segments = []
    for i, (start, stop) in enumerate(itertools.pairwise(cuts.tolist())):
        first, last = start == 0, stop == num_blocks
        fn = forward(model, start, stop)
        try:
            segment = jax2onnx(fn, [shape], model_name=name,
                               input_names=["images" if first else f"block{start}"],
                               output_names=["logits" if last else f"block{stop}"],
                               inputs_as_nchw=None if first else [0],
                               outputs_as_nchw=None if last else [0])
        except NotImplementedError as e:
            primitive = str(e).rsplit("primitive", 1)[-1].strip(" '\"")
            raise ExportError(f"--format onnx: jax2onnx has no ONNX form for the JAX operation "
                              f"{primitive!r} in {name}") from None
        if len(cuts) > 2:
            segment = onnx.compose.add_prefix(segment, f"segment{i}/", rename_inputs=False,
                                              rename_outputs=False)
        segments.append(segment)
        shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *shape[1:]), jnp.float32)).shape
        shape = (batch or "batch", *shape[1:])
    proto = functools.reduce(_join, segments)
    fold_max_pool_padding(proto)
    global_average_pool(proto)
    slice_only_cut_axes(proto)
    subsampling_shortcut_as_convolution(proto)
    nhwc_input_convolution(proto)
    cancel_inverse_transposes(proto)
    _drop_unused_initializers(proto.graph)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _join(head, tail):
    """``head`` followed by ``tail``, whose only input is ``head``'s only output (the same name,
    a segment's NCHW activations): one model, the seam's shape kept as a ``value_info``."""
    import onnx

    seam = head.graph.output[0]
    joined = onnx.compose.merge_models(head, tail, io_map=[(seam.name, seam.name)])
    joined.graph.value_info.append(seam)
    return joined


def cancel_inverse_transposes(proto) -> int:
    """Removes each ``Transpose`` that undoes the ``Transpose`` it reads, its readers reading
    that one's input instead, and the first one where nothing else reads it; in place, returns
    how many. A segment's NCHW output read back as NHWC by the next segment
    (:data:`SEGMENT_BLOCKS`) leaves such pairs at the seams."""
    graph = proto.graph
    consumers, _, attr = _graph_index(graph)
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {v.name for v in graph.output}
    cancelled = []
    for node in [n for n in graph.node if n.op_type == "Transpose"]:
        before = producer.get(node.input[0])
        if before is None or before.op_type != "Transpose" or node.output[0] in outputs:
            continue
        perm, first = attr(node, "perm"), attr(before, "perm")
        if perm is None or first is None or [first[p] for p in perm] != list(range(len(perm))):
            continue
        for reader in consumers.get(node.output[0], []):
            reader.input[:] = [before.input[0] if v == node.output[0] else v
                               for v in reader.input]
        cancelled.append(node)
    _drop(graph, cancelled)
    read = {name for node in graph.node for name in node.input} | outputs
    _drop(graph, [n for n in {id(producer[n.input[0]]): producer[n.input[0]]
                              for n in cancelled}.values() if n.output[0] not in read])
    return len(cancelled)


def _graph_index(graph):
    """Each value's consuming nodes, the constant values (initializers and ``Constant`` nodes)
    and an attribute reader, for the rewrites below."""
    from onnx import helper, numpy_helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def attr(node, name: str):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                    None)

    return consumers, constants, attr


def _static_shapes(graph) -> dict[str, list[int | None]]:
    """Each value's recorded shape, a symbolic or unknown dimension as None."""
    return {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
            for v in list(graph.value_info) + list(graph.input)}


def _drop(graph, nodes) -> None:
    """Removes ``nodes``; the initializers only they read go at the end of :func:`to_onnx`
    (:func:`_drop_unused_initializers`)."""
    for node in nodes:
        graph.node.remove(node)


def _drop_unused_initializers(graph) -> None:
    """Removes the initializers no node reads: those of the nodes the rewrites dropped or
    rewired."""
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def fold_max_pool_padding(proto) -> int:
    """Folds each ``Pad`` (constant -inf, spatial axes of NHWC) that reaches a ``MaxPool`` through
    the NHWC-to-NCHW ``Transpose`` into the pool's ``pads``, in place; returns how many. The
    stem's max pool pads explicitly (:func:`flaxres.models.max_pool_3x3_s2`); as a ``Pad`` of its
    own it keeps onnxruntime from running stem and pool in one blocked layout, the way PyTorch's
    export (a ``MaxPool`` with ``pads``) runs."""
    import numpy as np
    from onnx import helper

    graph = proto.graph
    consumers, constants, attr = _graph_index(graph)
    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        nxt = consumers.get(pad.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Transpose" or attr(nxt[0], "perm") != [0, 3, 1, 2]:
            continue
        transpose = nxt[0]
        pools = consumers.get(transpose.output[0], [])
        if len(pools) != 1 or pools[0].op_type != "MaxPool" or len(pad.input) != 3:
            continue
        pool = pools[0]
        pads, value = constants.get(pad.input[1]), constants.get(pad.input[2])
        if (pads is None or value is None or pads.shape != (8,) or pads[[0, 3, 4, 7]].any()
                or attr(pad, "mode") not in (None, b"constant") or not np.all(np.isneginf(value))
                or attr(pool, "auto_pad") not in (None, b"VALID", b"NOTSET")
                or attr(pool, "pads") is not None):
            continue
        transpose.input[0] = pad.input[0]
        for info in [v for v in graph.value_info if v.name == transpose.output[0]]:
            graph.value_info.remove(info)  # its recorded shape was the padded one
        kept = [a for a in pool.attribute if a.name != "auto_pad"]
        del pool.attribute[:]
        pool.attribute.extend(kept + [helper.make_attribute(
            "pads", [int(v) for v in pads[[1, 2, 5, 6]]])])
        _drop(graph, [pad])
        folded += 1
    return folded


def global_average_pool(proto) -> int:
    """Rewrites each ``Div(ReduceSum(x, axes=[1, 2], keepdims=0), H*W)`` of an NHWC ``x`` (the
    mean before the classifier) as ``Flatten(GlobalAveragePool(Transpose(x)))``, in place;
    returns how many. onnxruntime then pools in its blocked layout, as in PyTorch's export."""
    from onnx import helper

    graph = proto.graph
    consumers, constants, attr = _graph_index(graph)
    shapes = _static_shapes(graph)
    rewritten = 0
    for total in [n for n in graph.node if n.op_type == "ReduceSum"]:
        nxt = consumers.get(total.output[0], [])
        axes = constants.get(total.input[1]) if len(total.input) == 2 else None
        shape = shapes.get(total.input[0])
        if (len(nxt) != 1 or nxt[0].op_type != "Div" or axes is None
                or sorted(axes.tolist()) != [1, 2] or attr(total, "keepdims") != 0
                or shape is None or len(shape) != 4 or None in shape[1:3]):
            continue
        div = nxt[0]
        divisor = constants.get(div.input[1])
        if divisor is None or divisor.size != 1 or float(divisor) != shape[1] * shape[2]:
            continue
        x, out = total.input[0], div.output[0]
        at = list(graph.node).index(total)
        _drop(graph, [total, div])
        for k, node in enumerate([
                helper.make_node("Transpose", [x], [f"{out}_nchw"], perm=[0, 3, 1, 2]),
                helper.make_node("GlobalAveragePool", [f"{out}_nchw"], [f"{out}_pooled"]),
                helper.make_node("Flatten", [f"{out}_pooled"], [out], axis=1)]):
            graph.node.insert(at + k, node)
        rewritten += 1
    return rewritten


def slice_only_cut_axes(proto) -> int:
    """Narrows each ``Slice`` over every axis, whose ends come from the input's runtime shape
    (the symbolic batch), to the axes it cuts, in place; returns how many. The option-A
    shortcut's strided subsampling then is a plain ``Slice`` of H and W with constant inputs,
    as in PyTorch's export, instead of a shape computation that splits onnxruntime's blocked
    layout around it."""
    import numpy as np
    from onnx import numpy_helper

    graph = proto.graph
    consumers, constants, _ = _graph_index(graph)
    producer = {out: node for node in graph.node for out in node.output}
    # Each dimension as its size or its symbol ("batch").
    shapes = {v.name: [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.input)}
    narrowed = 0
    for node in [n for n in graph.node if n.op_type == "Slice" and len(n.input) == 5]:
        data, starts, ends, axes, steps = node.input
        starts, axes, steps = (constants.get(v) for v in (starts, axes, steps))
        concat = producer.get(ends)
        dims = shapes.get(data)
        if (starts is None or axes is None or steps is None or dims is None
                or concat is None or concat.op_type != "Concat" or len(concat.input) != len(axes)):
            continue
        chain, full = [concat], []
        for i, (axis, part) in enumerate(zip(axes.tolist(), concat.input, strict=True)):
            gather = producer.get(part)
            shape = producer.get(gather.input[0]) if gather is not None else None
            index = constants.get(gather.input[1]) if gather is not None else None
            # The end is the runtime size of a dimension with the same symbol as this axis.
            runtime = (gather.op_type == "Gather" and shape is not None
                       and shape.op_type == "Shape" and index is not None and index.size == 1
                       and isinstance(dims[axis], str)
                       and (shapes.get(shape.input[0]) or [None] * 8)[int(index.reshape(-1)[0])]
                       == dims[axis]
                       ) if gather is not None else False
            chain += [gather, shape] if runtime else []
            end = None if runtime else constants.get(part)
            full.append(starts[i] == 0 and steps[i] == 1 and (runtime or (
                end is not None and isinstance(dims[axis], int) and end >= dims[axis])))
        keep = [i for i, f in enumerate(full) if not f]
        if (not keep or len(keep) == len(full)
                or any(concat.input[i] not in constants for i in keep)):
            continue
        ends = np.concatenate([constants[concat.input[i]].reshape(1) for i in keep])
        names = []
        for what, values in (("starts", starts[keep]), ("ends", ends), ("axes", axes[keep]),
                             ("steps", steps[keep])):
            names.append(f"{node.output[0]}_{what}")
            graph.initializer.append(numpy_helper.from_array(values.astype(np.int64), names[-1]))
        del node.input[1:]
        node.input.extend(names)
        chain = list({id(n): n for n in chain}.values())
        ours = {id(n) for n in chain} | {id(node)}
        _drop(graph, [n for n in chain if all(id(c) in ours for o in n.output
                                              for c in consumers.get(o, []))])
        narrowed += 1
    return narrowed


def subsampling_shortcut_as_convolution(proto) -> int:
    """Rewrites each option-A shortcut, ``Pad`` (zero channels, NHWC) of a strided ``Slice``
    (every s-th row and column from the first), as a 1x1 ``Conv`` of stride s whose constant
    0/1 kernel places each channel at its padded position, in NCHW between two ``Transpose``
    nodes; in place, returns how many. Each output is one input times 1 plus zeros, the same
    value bit for bit. onnxruntime keeps a convolution in its blocked layout, where a
    ``Slice`` and a ``Pad`` take the tensor out of it and back, as in PyTorch's export."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    consumers, constants, attr = _graph_index(graph)
    shapes = _static_shapes(graph)
    rewritten = 0
    for cut in [n for n in graph.node if n.op_type == "Slice" and len(n.input) == 5]:
        nxt = consumers.get(cut.output[0], [])
        starts, ends, axes, steps = (constants.get(v) for v in cut.input[1:])
        dims = shapes.get(cut.input[0])
        if (len(nxt) != 1 or nxt[0].op_type != "Pad" or len(nxt[0].input) != 3
                or any(v is None for v in (starts, ends, axes, steps)) or dims is None
                or len(dims) != 4 or None in dims[1:] or sorted(axes.tolist()) != [1, 2]
                or starts.any() or len(set(steps.tolist())) != 1
                or any(e < dims[a] for a, e in zip(axes.tolist(), ends.tolist(), strict=True))):
            continue
        pad = nxt[0]
        pads, value = constants.get(pad.input[1]), constants.get(pad.input[2])
        if (pads is None or value is None or pads.shape != (8,) or pads[[0, 1, 2, 4, 5, 6]].any()
                or (pads < 0).any() or value.any() or attr(pad, "mode") not in (None, b"constant")):
            continue
        channels, before, after = dims[3], int(pads[3]), int(pads[7])
        kernel = np.zeros((before + channels + after, channels, 1, 1), np.float32)
        kernel[before + np.arange(channels), np.arange(channels)] = 1
        out = pad.output[0]
        kernel_name = f"{out}_kernel"
        graph.initializer.append(numpy_helper.from_array(kernel, kernel_name))
        at = list(graph.node).index(cut)
        _drop(graph, [cut, pad])
        stride = int(steps[0])
        for k, node in enumerate([
                helper.make_node("Transpose", [cut.input[0]], [f"{out}_nchw"], perm=[0, 3, 1, 2]),
                helper.make_node("Conv", [f"{out}_nchw", kernel_name], [f"{out}_conv"],
                                 kernel_shape=[1, 1], strides=[stride, stride]),
                helper.make_node("Transpose", [f"{out}_conv"], [out], perm=[0, 2, 3, 1])]):
            graph.node.insert(at + k, node)
        rewritten += 1
    return rewritten


def nhwc_input_convolution(proto) -> int:
    """Rewrites the NHWC input's ``Transpose`` to NCHW, where only convolutions consume it, as a
    ``Reshape`` of each image to one channel of H rows by W*C values (the NHWC memory as it is,
    no copy) convolved with the same weights laid out along that row: kernel (kh, kw*C),
    strides (sh, sw*C), pads scaled by C. Each output is the same sum of the same products, and
    the input needs no transposed copy, which a runtime would make on every call and PyTorch's
    export (NCHW input) does not have. Returns how many inputs were rewritten, in place."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    consumers, constants, attr = _graph_index(graph)
    shapes = _static_shapes(graph)
    initializers = {t.name for t in graph.initializer}  # kernels a Constant node holds stay
    rewritten = 0
    for value in graph.input:
        dims = shapes[value.name]
        nxt = consumers.get(value.name, [])
        if len(dims) != 4 or None in dims[1:] or len(nxt) != 1 or nxt[0].op_type != "Transpose" \
                or attr(nxt[0], "perm") != [0, 3, 1, 2]:
            continue
        transpose, (_, height, width, channels) = nxt[0], dims
        convs = consumers.get(transpose.output[0], [])
        if not convs or any(
                c.op_type != "Conv" or c.input[0] != transpose.output[0]
                or c.input[1] not in initializers
                or (attr(c, "group") or 1) != 1 or set(attr(c, "dilations") or [1]) != {1}
                or attr(c, "auto_pad") not in (None, b"NOTSET") for c in convs):
            continue
        rows = f"{value.name}_rows"
        shape = numpy_helper.from_array(np.array([0, 1, height, width * channels], np.int64),
                                        f"{rows}_shape")
        graph.initializer.append(shape)
        for conv in convs:
            w = constants[conv.input[1]]  # (O, C, kh, kw) -> (O, 1, kh, kw * C): [kw][C] order
            o, _, kh, kw = w.shape
            laid = numpy_helper.from_array(
                np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, 1, kh, kw * channels)),
                f"{conv.input[1]}_rows")
            graph.initializer.append(laid)
            sh, sw = attr(conv, "strides") or [1, 1]
            top, left, bottom, right = attr(conv, "pads") or [0, 0, 0, 0]
            kept = [a for a in conv.attribute if a.name not in ("strides", "pads", "kernel_shape")]
            del conv.attribute[:]
            conv.attribute.extend(kept + [
                helper.make_attribute("strides", [sh, sw * channels]),
                helper.make_attribute("pads", [top, left * channels, bottom, right * channels]),
                helper.make_attribute("kernel_shape", [kh, kw * channels])])
            conv.input[0], conv.input[1] = rows, laid.name  # the old kernel: dropped unused
        at = list(graph.node).index(transpose)
        graph.node.remove(transpose)
        for info in [v for v in graph.value_info if v.name == transpose.output[0]]:
            graph.value_info.remove(info)
        graph.node.insert(at, helper.make_node("Reshape", [value.name, shape.name], [rows]))
        rewritten += 1
    return rewritten


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

