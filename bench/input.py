"""flaxres's training input pipeline against torchvision's ``DataLoader``: images per second
from the same JPEG files, with the same transforms and the same number of decode processes.

    python -m bench.input --data-dir DATA --image-size 224 --workers 8 --json input.json
    python -m bench.input --make-images /tmp/inet-synth --count 1000   # a synthetic folder

On a CPU host the ImageNet trainer (``train.imagenet``) can only step as fast as its workers
decode and crop JPEGs, so its input pipeline is worth as much as its train step: this says
whether Grain plus :mod:`train.transforms` (crop boxes drawn in Python) keeps up with the
``DataLoader`` recipe that torchvision's reference scripts use, on this machine.

The two sides, both yielding uint8 batches that are normalised later, on the device:

- flaxres: ``train.input.iterate(train_dataset(ImageFolder(DATA, "train"), ...), workers)``,
  exactly as ``train.imagenet`` reads: Grain's ``--workers`` processes (spawned) each decode
  whole batches on one thread; batches ``{"image": (B, S, S, 3), "label", "index"}``.
- torchvision: ``DataLoader(ImageFolder(DATA/train, transform=Compose([RandomResizedCrop(S,
  antialias=True), RandomHorizontalFlip(), PILToTensor()])), batch_size=B, num_workers=workers,
  drop_last=True)``, shuffled by ``shuffle=True``'s ``RandomSampler`` drawn over as many epochs
  as the run needs (a DataLoader restarts its workers at every epoch's end; ImageNet's epochs
  are long enough that this is rare there, and here it would time worker start-ups);
  ``--workers`` processes (forked); batches ``(B, 3, S, S)``.

``--workers 0`` decodes in this process for both (Grain in one prefetch thread). PyTorch's
intra-op threads are set to 1 here, as a DataLoader sets them in its workers, so that its
collation at ``--workers 0`` runs on one core as Grain's ``np.stack`` does.

Timing: each round starts each pipeline afresh, takes ``--warmup`` batches untimed (default:
one per worker and one more, so every worker's start-up and first decode are past) and times
the next ``--batches`` batches, from the arrival of the last warm-up batch to that of the last
timed one. The two alternate over ``--rounds`` (A B, then B A, ...) and each one's median round
is reported, with the ratio flaxres / torchvision (above 1: flaxres is faster). After the first
round the files come from the page cache: this times decoding and transforms, not the disk.

"Where the time goes" times each stage per image in this process on one thread, on
``--stage-images`` of the files: decode (read + PIL open and load; torchvision's loader also
converts to RGB, which flaxres does in its transform), the crop + resize + flip transform
(``--crops`` draws per image) and collation into a batch of ``--batch-size`` (Grain's
``np.stack`` per leaf; torch's ``default_collate``). Their sum gives one process's rate
without any pipeline around it.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bench.speed.timing import at_least_one
from train import input as pipeline
from train import transforms
from train.config import OneLineParser
from train.data import DataError

# torch and torchvision are imported where they are used: Grain's worker processes are spawned
# and import this module, and need neither.

SIDES = ("flaxres", "torchvision")


def non_negative(text: str) -> int:
    """argparse type for a count that may be zero (workers, warm-up batches)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return n


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int, amp: float, channels: int
            ) -> np.ndarray:
    """Gaussian noise of std ``amp`` on a grid of ``cell``-pixel cells, upsampled bicubically to
    (h, w, channels) float32 around 0."""
    grid = rng.normal(0, amp, (h // cell + 2, w // cell + 2, channels)) + 128
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    img = Image.fromarray(grid if channels == 3 else grid[..., 0])
    out = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32) - 128
    return out if channels == 3 else out[..., None]


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One synthetic photo-sized JPEG (quality 90): shorter side 300-500 px, aspect ratio
    log-uniform in 3/4..4/3, as ImageNet's are mostly; broad colour fields, a mid-scale
    texture, a fine luminance texture and per-pixel colour noise, so that it compresses about as
    badly as a photograph (files of about 50-150 KB, ImageNet's average being about 110 KB) and
    decodes at a photograph's cost."""
    short = int(rng.integers(300, 501))
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    pixels = (128 + _smooth(rng, h, w, max(h, w) // 4, 60, 3) + _smooth(rng, h, w, 16, 25, 3)
              + _smooth(rng, h, w, 3, 30, 1) + rng.normal(0, 14, (h, w, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(root: str | os.PathLike, count: int, classes: int = 10, seed: int = 0) -> dict:
    """Writes a synthetic, ImageNet-shaped JPEG folder: ``count`` images in
    ``root/train/c000/*.JPEG`` ... (``classes`` class folders, images dealt round-robin) and a
    tenth as many (at least one per class) in ``root/val/``. Not photographs: generated noise
    fields of photographs' sizes and compressed sizes (:func:`synthetic_jpeg`), for timing
    input pipelines where no ImageNet is at hand. Each image depends only on ``seed``, its split
    and its number, so a folder is the same on every machine. Returns the count and mean file
    size of each split."""
    root = Path(root)
    for split in ("train", "val"):
        if (root / split).exists():
            raise DataError(f"--make-images {root}: {split}/ exists already; give a new folder")
    summary = {}
    for s, (split, n) in enumerate((("train", count), ("val", max(classes, count // 10)))):
        sizes = []
        for i in range(n):
            cls = f"c{i % classes:03d}"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            blob = synthetic_jpeg(np.random.default_rng((seed, s, i)))
            (root / split / cls / f"{split}_{i:07d}.JPEG").write_bytes(blob)
            sizes.append(len(blob))
        summary[split] = {"images": n, "mean_kb": float(np.mean(sizes)) / 1e3}
    return summary


def _time_batches(it: Iterator, count: Callable[[object], int], warmup: int, batches: int
                  ) -> tuple[dict, object]:
    """Images per second over ``batches`` batches of ``it`` after ``warmup`` untimed ones, from
    the last warm-up batch's arrival to the last timed batch's; and the first batch."""
    t0 = time.perf_counter()
    first = next(it)
    for _ in range(warmup - 1):
        next(it)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += count(next(it))
    seconds = time.perf_counter() - start
    return {"img_s": images / seconds, "images": images, "seconds": seconds,
            "warmup_s": start - t0}, first


def flaxres_round(source: pipeline.ImageFolder, args: argparse.Namespace) -> dict:
    """One timed run of ``train.input``'s training pipeline."""
    ds = pipeline.train_dataset(source, size=args.image_size, global_batch=args.batch_size,
                                seed=0)
    it = pipeline.iterate(ds, args.workers)
    try:
        timed, first = _time_batches(it, lambda b: len(b["image"]), args.warmup, args.batches)
    finally:
        it.close()  # stops and joins Grain's worker processes before the other side runs
    images = first["image"]
    if images.dtype != np.uint8 or images.shape != (args.batch_size, args.image_size,
                                                    args.image_size, 3):
        raise AssertionError(f"flaxres batch {images.dtype} {images.shape}")
    return timed


def torchvision_dataset(train_dir: Path, size: int):
    import torchvision
    import torchvision.transforms as T

    tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                    T.PILToTensor()])
    return torchvision.datasets.ImageFolder(str(train_dir), transform=tf)


def torchvision_round(dataset, args: argparse.Namespace) -> dict:
    """One timed run of the ``DataLoader`` recipe."""
    import torch

    n = (args.warmup + args.batches) * args.batch_size  # every batch of the run, no epoch end
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    try:
        timed, (images, _) = _time_batches(it, lambda b: len(b[0]), args.warmup, args.batches)
    finally:
        if hasattr(it, "_shutdown_workers"):  # what the iterator's __del__ runs; done now
            it._shutdown_workers()
    if images.dtype != torch.uint8 or tuple(images.shape) != (
            args.batch_size, 3, args.image_size, args.image_size):
        raise AssertionError(f"torchvision batch {images.dtype} {tuple(images.shape)}")
    return timed


def _ms(f: Callable[[], object], reps: int = 1) -> tuple[float, object]:
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f()
    return (time.perf_counter() - t0) * 1e3 / reps, out


def _flaxres_decode(source: pipeline.ImageFolder, k: int) -> Image.Image:
    blob, name, _, _ = source[k]
    return pipeline.decode(blob, name)


def stage_times(source: pipeline.ImageFolder, tv_dataset, args: argparse.Namespace) -> dict:
    """Milliseconds per image of each stage, each side, in this process on one thread, on an
    evenly spaced sample of ``--stage-images`` files (the same files for both sides)."""
    import torch
    from torch.utils.data import default_collate

    n = min(args.stage_images, len(source))
    picks = np.linspace(0, len(source) - 1, n).round().astype(int)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ms = {side: {"decode": 0.0, "transform": 0.0, "collate": 0.0} for side in SIDES}
    fl_items, tv_items = [], []
    for k in (int(k) for k in picks):
        path, label = tv_dataset.samples[k]
        t, img = _ms(functools.partial(_flaxres_decode, source, k))
        ms["flaxres"]["decode"] += t
        t, tv_img = _ms(functools.partial(tv_dataset.loader, path))
        ms["torchvision"]["decode"] += t
        t, x = _ms(functools.partial(transforms.train_transform, img, args.image_size, rng),
                   args.crops)
        ms["flaxres"]["transform"] += t
        t, y = _ms(functools.partial(tv_dataset.transform, tv_img), args.crops)
        ms["torchvision"]["transform"] += t
        fl_items.append({"image": x, "label": np.int32(label), "index": np.int64(k)})
        tv_items.append((y, label))
    b = args.batch_size
    reps = max(3, 200 // b)
    fl_batch = [fl_items[i % n] for i in range(b)]
    tv_batch = [tv_items[i % n] for i in range(b)]
    ms["flaxres"]["collate"] = _ms(lambda: {key: np.stack([e[key] for e in fl_batch])
                                            for key in fl_batch[0]}, reps)[0] * n / b
    ms["torchvision"]["collate"] = _ms(lambda: default_collate(tv_batch), reps)[0] * n / b
    out = {}
    for side in SIDES:
        per = {f"{stage}_ms": t / n for stage, t in ms[side].items()}
        per["total_ms"] = sum(per.values())
        per["img_s_one_process"] = 1e3 / per["total_ms"]
        out[side] = per
    return out | {"images": n, "crops": args.crops}


def _check_data_dir(data_dir: str, size: int) -> tuple[pipeline.ImageFolder, object]:
    """Both sides' datasets of ``data_dir``'s train/ images; a folder they would not read alike
    is a :class:`DataError`."""
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"--data-dir {root}: no such directory")
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: not a directory (an image folder "
                        "DIR/train/<class>/<image>; torchvision's ImageFolder reads no .tar)")
    try:
        source = pipeline.ImageFolder(root, "train")
    except DataError as e:
        raise DataError(f"--data-dir {e}") from None
    try:
        tv = torchvision_dataset(root / "train", size)
    except FileNotFoundError as e:  # torchvision's own one-line complaints
        raise DataError(f"--data-dir {root}: {e}") from None
    if len(tv) != len(source) or tv.classes != list(source.classes):
        raise DataError(f"--data-dir {root}: torchvision's ImageFolder finds {len(tv)} images of "
                        f"{len(tv.classes)} classes under train/, train.input {len(source)} of "
                        f"{len(source.classes)}; the bench needs the same files on both sides")
    return source, tv


def run(args: argparse.Namespace) -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    source, tv = _check_data_dir(args.data_dir, args.image_size)
    if len(source) < args.batch_size:
        raise DataError(f"--data-dir {args.data_dir}: {len(source)} training images are fewer "
                        f"than one --batch-size {args.batch_size}")
    print(f"input pipelines: {len(source)} files in {Path(args.data_dir) / 'train'}, "
          f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers, "
          f"{args.rounds} rounds of {args.batches} batches after {args.warmup} warm-up",
          flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rounds = {side: [] for side in SIDES}
        runners = {"flaxres": lambda: flaxres_round(source, args),
                   "torchvision": lambda: torchvision_round(tv, args)}
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                rounds[side].append(runners[side]())
            print(f"  round {r + 1}: " + "   ".join(f"{s} {rounds[s][-1]['img_s']:.1f} img/s"
                                                     for s in SIDES), flush=True)
        stages = stage_times(source, tv, args) if args.stage_images else None
    finally:
        torch.set_num_threads(threads)
    batch = {"flaxres": f"uint8 {[args.batch_size, args.image_size, args.image_size, 3]}",
             "torchvision": f"uint8 {[args.batch_size, 3, args.image_size, args.image_size]}"}
    results: dict = {side: {"img_s": statistics.median(r["img_s"] for r in rounds[side]),
                            "batch": batch[side], "rounds": rounds[side]}
                     for side in SIDES}
    results["ratio"] = results["flaxres"]["img_s"] / results["torchvision"]["img_s"]
    results |= {"data_dir": str(args.data_dir), "files": len(source),
                "classes": len(source.classes), "image_size": args.image_size,
                "workers": args.workers, "batch_size": args.batch_size,
                "batches": args.batches, "warmup": args.warmup, "rounds": args.rounds,
                "torch_threads": 1, "stages": stages}
    from bench.speed.report import machine  # initialises JAX: after the last fork

    results["machine"] = machine() | {"loadavg_start": load}
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    return results


def report(results: dict) -> None:
    for side in SIDES:
        each = ", ".join(f"{r['img_s']:.1f}" for r in results[side]["rounds"])
        print(f"{side:<12} {results[side]['img_s']:8.1f} img/s  (median of {each})")
    print(f"ratio flaxres / torchvision: {results['ratio']:.2f}")
    st = results["stages"]
    if not st:
        return
    print(f"\nwhere the time goes, ms per image (this process, one thread, {st['images']} "
          f"files, {st['crops']} crops each):")
    print(f"  {'':<12}{'flaxres':>10}{'torchvision':>13}")
    for stage in ("decode", "transform", "collate", "total"):
        print(f"  {stage:<12}{st['flaxres'][stage + '_ms']:10.2f}"
              f"{st['torchvision'][stage + '_ms']:13.2f}")
    print(f"  {'= img/s':<12}{st['flaxres']['img_s_one_process']:10.0f}"
          f"{st['torchvision']['img_s_one_process']:13.0f}   (one process, no pipeline)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m bench.input", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="image folder DIR/train/<class>/<image> (a directory)")
    src.add_argument("--make-images", metavar="DIR",
                     help="write a synthetic ImageNet-sized JPEG folder here, then exit")
    p.add_argument("--count", type=at_least_one, default=1000,
                   help="--make-images: training images (default: 1000)")
    p.add_argument("--classes", type=at_least_one, default=10,
                   help="--make-images: class folders (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="--make-images: seed (default: 0)")
    p.add_argument("--image-size", type=at_least_one, default=224,
                   help="training crop in pixels (default: 224)")
    default_workers = min(8, os.cpu_count() or 1)  # train.imagenet's default
    p.add_argument("--workers", type=non_negative, default=default_workers,
                   help="decode processes of each side, 0: in this process "
                        f"(default: {default_workers}, as train.imagenet)")
    p.add_argument("--batch-size", type=at_least_one, default=256, help="(default: 256)")
    p.add_argument("--batches", type=at_least_one, default=20,
                   help="timed batches per round (default: 20)")
    p.add_argument("--warmup", type=at_least_one, default=None,
                   help="untimed batches first, the first one with the workers' start-up "
                        "(default: workers + 1)")
    p.add_argument("--rounds", type=at_least_one, default=3,
                   help="runs of each side, alternated; the median is reported (default: 3)")
    p.add_argument("--stage-images", type=non_negative, default=50,
                   help="files for the per-stage times, 0: none (default: 50)")
    p.add_argument("--crops", type=at_least_one, default=3,
                   help="transform draws per file for the per-stage times (default: 3)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.workers + 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        if args.make_images:
            summary = make_images(args.make_images, args.count, args.classes, args.seed)
            for split, s in summary.items():
                print(f"{args.make_images}/{split}: {s['images']} synthetic JPEGs, "
                      f"{s['mean_kb']:.0f} KB on average")
            return summary
        return run(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
