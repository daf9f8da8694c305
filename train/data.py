"""CIFAR loading (tfds, official archives, image folders), a uint8 array cache, and the on-device
augmentation of He et al. (4-px zero pad, random 32x32 crop, horizontal flip).

Every source is decoded once into uint8 NHWC arrays and cached outside the repository, so later
runs start in a second and need neither PIL decoding nor tensorflow-datasets.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import socket
import tarfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np

from flaxres.weights import cache_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
HOW_TO_GET = (
    "Get CIFAR with one of: (a) internet access and tensorflow-datasets (the default, no "
    "--data-dir); (b) the official archive from https://www.cs.toronto.edu/~kriz/cifar.html "
    "(cifar-10-python.tar.gz or the binary version), passed as --data-dir; (c) an image folder "
    "<dir>/{train,test}/<class>/*.png|jpg or its .tar.gz, e.g. --data-dir "
    "../shared/data/cifar10-jpeg.tar.gz.")
# Where tensorflow-datasets downloads CIFAR from: its GCS mirror, then the original site.
TFDS_HOSTS = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))
# What a damaged archive or file raises while being read (gzip/bz2/xz/tar/OS errors).
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)


class DataError(RuntimeError):
    """The data source is missing or unreadable; the message says how to get the data."""


@dataclass
class Arrays:
    """A dataset as host arrays: images uint8 (N, 32, 32, 3) RGB, labels int32 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


# ----------------------------------------------------------------------------- sources


class _Source:
    """Uniform read access to a directory or a tar archive: relative names and bytes.
    A context manager: the archive stays open while the readers pick their files."""

    def __init__(self, path: Path):
        self.path = path
        self._tar = None
        if not path.is_file():
            self.names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
            return
        try:
            self._tar = tarfile.open(path)  # noqa: SIM115
            # Listing reads the whole archive, so a truncated download fails here, named.
            self._members = {m.name.lstrip("./"): m for m in self._tar.getmembers() if m.isfile()}
        except _READ_ERRORS as e:
            if self._tar is not None:
                self._tar.close()
            raise DataError(f"{path} is not a readable tar archive, or is truncated or corrupt "
                            f"({type(e).__name__}: {e}); download it again. " + HOW_TO_GET) from e
        self.names = sorted(self._members)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self._tar is not None:
            self._tar.close()

    def read(self, name: str) -> bytes:
        try:
            if self._tar is not None:
                return self._tar.extractfile(self._members[name]).read()
            return (self.path / name).read_bytes()
        except _READ_ERRORS as e:
            raise DataError(f"{self.where(name)}: cannot be read ({type(e).__name__}: {e})") from e

    def where(self, name: str) -> str:
        """A file's name for messages: inside an archive, ``archive.tar.gz:member``."""
        return f"{self.path}:{name}" if self._tar is not None else str(self.path / name)

    def find(self, basename: str) -> str | None:
        hits = [n for n in self.names if n.rsplit("/", 1)[-1] == basename]
        return hits[0] if hits else None


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _read_pickles(src: _Source, dataset: str) -> Arrays | None:
    if dataset == "cifar10":
        train_names = [src.find(f"data_batch_{i}") for i in range(1, 6)]
        test_name, meta_name, key, names_key = (src.find("test_batch"), src.find("batches.meta"),
                                                b"labels", b"label_names")
    else:
        train_names = [src.find("train")]
        test_name, meta_name, key, names_key = (src.find("test"), src.find("meta"),
                                                b"fine_labels", b"fine_label_names")
    if None in train_names or test_name is None:
        return None

    def load(name):
        try:
            d = pickle.loads(src.read(name), encoding="bytes")
            return _chw_to_hwc(np.asarray(d[b"data"], np.uint8)), np.asarray(d[key], np.int32)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{src.where(name)}: not a CIFAR python batch ({type(e).__name__}: "
                            f"{e})") from e

    tr = [load(n) for n in train_names]
    te_x, te_y = load(test_name)
    classes = CIFAR10_CLASSES if dataset == "cifar10" else ()
    if meta_name is not None:
        meta = pickle.loads(src.read(meta_name), encoding="bytes")
        classes = tuple(c.decode() for c in meta[names_key])
    return Arrays(np.concatenate([x for x, _ in tr]), np.concatenate([y for _, y in tr]),
                  te_x, te_y, classes)


