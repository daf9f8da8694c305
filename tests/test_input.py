"""The streaming input pipeline on a small generated JPEG folder of varied sizes: the image-folder
source (directory or .tar) and the same images as a tfds ArrayRecord dataset, per-process shards
that cover each epoch exactly once, fresh shuffles per epoch, determinism across worker
processes, and an iterator state that resumes exactly."""

import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import input as pipeline
from train.data import DataError

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 7  # 21 training images: batches of 4 leave a remainder to drop


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(PER_CLASS):
                w, h = rng.integers(40, 120, 2)
                pixels = np.clip(rng.normal(80 * c, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.JPEG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    with tarfile.open(root.with_suffix(".tar"), "w") as tf:
        tf.add(root, arcname="imagenet")
    return root


def test_a_folder_and_its_tar_are_the_same_source(folder):
    a = pipeline.ImageFolder(folder, "train")
    b = pipeline.ImageFolder(folder.with_suffix(".tar"), "train")
    assert a.classes == b.classes == CLASSES and len(a) == len(b) == 3 * PER_CLASS
    for i in (0, 8, 20):
        assert a[i][0] == b[i][0] and a[i][2:] == b[i][2:] == (i // PER_CLASS, i)


def _epoch_indices(ds, steps: int) -> np.ndarray:
    return np.concatenate([ds[i]["index"] for i in range(steps)])


def test_processes_share_each_epoch_once_and_epochs_reshuffle(folder):
    src = pipeline.ImageFolder(folder, "train")
    steps = len(src) // 4  # 5 steps of 4: one image dropped per epoch
    shards = [pipeline.train_dataset(src, size=32, global_batch=4, seed=3, epochs=2,
                                     shard=pipeline.Shard(p, 2)) for p in range(2)]
    assert [len(s) for s in shards] == [2 * steps] * 2
    batch = shards[0][0]
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
    epochs = []
    for e in range(2):
        seen = np.concatenate([shards[p][e * steps + i]["index"] for i in range(steps)
                               for p in range(2)])
        assert len(seen) == len(set(seen)) == steps * 4  # each image at most once, none repeated
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh shuffle each epoch
    labels = np.concatenate([shards[0][i]["label"] for i in range(steps)])
    idx = _epoch_indices(shards[0], steps)
    np.testing.assert_array_equal(labels, idx // PER_CLASS)
    # The processes' rows, stacked, are one process's batch, crops and flips included.
    one = pipeline.train_dataset(src, size=32, global_batch=4, seed=3, epochs=2)
    for i in (0, steps + 1):
        for key in ("image", "index"):
            np.testing.assert_array_equal(
                np.concatenate([shards[p][i][key] for p in range(2)]), one[i][key])


def test_the_iterator_resumes_exactly_and_workers_change_nothing(folder):
    src = pipeline.ImageFolder(folder, "train")
    ds = pipeline.train_dataset(src, size=24, global_batch=4, seed=0)
    it = pipeline.iterate(ds, workers=0)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = pipeline.iterate(ds, workers=0)
    again.set_state(state)
    for w, g in zip(want, (next(again) for _ in range(4))):
        np.testing.assert_array_equal(w["image"], g["image"])
        np.testing.assert_array_equal(w["index"], g["index"])
    parallel = pipeline.iterate(ds, workers=2)
    serial = pipeline.iterate(ds, workers=0)
    for _ in range(3):
        p, s = next(parallel), next(serial)
        np.testing.assert_array_equal(p["image"], s["image"])


def test_evaluation_reads_every_image_once_in_order(folder):
    src = pipeline.ImageFolder(folder, "val")
    parts = [pipeline.eval_dataset(src, size=32, global_batch=8, shard=pipeline.Shard(p, 2))
             for p in range(2)]
    seen = np.concatenate([b["index"] for ds in parts for b in (ds[i] for i in range(len(ds)))])
    assert sorted(seen.tolist()) == list(range(len(src)))


def test_bad_sources_are_one_clear_error(folder, tmp_path):
    with pytest.raises(DataError, match="no test/ folder"):
        pipeline.ImageFolder(folder, "test")
    gz = tmp_path / "imgs.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(folder / "val", arcname="val")
    with pytest.raises(DataError, match="must be an uncompressed .tar"):
        pipeline.ImageFolder(gz, "val")
    with pytest.raises(DataError, match="broken.JPEG: not a readable image"):
        pipeline.decode(b"garbage", "broken.JPEG")


class TinyFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The ``folder`` fixture's images as a tfds dataset (splits train and validation), written
    in ArrayRecord files as ``tfds build --file_format array_record`` writes them."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, root: Path, **kw):
        self.root = root
        super().__init__(**kw)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                     features=tfds.features.FeaturesDict({
                                         "image": tfds.features.Image(encoding_format="jpeg"),
                                         "label": tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"),
                "validation": self._generate_examples("val")}

    def _generate_examples(self, split: str):
        src = pipeline.ImageFolder(self.root, split)
        for i in range(len(src)):
            blob, _, label, _ = src[i]
            yield i, {"image": blob, "label": label}


@pytest.fixture(scope="module")
def tfds_dir(folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    TinyFolder(folder, data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_a_tfds_dataset_is_the_same_source_as_its_folder(folder, tfds_dir):
    for split, tfds_split in (("train", "train"), ("val", "validation")):
        a = pipeline.ImageFolder(folder, split)
        b = pipeline.TfdsSource("tiny_folder", tfds_split, tfds_dir)
        assert a.classes == b.classes == CLASSES and len(a) == len(b)
        # tfds stores the records in an order of its own: the same (image, label) pairs
        assert sorted((a[i][0], a[i][2]) for i in range(len(a))) == sorted(
            (b[i][0], b[i][2]) for i in range(len(b)))
    ds = pipeline.train_dataset(b, size=16, global_batch=4, seed=0)
    batch = next(pipeline.iterate(ds, workers=1))  # the source travels to a worker process
    assert batch["image"].shape == (4, 16, 16, 3)


def test_bad_tfds_sources_are_one_clear_error(tfds_dir, tmp_path):
    with pytest.raises(DataError, match=r"--tfds no_such_set in --data-dir .*: Dataset "
                                        r"no_such_set not found\.$"):
        pipeline.TfdsSource("no_such_set", "train", tmp_path)
    with pytest.raises(DataError, match="no split 'test' \\(it has train, validation\\)"):
        pipeline.TfdsSource("tiny_folder", "test", tfds_dir)
    with pytest.raises(DataError, match="imagenet2012 in --data-dir .*: not prepared"):
        pipeline.TfdsSource("imagenet2012", "train", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing created on the way
