"""The streaming input pipeline for images of any size: a random-access source (an image folder in
torchvision's ``ImageFolder`` layout, as a directory or an uncompressed ``.tar``, or a tfds
prepared dataset in ArrayRecord files), decoded and
transformed as torchvision's ImageNet recipe (:mod:`train.transforms`) by Grain, in worker
processes. Each JAX process reads only its own shard, and its local batches become global
``jax.Array``s. Grain's iterators are deterministic, and their state is a small dict that a
checkpoint can hold, so a resumed run sees the batches that an uninterrupted run would have.

One epoch is ``steps_per_epoch * global_batch`` images of a fresh shuffle (the remainder is
dropped, as ``DataLoader(drop_last=True)`` does); process ``p`` of ``P`` reads rows ``p * L`` to
``p * L + L - 1`` of each global batch (``L = global_batch / P``), so across processes every
image of the epoch is read exactly once, and the global batch, its augmentation included, is the
one a single process would make, row for row.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grain.python as grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, UnidentifiedImageError

from train import transforms
from train.data import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class ImageFolder:
    """``<root>/<split>/<class>/<image>`` (or a ``.tar`` holding that tree) as a Grain
    random-access source of ``(encoded image, label, index)``; classes sorted by name and
    images by path, as torchvision's ``ImageFolder`` orders them. A ``.tar`` is read by offset,
    each worker process opening its own handle."""

    def __init__(self, root: str | os.PathLike, split: str):
        self.root, self.split = Path(root), split
        if self.root.is_file():
            if not tarfile.is_tarfile(self.root) or self.root.suffix != ".tar":
                raise DataError(f"{self.root}: an image folder's archive must be an uncompressed "
                                ".tar (its members are read by offset)")
            with tarfile.open(self.root) as tf:
                found = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
            entries = [(name.split("/"), (off, size)) for name, off, size in found]
        elif (self.root / split).is_dir():
            entries = [(str(p.relative_to(self.root)).split(os.sep), p)
                       for p in (self.root / split).rglob("*") if p.is_file()]
        else:
            raise DataError(f"{self.root}: no {split}/ folder (expected <root>/{split}/<class>/"
                            "<image>, or a .tar of that tree)")
        images = sorted((parts[-2], "/".join(parts), where) for parts, where in entries
                        if len(parts) >= 3 and parts[-3] == split
                        and parts[-1].lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise DataError(f"{self.root}: no images under {split}/<class>/")
        self.classes = tuple(sorted({c for c, _, _ in images}))
        index = {c: i for i, c in enumerate(self.classes)}
        self._samples = [(name, where, index[c]) for c, name, where in images]
        self._file = None

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> tuple[bytes, str, int, int]:
        name, where, label = self._samples[i]
        if isinstance(where, Path):
            return where.read_bytes(), name, label, i
        if self._file is None:
            self._file = open(self.root, "rb")  # noqa: SIM115 - one handle per process, kept
        self._file.seek(where[0])
        return self._file.read(where[1]), name, label, i

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # worker processes open their own handle


class TfdsSource:
    """A split of a tfds prepared dataset in ArrayRecord files (e.g. ``imagenet2012`` built from
    its manual download) as the same random-access source as :class:`ImageFolder`: the encoded
    image, a name for messages, the label and the index. Images stay encoded, so they are decoded
    by the same code as an image folder's."""

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import file_adapters

        where = f"--tfds {name} in --data-dir {data_dir or tfds.core.constants.DATA_DIR}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except (tfds.core.DatasetNotFoundError, AssertionError) as e:
            raise DataError(f"{where}: {str(e).splitlines()[0]}") from None
        if not builder.is_prepared():
            raise DataError(f"{where}: not prepared (no {builder.data_dir}); build it first with "
                            f"tfds build {name} --data_dir DIR --file_format array_record")
        if builder.info.file_format not in file_adapters.FileFormat.with_random_access():
            raise DataError(f"{where}: stored as {builder.info.file_format.value}, which has no "
                            "random access; rebuild it with --file_format array_record")
        if split not in builder.info.splits:
            raise DataError(f"{where}: no split {split!r} (it has "
                            f"{', '.join(builder.info.splits)})")
        self.image_key, self.label_key = builder.info.supervised_keys or ("image", "label")
        self.classes = tuple(builder.info.features[self.label_key].names)
        self.name = f"{name}/{split}"
        self._source = builder.as_data_source(
            split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[bytes, str, int, int]:
        record = self._source[i]
        return record[self.image_key], f"{self.name}[{i}]", int(record[self.label_key]), i


def decode(blob: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e


@dataclasses.dataclass(frozen=True)
class _Train(grain.RandomMapTransform):
    size: int
    style: str = "imagenet"

    def random_map(self, element, rng: np.random.Generator) -> dict:
        blob, name, label, index = element
        image = _named(transforms.TRAIN[self.style], name, decode(blob, name), self.size, rng)
        return {"image": image, "label": np.int32(label), "index": np.int64(index)}


@dataclasses.dataclass(frozen=True)
class _Eval(grain.MapTransform):
    size: int
    style: str = "imagenet"

    def map(self, element) -> dict:
        blob, name, label, index = element
        image = _named(transforms.EVAL[self.style], name, decode(blob, name), self.size)
        return {"image": image, "label": np.int32(label), "index": np.int64(index)}


def _named(transform, name: str, *args) -> np.ndarray:
    try:
        return transform(*args)
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which part of the global batch this process reads."""

    index: int = 0
    count: int = 1

    @classmethod
    def of_jax_process(cls) -> Shard:
        return cls(jax.process_index(), jax.process_count())


def train_dataset(source, *, size: int, global_batch: int, seed: int, epochs: int | None = None,
                  shard: Shard = Shard(), style: str = "imagenet") -> grain.MapDataset:
    """Batches of ``{"image": uint8 (b, size, size, 3), "label", "index"}``, ``b`` =
    ``global_batch / shard.count``, over ``epochs`` fresh shuffles (``None``: endless), through
    the ``style`` transforms (:data:`train.transforms.TRAIN`)."""
    if global_batch % shard.count:
        raise ValueError(f"--batch-size {global_batch} must be divisible by the "
                         f"{shard.count} processes")
    steps = len(source) // global_batch
    if steps == 0:
        raise DataError(f"{len(source)} training images are fewer than one batch of "
                        f"{global_batch}")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)[: steps * global_batch]
    # Augmented by the image's position in the run, whichever process reads it.
    ds = ds.repeat(epochs).random_map(_Train(size, style), seed=seed)
    return _ProcessRows(ds, global_batch, shard).batch(global_batch // shard.count,
                                                       drop_remainder=True)


class _ProcessRows(grain.MapDataset):
    """This process's rows of each global batch of ``parent``'s elements: ``L`` consecutive ones
    from row ``shard.index * L``, ``L = global_batch / shard.count``."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch: int, shard: Shard):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // shard.count
        self._first = shard.index * self._local
        self._length = len(parent) // global_batch * self._local

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._global + self._first + row]


def eval_dataset(source, *, size: int, global_batch: int, shard: Shard = Shard(),
                 style: str = "imagenet") -> grain.MapDataset:
    """Every image once, in order, in batches of ``global_batch / shard.count`` per process;
    the last batch may be short, and the loop masks its padding."""
    ds = grain.MapDataset.source(source)[shard.index::shard.count]
    return ds.map(_Eval(size, style)).batch(global_batch // shard.count)


def iterate(ds: grain.MapDataset, workers: int, prefetch: int = 2) -> grain.DatasetIterator:
    """An iterator whose decoding runs in ``workers`` processes (0: in this one), each making
    whole batches on one thread and keeping ``prefetch`` of them ready, as a ``DataLoader`` worker
    does with its ``prefetch_factor`` (Grain's read threads would multiply with the processes
    and oversubscribe the cores; with one batch in hand a worker idles while its turn waits on a
    slower one); its ``get_state()`` / ``set_state()`` are what a checkpoint keeps."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags: their defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    return iter(it_ds)


def global_batches(it: Iterator[dict], mesh: Mesh, prefetch: int = 2
                   ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Each process's local batch as the global ``(images, labels)`` arrays, sharded on the
    mesh's 'data' axis; ``prefetch`` batches ahead are already on their way to the devices while
    the step before them runs (flax's ``prefetch_to_device``, for sharded arrays)."""
    sharding = NamedSharding(mesh, P("data"))
    ahead: collections.deque = collections.deque()
    for batch in it:
        ahead.append((jax.make_array_from_process_local_data(sharding, batch["image"]),
                      jax.make_array_from_process_local_data(sharding, batch["label"])))
        if len(ahead) > prefetch:
            yield ahead.popleft()
    yield from ahead