def _read_binary(src: _Source, dataset: str) -> Arrays | None:
    if dataset == "cifar10":
        train_names = [src.find(f"data_batch_{i}.bin") for i in range(1, 6)]
        test_name, meta_name, label_bytes = src.find("test_batch.bin"), src.find(
            "batches.meta.txt"), 1
    else:
        train_names = [src.find("train.bin")]
        test_name, meta_name, label_bytes = src.find("test.bin"), src.find(
            "fine_label_names.txt"), 2
    if None in train_names or test_name is None:
        return None

    def load(name):
        blob = src.read(name)
        if len(blob) % (label_bytes + 3072):
            raise DataError(f"{src.where(name)}: {len(blob)} bytes is not a whole number of "
                            f"{label_bytes + 3072}-byte CIFAR records (truncated?)")
        rec = np.frombuffer(blob, np.uint8).reshape(-1, label_bytes + 3072)
        # CIFAR-100 records are <coarse label><fine label><pixels>; we train on fine labels.
        return _chw_to_hwc(rec[:, label_bytes:]), rec[:, label_bytes - 1].astype(np.int32)

    tr = [load(n) for n in train_names]
    te_x, te_y = load(test_name)
    classes = CIFAR10_CLASSES if dataset == "cifar10" else ()
    if meta_name is not None:
        classes = tuple(s for s in src.read(meta_name).decode().split() if s)
    return Arrays(np.concatenate([x for x, _ in tr]), np.concatenate([y for _, y in tr]),
                  te_x, te_y, classes)


def decode_image(data: bytes | str | Path, name: str | None = None) -> np.ndarray:
    """An image file as uint8 (32, 32, 3) RGB; other sizes are resized (bilinear) to 32x32.

    An unreadable image raises :class:`DataError` naming ``name`` (default: the path), since
    PIL's own message names only an anonymous buffer.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB")
    except UnidentifiedImageError as e:
        raise DataError(f"{name or data}: not an image file PIL can read") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name or data}: corrupt or truncated image ({e})") from e
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def load_images(paths: Sequence[str | Path]) -> np.ndarray:
    """``--predict``'s image files as uint8 (N, 32, 32, 3), each checked before any is
    used: a missing or unreadable file raises :class:`DataError` naming it."""
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"--predict {p}: no such image file")
    return np.stack([decode_image(Path(p), f"--predict {p}") for p in paths])


def _read_image_folder(src: _Source) -> Arrays | None:
    """``<root>/{train,test}/<class>/<image>``; classes sorted by name (torchvision's ImageFolder
    order, which is also CIFAR-10's label order)."""
    splits: dict[str, dict[str, list[str]]] = {}
    for n in src.names:
        parts = n.split("/")
        if len(parts) >= 3 and parts[-1].lower().endswith(IMAGE_EXTS) and parts[-3] in (
                "train", "test"):
            splits.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(n)
    if set(splits) != {"train", "test"}:
        return None
    classes = tuple(sorted(splits["train"]))
    if sorted(splits["test"]) != list(classes):
        raise DataError(f"{src.path}: train and test hold different classes: "
                        f"{classes} vs {tuple(sorted(splits['test']))}")

    def load(split):
        files = [(f, c) for c, cls in enumerate(classes) for f in sorted(splits[split][cls])]
        # A corrupt image stops the run, naming the file (nothing is cached): skipping it would
        # silently train on a different dataset.
        images = np.stack([decode_image(src.read(f), src.where(f)) for f, _ in files])
        return images, np.array([c for _, c in files], np.int32)

    return Arrays(*load("train"), *load("test"), classes)


def _reachable(hosts: Sequence[tuple[str, int]], timeout: float) -> bool:
    """Whether any ``(host, port)`` accepts a TCP connection within ``timeout`` seconds.

    Each probe runs in a daemon thread that is abandoned at the deadline, because name
    resolution has no timeout of its own.
    """
    ok = threading.Event()

    def probe(address: tuple[str, int]) -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in hosts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not ok.is_set() and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        ok.wait(0.02)
    return ok.is_set()


def _is_prepared(builder) -> bool:
    """``builder.is_prepared()`` without its absl warning about the (expected) missing folder,
    which would be a second line before our one-line error."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return builder.is_prepared()
    finally:
        absl.setLevel(level)


def _read_tfds(dataset: str, data_dir: str | None, *,
               hosts: Sequence[tuple[str, int]] = TFDS_HOSTS, timeout: float = 3.0) -> Arrays:
    """tensorflow-datasets through its TensorFlow-free path (array_record data sources).

    Before a download, a quick probe of ``hosts``: offline, tfds itself would retry for minutes.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"no --data-dir given and tensorflow-datasets is not installed ({e}). "
                        + HOW_TO_GET) from e
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
        if not _is_prepared(builder) and not _reachable(hosts, timeout):
            raise DataError(
                f"tensorflow-datasets has no prepared {dataset} in {builder.data_dir} and cannot "
                f"download it: none of {', '.join(h for h, _ in hosts)} answered within "
                f"{timeout:g} s (offline?). " + HOW_TO_GET)
        builder.download_and_prepare()
        src = builder.as_data_source()
        out = {}
        for split in ("train", "test"):
            ds = src[split]
            items = [ds[i] for i in range(len(ds))]
            out[split] = (np.stack([np.asarray(x["image"], np.uint8) for x in items]),
                          np.array([x["label"] for x in items], np.int32))
        classes = tuple(builder.info.features["label"].names)
    except DataError:
        raise
    except Exception as e:  # tfds raises many kinds (network, missing TF, format)
        raise DataError(f"tensorflow-datasets could not provide {dataset!r} ({type(e).__name__}: "
                        f"{e}). " + HOW_TO_GET) from e
    return Arrays(*out["train"], *out["test"], classes)


