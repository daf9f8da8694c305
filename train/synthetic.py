"""Tiny learnable CIFAR-shaped data in every on-disk format ``--data-dir`` reads, for tests and
smoke runs without the real data: ``python -m train.synthetic OUT_DIR``.

Class ``c`` is a noisy image tinted by a fixed per-class colour, so a small net learns it in a
few steps (a test can see accuracy rise) while augmentation still changes every batch.
"""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

from train.data import CIFAR10_CLASSES


def make_arrays(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_classes, 3))

    def split(n):
        y = np.arange(n, dtype=np.int32) % num_classes
        rng.shuffle(y)
        noise = rng.normal(0, 40, (n, 32, 32, 3))
        x = np.clip(colours[y][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return x, y

    return (*split(n_train), *split(n_test))


def _to_flat_chw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def write_cifar10_python(root: Path, arrays, tar: bool = False) -> Path:
    """The layout of cifar-10-python.tar.gz: ``cifar-10-batches-py/data_batch_{1..5}`` etc."""
    xtr, ytr, xte, yte = arrays
    def batch(name, x, y):  # every key of the real batches
        return {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": _to_flat_chw(x),
                b"filenames": [f"{i}.png".encode() for i in range(len(x))]}

    files = {"batches.meta": {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                              b"num_cases_per_batch": len(ytr) // 5, b"num_vis": 3072},
             "test_batch": batch("testing batch 1 of 1", xte, yte)}
    for i, (xs, ys) in enumerate(zip(np.array_split(xtr, 5), np.array_split(ytr, 5)), 1):
        files[f"data_batch_{i}"] = batch(f"training batch {i} of 5", xs, ys)
    return _write(root, "cifar-10-batches-py", {k: pickle.dumps(v) for k, v in files.items()}, tar)


def write_cifar100_python(root: Path, arrays, coarse: tuple[np.ndarray, np.ndarray],
                          tar: bool = False) -> Path:
    """The layout of cifar-100-python.tar.gz: ``cifar-100-python/{train,test,meta}``, each image
    with its fine label (the 100 classes) and its coarse one (the 20 superclasses)."""
    xtr, ytr, xte, yte = arrays
    files = {"meta": {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
                      b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}}
    for name, x, y, c in (("train", xtr, ytr, coarse[0]), ("test", xte, yte, coarse[1])):
        files[name] = {b"filenames": [f"{i}.png".encode() for i in range(len(x))],
                       b"batch_label": f"{name} batch".encode(), b"fine_labels": y.tolist(),
                       b"coarse_labels": c.tolist(), b"data": _to_flat_chw(x)}
    return _write(root, "cifar-100-python", {k: pickle.dumps(v) for k, v in files.items()}, tar)


def write_cifar100_binary(root: Path, arrays, coarse: tuple[np.ndarray, np.ndarray],
                          tar: bool = False) -> Path:
    """The layout of cifar-100-binary.tar.gz: ``cifar-100-binary/{train,test}.bin``, records of
    <coarse label byte><fine label byte><3072 pixel bytes>, and the two label-name files."""
    xtr, ytr, xte, yte = arrays

    def records(x, y, c):
        return np.concatenate([c.astype(np.uint8)[:, None], y.astype(np.uint8)[:, None],
                               _to_flat_chw(x)], 1).tobytes()

    files = {"train.bin": records(xtr, ytr, coarse[0]), "test.bin": records(xte, yte, coarse[1]),
             "fine_label_names.txt": "\n".join(f"fine{i:02d}" for i in range(100)).encode(),
             "coarse_label_names.txt": "\n".join(f"coarse{i:02d}" for i in range(20)).encode()}
    return _write(root, "cifar-100-binary", files, tar)


def write_cifar10_binary(root: Path, arrays, tar: bool = False) -> Path:
    """The layout of cifar-10-binary.tar.gz: ``cifar-10-batches-bin/data_batch_{1..5}.bin``."""
    xtr, ytr, xte, yte = arrays

    def records(x, y):
        return np.concatenate([y.astype(np.uint8)[:, None], _to_flat_chw(x)], 1).tobytes()

    files = {"batches.meta.txt": "\n".join(CIFAR10_CLASSES).encode() + b"\n",
             "test_batch.bin": records(xte, yte)}
    for i, (xs, ys) in enumerate(zip(np.array_split(xtr, 5), np.array_split(ytr, 5)), 1):
        files[f"data_batch_{i}.bin"] = records(xs, ys)
    return _write(root, "cifar-10-batches-bin", files, tar)


def write_image_folder(root: Path, arrays, tar: bool = False, ext: str = "png") -> Path:
    """``cifar10-images/{train,test}/<class>/NNNN.<ext>``, like ../shared/data's JPEG copy."""
    from PIL import Image

    xtr, ytr, xte, yte = arrays
    files = {}
    for split, xs, ys in (("train", xtr, ytr), ("test", xte, yte)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            buf = io.BytesIO()
            Image.fromarray(x).save(buf, format="PNG" if ext == "png" else "JPEG")
            files[f"{split}/{CIFAR10_CLASSES[y]}/{i:04d}.{ext}"] = buf.getvalue()
    return _write(root, "cifar10-images", files, tar)


def _write(root: Path, top: str, files: dict[str, bytes], tar: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if tar:
        path = root / f"{top}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
        return path
    for name, blob in files.items():
        (root / top / name).parent.mkdir(parents=True, exist_ok=True)
        (root / top / name).write_bytes(blob)
    return root / top


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "synthetic-cifar")
    print(write_cifar10_python(out, make_arrays(512, 256), tar=True))
