"""Weights both ways between flaxres models and PyTorch state dicts.

The mapping is derived from the NNX module tree, not from per-architecture tables: each
``nnx.Conv`` / ``nnx.Linear`` / BatchNorm found by ``nnx.iter_modules`` maps to the PyTorch module
at the same dotted path (``nnx.List`` indices and ``nnx.Sequential`` layers become ``.0``), with
kernel layouts HWIO <-> OIHW and (in, out) <-> (out, in). Any parameter or statistic outside those
module types is an error, so a new layer type can never be skipped silently.

CLI (the source is anything ``create_model(pretrained=...)`` reads, the output's suffix picks
its format)::

    python -m flaxres.convert --arch resnet20 in.pth out_dir/            # -> Orbax
    python -m flaxres.convert --arch resnet20 runs/r20 r20.safetensors   # a training workdir
    python -m flaxres.convert --arch resnet20 out_dir/ back.pth          # -> PyTorch
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxres.models import BatchNorm

_IGNORED_SUFFIX = ".num_batches_tracked"  # only used by PyTorch's momentum=None (cumulative) BN
_LAYOUTS = {  # attr -> (torch name, layout)
    nnx.Conv: {"kernel": ("weight", "conv"), "bias": ("bias", "")},
    nnx.Linear: {"kernel": ("weight", "linear"), "bias": ("bias", "")},
    BatchNorm: {"scale": ("weight", ""), "bias": ("bias", ""), "mean": ("running_mean", ""),
                "var": ("running_var", "")},
    nnx.BatchNorm: {"scale": ("weight", ""), "bias": ("bias", ""), "mean": ("running_mean", ""),
                    "var": ("running_var", "")},
}
_WRAPPERS = ("state_dict", "model", "net")  # where training scripts keep the weights
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_SHORTCUT = re.compile(r"^(layer\d+\.\d+\.)(shortcut|downsample)\.")  # projection shortcuts
_TO_TORCH = {"conv": (3, 2, 0, 1), "linear": (1, 0)}  # HWIO -> OIHW, (in, out) -> (out, in)
_FROM_TORCH = {"conv": (2, 3, 1, 0), "linear": (1, 0)}


class WeightsError(ValueError):
    """Weights that cannot be loaded (unreadable file, failed download, ambiguous layout)."""


class ConversionError(WeightsError):
    """A state dict that does not fit the model: lists every missing/unexpected/mis-shaped key."""


@dataclass(frozen=True)
class _Entry:
    key: str  # PyTorch state-dict key
    path: tuple  # nnx state path
    layout: str
    var: nnx.Variable

    def torch_shape(self) -> tuple[int, ...]:
        shape = self.var.shape
        return tuple(shape[i] for i in _TO_TORCH[self.layout]) if self.layout else tuple(shape)


def _entries(module: nnx.Module) -> list[_Entry]:
    modules = dict(nnx.iter_modules(module))
    out = []
    for path, m in modules.items():
        layout = next((v for t, v in _LAYOUTS.items() if isinstance(m, t)), None)
        if layout is None:
            continue
        parts = [str(p) for i, p in enumerate(path)  # nnx.Sequential keeps children in `.layers`
                 if not (p == "layers" and isinstance(modules.get(path[:i]), nnx.Sequential))]
        prefix = "".join(p + "." for p in parts)
        for attr, (tname, kind) in layout.items():
            var = getattr(m, attr, None)
            if isinstance(var, nnx.Variable):
                out.append(_Entry(prefix + tname, (*path, attr), kind, var))
    covered = {e.path for e in out}
    unknown = [p for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
               if tuple(p) not in covered]
    if unknown:
        raise ConversionError("no PyTorch mapping for these variables (unsupported module type): "
                              + ", ".join(".".join(map(str, p)) for p in unknown))
    return out


def named_arrays(module: nnx.Module, state: nnx.State | None = None) -> dict[str, np.ndarray]:
    """The module's parameters and BN statistics under PyTorch names and layouts, as numpy.

    With ``state`` (same structure as the module's state, e.g. gradients from ``jax.grad``) its
    arrays are converted instead; paths missing from ``state`` are left out.
    """
    flat = None if state is None else {tuple(p): v for p, v in nnx.to_flat_state(state)}
    out = {}
    for e in _entries(module):
        v = e.var if flat is None else flat.get(e.path)
        if v is None:
            continue
        a = np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
        out[e.key] = np.ascontiguousarray(a.transpose(_TO_TORCH[e.layout]) if e.layout else a)
    return out


def state_dict_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """:func:`named_arrays` plus ``num_batches_tracked`` (written as 0: flaxres does not count
    batches, and PyTorch uses the count only for ``momentum=None``), so that the PyTorch
    reference loads the result with ``strict=True``."""
    sd = named_arrays(model)
    for key in [k for k in sd if k.endswith(".running_var")]:
        sd[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def to_torch(model: nnx.Module) -> dict[str, Any]:
    """A state dict that the PyTorch reference loads with ``strict=True``."""
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in state_dict_arrays(model).items()}


def load_state_dict(source: Any) -> dict[str, np.ndarray]:
    """Flat ``{key: numpy array}`` from a ``torch.save`` or safetensors file, an ``nn.Module``, a bare
    state dict, or a checkpoint dict holding one under ``state_dict`` / ``model`` / ``net`` (next
    to any non-tensor entries such as ``epoch`` or ``best_prec1``); the ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes are removed."""
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(source)
    if hasattr(source, "state_dict") and not isinstance(source, Mapping):
        source = source.state_dict()
    while isinstance(source, Mapping) and not any(_is_array(v) for v in source.values()):
        found = [k for k in _WRAPPERS if isinstance(source.get(k), Mapping)]
        if not found:
            raise WeightsError(f"no state dict found in a dict with keys {sorted(map(str, source))[:10]}"
                               f" (looked under {', '.join(map(repr, _WRAPPERS))})")
        if len(found) > 1:
            raise WeightsError(f"ambiguous checkpoint: state dicts under {', '.join(map(repr, found))};"
                               " pass the one to load")
        source = source[found[0]]
    if not isinstance(source, Mapping):
        raise WeightsError(f"cannot read a state dict from {type(source).__name__}")
    sd = {str(k): v for k, v in source.items() if _is_array(v)}
    changed = True
    while changed:  # DataParallel around torch.compile, or the other way round
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k.removeprefix(prefix): v for k, v in sd.items()}
                changed = True
    return {k: _to_numpy(v) for k, v in sd.items()}


def _read_file(path: str | os.PathLike) -> Any:
    """The object in a ``torch.save`` or safetensors file, told apart by their first bytes (not
    the suffix); an unreadable file is one WeightsError."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except FileNotFoundError as e:
        raise WeightsError("no such file or directory") from e
    except OSError as e:
        raise WeightsError(f"cannot read the file: {e.strerror or e}") from e
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or legacy pickle
        return _torch_load(path)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise WeightsError(f"not a readable safetensors file (truncated?): {e}") from e
    raise WeightsError("not a checkpoint: expected a PyTorch file (.pth/.pt/.th), a "
                       ".safetensors file or an Orbax checkpoint directory"
                       + (" (the file is empty)" if size == 0 else ""))


def _torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` of tensors and plain data only."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError("reading a PyTorch checkpoint needs PyTorch "
                           "(pip install 'flaxres[torch]')") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and unpickler errors of every kind
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError("not a readable PyTorch checkpoint (truncated, or not a checkpoint): "
                           f"{first}") from e


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or type(v).__name__ in ("Tensor", "Parameter")


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    v = v.detach().cpu()
    return (v.float() if v.is_floating_point() and v.element_size() < 4 else v).numpy()


_ALIASES = ((re.compile(r"^linear\."), "fc."),  # akamaster / kuangliu heads
            (re.compile(r"^(layer\d+\.\d+\.)shortcut\."), r"\1downsample."))  # kuangliu


def detect_layout(sd: Mapping[str, Any]) -> str:
    """Which repository's key names ``sd`` uses, from the keys present (never the file name),
    for messages: ``"torchvision"`` (also timm: ``fc`` head, ``downsample.{0,1}`` projections),
    ``"akamaster"`` (``linear`` head, option-A shortcuts without parameters), ``"kuangliu"``
    (``linear`` head, ``shortcut.{0,1}`` projections), or ``"mixed"`` for a hand-written module
    that takes one name from each (``fc`` with ``shortcut``: the names are aliases key by key)."""
    heads = {k.split(".")[0] for k in sd} & {"fc", "linear"}
    shortcuts = {m[2] for k in sd if (m := _SHORTCUT.match(k))}
    if heads == {"linear"} or (not heads and shortcuts == {"shortcut"}):
        return "kuangliu" if shortcuts == {"shortcut"} else "akamaster"
    if "linear" in heads or "shortcut" in shortcuts:
        return "mixed"
    return "torchvision"


def _flaxres_name(key: str) -> str:
    """A file's key under flaxres' (torchvision's) names: ``linear`` -> ``fc``,
    ``layerS.B.shortcut`` -> ``layerS.B.downsample``."""
    for pattern, replacement in _ALIASES:
        key = pattern.sub(replacement, key)
    return key


def torch_weights(source: Any) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    """``(state dict under flaxres names, layout, {flaxres name: the file's name})`` for anything
    :func:`load_state_dict` reads. Aliases are mapped key by key, so a module that mixes
    conventions loads; two keys of the file that name the same parameter raise
    :class:`WeightsError`."""
    sd = load_state_dict(source)
    out: dict[str, np.ndarray] = {}
    file_names: dict[str, str] = {}
    for key, value in sd.items():
        name = _flaxres_name(key)
        if name in out:
            first, second = sorted((file_names[name], key))
            raise WeightsError(f"ambiguous state dict: {first!r} and {second!r} are aliases of "
                               f"one parameter ({name})")
        out[name], file_names[name] = value, key
    return out, detect_layout(sd), file_names


def head_classes(sd: Mapping[str, np.ndarray]) -> int:
    """Classes of the classifier head of a state dict under flaxres names."""
    if "fc.weight" not in sd:
        raise WeightsError("cannot infer num_classes: no classifier head "
                           "('fc.weight' or 'linear.weight') in the state dict")
    return int(sd["fc.weight"].shape[0])


def from_torch(model: nnx.Module | str, source: Any, *, strict: bool = True) -> nnx.Module:
    """Loads PyTorch weights into ``model`` in place and returns it.

    ``model`` may be a registry name: the model is built with ``num_classes`` read from the
    head. ``source`` is anything :func:`load_state_dict` reads, in any layout
    :func:`detect_layout` knows. Mis-shaped keys always fail; with ``strict`` missing and
    unexpected keys fail too (PyTorch's ``load_state_dict`` rules); all problems are reported in
    one :class:`ConversionError`.
    """
    try:
        sd, layout, file_names = torch_weights(source)
    except WeightsError as e:
        if isinstance(source, (str, os.PathLike)):
            raise type(e)(f"{source}: {e}") from e
        raise
    if isinstance(model, str):
        from flaxres.registry import create_model

        arch, classes = model, head_classes(sd)
        # Strict: abstract, as every array comes from the file (no initialisation work).
        model = (nnx.eval_shape(lambda: create_model(arch, num_classes=classes)) if strict
                 else create_model(arch, num_classes=classes))
        return load_named(model, sd, strict=strict, layout=layout, file_names=file_names,
                          arch=arch)
    return load_named(model, sd, strict=strict, layout=layout, file_names=file_names)


def from_nnx_arrays(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays saved under dotted nnx paths (an Orbax checkpoint of ``nnx.state``) as a state dict
    under flaxres' PyTorch names and layouts, so that :func:`load_named` checks them like any
    other file; paths that ``model`` lacks keep their nnx names and show up as unexpected."""
    by_path = {".".join(map(str, e.path)): e for e in _entries(model)}
    out = {}
    for path, a in flat.items():
        e = by_path.get(path)
        if e is None:
            out[path] = a
        elif e.layout and a.ndim != len(_TO_TORCH[e.layout]):
            out[e.key] = a  # mis-shaped: reported with its saved shape
        else:
            out[e.key] = a.transpose(_TO_TORCH[e.layout]) if e.layout else a
    return out


def load_named(model: nnx.Module, sd: Mapping[str, np.ndarray], *, strict: bool = True,
               layout: str = "torchvision", file_names: Mapping[str, str] | None = None,
               fresh_head: bool = False, arch: str | None = None) -> nnx.Module:
    """Loads a state dict under flaxres names into ``model``. ``fresh_head``: the ``fc`` weights
    are neither loaded nor required (the model keeps its new head, e.g. for other classes);
    ``layout``, ``file_names`` ({flaxres name: the file's}) and ``arch`` make errors speak the
    file's names and name the model."""
    entries = [e for e in _entries(model) if not (fresh_head and e.key.startswith("fc."))]
    if fresh_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    expected = {e.key: e for e in entries}
    bn_prefixes = {e.key.removesuffix("running_var") for e in entries if e.key.endswith("running_var")}
    file_names = file_names or {}
    spelled = set(file_names.values())
    uses_linear = any(k.startswith("linear.") for k in spelled)
    uses_shortcut = any((m := _SHORTCUT.match(k)) and m[2] == "shortcut" for k in spelled)

    def shown(key: str) -> str:  # the file's name; for a key it lacks, in the file's spelling
        if key in file_names:
            return file_names[key]
        if uses_linear:
            key = re.sub(r"^fc\.", "linear.", key)
        if uses_shortcut:
            key = re.sub(r"^(layer\d+\.\d+\.)downsample\.", r"\1shortcut.", key)
        return key

    missing = [shown(k) for k in expected if k not in sd]
    unexpected = [shown(k) for k in sd if k not in expected and not (
        k.endswith(_IGNORED_SUFFIX) and k.removesuffix(_IGNORED_SUFFIX[1:]) in bn_prefixes)]
    misshaped = [f"{shown(k)}: checkpoint {tuple(sd[k].shape)}, model {e.torch_shape()}"
                 for k, e in expected.items() if k in sd and tuple(sd[k].shape) != e.torch_shape()]
    problems = [(f"{len(v)} {n}", v) for n, v in
                (("mis-shaped", misshaped), *((("missing", missing), ("unexpected", unexpected))
                                              if strict else ())) if v]
    if problems:
        raise ConversionError(
            f"state dict ({layout} layout{_file_blocks(sd)}) does not fit "
            f"{arch or type(model).__name__}{_model_blocks(model)}: " + "; ".join(
                f"{head}: {', '.join(keys)}" for head, keys in problems))
    for k, e in expected.items():
        if k in sd:
            a = sd[k].transpose(_FROM_TORCH[e.layout]) if e.layout else sd[k]
            # A copy: on the CPU jnp.asarray may alias the numpy view of a torch tensor, and the
            # model would change with the torch module it came from.
            e.var.set_value(jnp.array(a, dtype=e.var.dtype, copy=True))
    return model


def _model_blocks(model: nnx.Module) -> str:
    layers = [len(getattr(model, f"layer{i + 1}")) for i in range(getattr(model, "num_stages", 0))]
    return f" ({'-'.join(map(str, layers))} blocks per stage)" if layers else ""


def _file_blocks(sd: Mapping[str, np.ndarray]) -> str:
    """``", 3-3-3 blocks per stage"`` read from ``layerS.B.`` keys: which net the file holds."""
    blocks: dict[int, int] = {}
    for k in sd:
        if m := re.match(r"layer(\d+)\.(\d+)\.", k):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    if not blocks:
        return ""
    return ", " + "-".join(str(blocks.get(i, 0)) for i in range(1, max(blocks) + 1)) + \
        " blocks per stage"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flaxres.convert", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, help="registry name, e.g. resnet20")
    p.add_argument("src", help="any create_model(pretrained=...) source: a PyTorch or "
                   ".safetensors file, an Orbax directory or training workdir, a URL")
    p.add_argument("dst", help="by its suffix: .safetensors, .pth/.pt/.th (PyTorch state dict), "
                   "else an Orbax directory")
    args = p.parse_args(argv)
    from flaxres.registry import create_model

    dst = Path(args.dst)
    try:
        model = create_model(args.arch, pretrained=args.src)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if dst.suffix == ".safetensors":
        from flaxres.weights import save_safetensors

        save_safetensors(model, dst, {"arch": args.arch})
    elif dst.suffix in (".pth", ".pt", ".th"):
        import torch

        torch.save(to_torch(model), dst)
    else:
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()
        ckptr.save(dst.absolute(), nnx.state(model))
        ckptr.wait_until_finished()
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