def _read_path(path: Path, dataset: str) -> Arrays:
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist. " + HOW_TO_GET)
    if path.is_dir() and any(path.glob(f"{dataset}/*/dataset_info.json")):
        return _read_tfds(dataset, str(path))
    with _Source(path) as src:
        arrays = (_read_pickles(src, dataset) or _read_binary(src, dataset)
                  or _read_image_folder(src))
    if arrays is None:
        raise DataError(f"{path} holds no {dataset} data in a known layout (CIFAR python or "
                        "binary batches, {train,test}/<class>/<images>, or a tfds data_dir). "
                        + HOW_TO_GET)
    return arrays


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return cache_root()


def _cache_file(cache_dir: Path, dataset: str, path: Path | None) -> Path:
    if path is None:
        tag = "tfds-default"
    else:
        st = path.stat()
        tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(f"{dataset}|{tag}".encode()).hexdigest()[:16]
    return cache_dir / f"{dataset}-{digest}.npz"


def load_arrays(dataset: str = "cifar10", data_dir: str | None = None,
                cache_dir: str | None = None) -> Arrays:
    """Decodes ``data_dir`` (or tfds) once and caches the uint8 arrays as ``.npz``.

    The cache key is the source's path, size and mtime, so a changed source is decoded again.
    """
    path = None if data_dir is None else Path(data_dir).expanduser()
    cache = _cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), dataset,
                        path if path is not None and path.exists() else None)
    if cache.exists() and path is not None:
        with np.load(cache) as z:
            return Arrays(z["train_images"], z["train_labels"], z["test_images"],
                          z["test_labels"], tuple(str(c) for c in z["classes"]))
    arrays = _read_tfds(dataset, None) if path is None else _read_path(path, dataset)
    _check(arrays, dataset)
    if path is not None:  # tfds keeps its own prepared copy
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, classes=np.array(arrays.classes), train_images=arrays.train_images,
                 train_labels=arrays.train_labels, test_images=arrays.test_images,
                 test_labels=arrays.test_labels)
        os.replace(tmp, cache)  # atomic: a concurrent or killed run never sees half a file
    return arrays


def _check(a: Arrays, dataset: str) -> None:
    n = 100 if dataset == "cifar100" else 10
    for x, y in ((a.train_images, a.train_labels), (a.test_images, a.test_labels)):
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
            raise DataError(f"decoded images have shape {x.shape} {x.dtype}, labels {y.shape}; "
                            "expected uint8 (N, 32, 32, 3)")
        if len(y) and (y.min() < 0 or y.max() >= n):
            raise DataError(f"labels span {y.min()}..{y.max()}, outside {dataset}'s 0..{n - 1}: "
                            "is --dataset right?")


def split_validation(images: np.ndarray, labels: np.ndarray, val_size: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The paper's 45k/5k: a seeded random ``val_size`` images leave the training set.

    Returns ``(train_images, train_labels, val_images, val_labels)``.
    """
    if not 0 < val_size < len(labels):
        raise ValueError(f"--val-split {val_size} must be between 1 and {len(labels) - 1}")
    perm = np.random.default_rng(seed).permutation(len(labels))
    tr, va = np.sort(perm[:-val_size]), np.sort(perm[-val_size:])
    return images[tr], labels[tr], images[va], labels[va]


# ----------------------------------------------------------------------------- on device


def augment(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Zero-pad by ``pad`` pixels, crop a random 32x32 window, flip half the images left-right.

    Works on uint8 before normalisation, so the padding is black pixels, exactly as
    torchvision's ``RandomCrop(32, padding=4)`` on PIL images in the reference CIFAR scripts.
    Pure and jittable: one key decides the whole batch, independent of how it is sharded.
    """
    n, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(img, off, f):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
        return jnp.where(f, out[:, ::-1], out)

    return jax.vmap(crop)(padded, offsets, flip)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 -> fp32 (x / 255 - mean) / std, as ``ToTensor`` + ``Normalize``; the model casts
    to its compute dtype."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def epoch_permutation(seed_key: jax.Array, epoch: int, n: int) -> jax.Array:
    """The data order of one epoch, a function of (seed, epoch) only, so a resumed run sees the
    same batches as an uninterrupted one."""
    return jax.random.permutation(jax.random.fold_in(seed_key, epoch), n)
