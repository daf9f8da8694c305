"""Pretrained weights from wherever people keep them, for ``create_model(name, pretrained=...)``.

A source is a shipped weight set's name (:func:`flaxres.list_pretrained`, checked against its
sha256), a local PyTorch file (``.pth``/``.pt``/``.th``, any layout
:func:`flaxres.convert.detect_layout` knows), a ``.safetensors`` file, an Orbax directory (a
``train.cifar`` workdir or its ``checkpoints/{best,last}``, or ``python -m flaxres.convert``
output), or an ``https://`` / ``http://`` / ``file://`` URL of a file, downloaded once into a cache.
Files are recognised by their content, not their suffix (:func:`flaxres.convert.load_state_dict`),
so a URL without one works too. Every failure is one :class:`flaxres.convert.WeightsError` naming
the source, and a failed download leaves nothing in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import tempfile
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx, traverse_util

from flaxres import checkpoint, convert
from flaxres.convert import WeightsError
from flaxres.pretrained import list_pretrained, pretrained_cfg

log = logging.getLogger("flaxres")

URL_SCHEMES = ("https://", "http://", "file://")
_CHUNK = 1 << 20


def cache_root() -> Path:
    """``$FLAXRES_CACHE``, default ``~/.cache/flaxres``: downloaded weights, and the trainer's
    decoded datasets and compiled programs."""
    return Path(os.environ.get("FLAXRES_CACHE", Path.home() / ".cache" / "flaxres"))


def default_cache_dir() -> Path:
    """Where downloaded weights are kept: ``weights/`` under :func:`cache_root`."""
    return cache_root() / "weights"


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.lower().startswith(URL_SCHEMES)


def fetch(url: str, cache_dir: str | os.PathLike | None = None, sha256: str | None = None,
          progress: bool | None = None) -> Path:
    """The cached copy of ``url``, downloaded on first use with a progress bar (``progress=None``:
    only on a terminal). The file is written under a temporary name and renamed once complete and
    (with ``sha256``) verified, so an interrupted or failed download never looks cached."""
    name = Path(urllib.parse.urlparse(url).path).name or "weights"
    folder = Path(cache_dir or default_cache_dir()).expanduser() / hashlib.sha256(
        url.encode()).hexdigest()[:16]  # one folder per URL: equal file names never collide
    target = folder / name
    if target.exists():
        if sha256:
            _check_sha256(target, sha256, f"cached {target}")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(total, f"downloading {name}", progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise WeightsError(f"download incomplete: {f.tell()} of {total} bytes")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise WeightsError(f"sha256 mismatch: expected {sha256.lower()}, downloaded "
                               f"{digest.hexdigest()}")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) if not isinstance(e, urllib.error.HTTPError) else None
        raise WeightsError(f"download failed: {reason or e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def _progress_bar(total: int | None, desc: str, progress: bool | None):
    """tqdm's bar where tqdm is installed (the trainer's extra), else a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if progress is None else not progress, leave=False)


def save_safetensors(model: nnx.Module, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """The model's weights and BatchNorm statistics as a ``.safetensors`` file under PyTorch's
    names and layouts (``torch_model.load_state_dict(safetensors.torch.load_file(path))`` loads
    it too), with ``metadata`` in its header. Written under a temporary name and renamed, so a
    failed write leaves nothing."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        save_file(convert.state_dict_arrays(model), tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_sha256(path: Path, sha256: str, what: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256.lower():
        raise WeightsError(f"sha256 mismatch: {what} has {digest.hexdigest()}, expected "
                           f"{sha256.lower()}")


def orbax_state_dir(path: Path) -> tuple[Path, dict]:
    """The Orbax state folder in ``path`` and its train.cifar metadata (``{}`` when none).

    ``path`` may be a train.cifar workdir, its ``checkpoints/`` folder, ``checkpoints/best`` or
    ``/last`` (the newest step), one step folder, or a plain ``StandardCheckpointer`` directory.
    """
    if found := checkpoint.find_step(path):
        path = found[0] / str(found[1])
    if (path / "state").is_dir():  # a training step folder: {state, meta}
        meta_file = path / "meta" / "metadata"
        try:
            meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"unreadable train.cifar metadata {meta_file}: {e}") from e
        return path / "state", meta
    if (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists():
        return path, {}
    raise WeightsError("no Orbax checkpoint in this directory (expected a train.cifar workdir, "
                       "checkpoints/best|last, a step folder or a flaxres.convert output)")


def read_orbax(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """``({dotted nnx path: array}, train.cifar metadata)``: parameters and BatchNorm statistics."""
    import orbax.checkpoint as ocp

    state_dir, meta = orbax_state_dir(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        saved = ckptr.metadata(state_dir.absolute())
        # Onto one local device, whatever mesh saved it (a GPU run read on a laptop).
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              getattr(saved, "item_metadata", saved))
        tree = ckptr.restore(state_dir.absolute(), target)
    except Exception as e:  # orbax/tensorstore raise many kinds for damaged folders
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"unreadable Orbax checkpoint {state_dir}: {first}") from e
    flat = {}
    for part in checkpoint.model_trees(tree):
        for keys, leaf in traverse_util.flatten_dict(part).items():
            keys = keys[:-1] if keys[-1] == "value" else keys  # nnx.Variable's saved field
            flat[".".join(map(str, keys))] = np.asarray(leaf)
    return flat, meta


def _build(build: Callable[[int], nnx.Module], file_classes: int,
           num_classes: int | None) -> nnx.Module:
    """The model to load into: abstract (no initialisation work, every array comes from the
    file) unless a fresh head of another size needs its initial weights."""
    if num_classes is None or num_classes == file_classes:
        return nnx.eval_shape(lambda: build(file_classes))
    return build(num_classes)


def load_pretrained(build: Callable[[int], nnx.Module], source: str | os.PathLike, *,
                    num_classes: int | None = None, arch: str | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    sha256: str | None = None) -> nnx.Module:
    """``build(classes)`` loaded from ``source``: with the file's classes by default; with
    another ``num_classes`` the head is left fresh (fine-tuning) and a warning says so."""
    shown = str(source)
    try:
        if isinstance(source, str) and source in list_pretrained():
            entry = pretrained_cfg(source)
            if arch and entry.arch != arch:
                raise WeightsError(f"these weights are a {entry.arch}'s, not a {arch}'s")
            source, sha256 = entry.file, entry.sha256
        path = fetch(source, cache_dir, sha256) if is_url(source) else Path(source).expanduser()
        if not path.exists():
            raise WeightsError("no such file or directory")
        if path.is_dir():
            flat, meta = read_orbax(path)
            saved_arch = meta.get("config", {}).get("arch")
            if arch and saved_arch and saved_arch != arch:
                raise WeightsError(f"this checkpoint holds a {saved_arch}, not a {arch}")
            if "fc.kernel" not in flat:
                raise WeightsError("no classifier head (fc.kernel) in the Orbax checkpoint")
            file_classes = int(flat["fc.kernel"].shape[-1])
            model = _build(build, file_classes, num_classes)
            sd, layout, file_names = convert.from_nnx_arrays(model, flat), "orbax", None
        else:
            if sha256 and not is_url(source):
                _check_sha256(path, sha256, str(path))
            sd, layout, file_names = convert.torch_weights(path)
            file_classes = convert.head_classes(sd)
            model = _build(build, file_classes, num_classes)
        fresh = num_classes is not None and num_classes != file_classes
        model = convert.load_named(model, sd, layout=layout, file_names=file_names,
                                   fresh_head=fresh, arch=arch)
    except WeightsError as e:
        raise type(e)(f"{shown}: {e}") from e
    if fresh:
        log.warning("%s: the file's head has %d classes; %s has a fresh %d-class head "
                    "(only the backbone is loaded)", shown, file_classes, arch or "the model",
                    num_classes)
    return model

