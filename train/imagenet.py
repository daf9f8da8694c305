"""``python -m train.imagenet``: ResNets on an image folder at any size (ImageNet-1k, or your own
``{train,val}/<class>/<image>``), with torchvision's ResNet-50 reference recipe by default
(SGD, momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, 90 epochs, lr /10 at 30 and 60),
through the loop that ``train.cifar`` uses (:func:`train.loop.fit`).

    python -m train.imagenet --arch resnet50 --data-dir /data/imagenet --workdir runs/r50
    python -m train.imagenet --workdir runs/r50 --resume      # after a kill, Ctrl-C or SIGTERM

Images are decoded and augmented (``RandomResizedCrop`` + flip; evaluation ``Resize`` +
``CenterCrop``) in ``--workers`` processes by Grain (:mod:`train.input`), each process of a
multi-host run reading its own shard; the batch at each step is a function of the seed and the
step alone, so a resumed run sees the batches that an uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxres.cpu.malloc import retain_freed_memory
from flaxres.registry import IMAGENET_MEAN, IMAGENET_STD
from train import cli, loop, steps
from train import input as pipeline
from train.config import Config, flag
from train.data import DataError


@dataclass
class ImageNetConfig(Config):
    """:class:`Config` with torchvision's ImageNet recipe as the defaults, and the input
    pipeline's settings."""

    arch: str = flag("resnet50", "architecture: any flaxres.list_models() name")
    data_dir: str | None = flag(None, "an image folder {train,val}/<class>/<image> (torchvision's "
                              "ImageFolder layout), or an uncompressed .tar of it; with --tfds, "
                              "the tfds data_dir")
    tfds: str | None = flag(None, "read this tfds prepared dataset (ArrayRecord files, e.g. "
                          "imagenet2012) from --data-dir instead of an image folder")
    train_split: str = flag("train", "the training split: a folder, or a tfds split")
    eval_split: str | None = flag(None, "the evaluation split (default: 'val' for a folder, "
                                "'validation' for tfds)")
    image_size: int = flag(224, "training crop and evaluation size in pixels (evaluation resizes "
                         "the shorter side to size / 0.875 first)")
    transforms: str = flag("imagenet", "'imagenet': torchvision's RandomResizedCrop + flip, and "
                         "resize + centre crop for evaluation; 'cifar': the CIFAR tutorials' "
                         "4-px padded random crop + flip, evaluating the images as they are",
                         choices=("imagenet", "cifar"))
    workers: int = flag(min(8, os.cpu_count() or 1), "processes that decode and augment images "
                      "(0: in the training process)")
    num_classes: int = flag(0, "classes of the head (default 0: the training folder's)")
    workdir: str = flag("runs/imagenet", "output folder: checkpoints/, metrics.jsonl, curves.png")
    epochs: int | None = flag(90, "epochs to train")
    batch_size: int = flag(256, "global batch size, split over all devices and processes")
    eval_batch_size: int = flag(256, "evaluation batch size")
    lr: float = flag(0.1, "base learning rate (torchvision's: 0.1 for a batch of 256)")
    schedule: str = flag("multistep", "lr schedule: 'multistep' = x --lr-gamma at --milestones "
                       "epochs; 'cosine' = per-iteration cosine decay to 0; 'paper' = /10 at 50%% "
                       "and 75%%", choices=("paper", "multistep", "cosine"))
    milestones: tuple[int, ...] | None = flag((30, 60), "multistep epoch milestones")
    warmup: str = flag("off", "warm up (--warmup-method) for the first --warmup-steps iterations",
                     choices=("auto", "on", "off"))
    mean: tuple[float, ...] = flag(IMAGENET_MEAN, "normalisation mean (RGB, 0..1 scale)")
    std: tuple[float, ...] = flag(IMAGENET_STD, "normalisation std (RGB, 0..1 scale)")


class StreamFeed:
    """Training batches from the input pipeline: batch ``s`` of the endless dataset is step
    ``s``'s, so the iterator's position is the step the checkpoint holds with the model and
    the optimizer, and a resumed run starts its iterator there. ``waited`` sums the seconds the
    loop spent waiting for a batch: the input stall."""

    def __init__(self, dataset, mesh, workers: int, steps_per_epoch: int):
        self.dataset, self.mesh, self.workers = dataset, mesh, workers
        self.steps_per_epoch = steps_per_epoch
        self._it, self._next = None, None
        self.waited = 0.0

    def batches(self, epoch: int, first: int, end: int):
        step = epoch * self.steps_per_epoch + first
        if self._next != step:  # a fresh run, a resume, or a restart at another step
            self._it = pipeline.global_batches(
                pipeline.iterate(self.dataset[step:], self.workers), self.mesh)
        for _ in range(first, end):
            t = time.perf_counter()
            batch = next(self._it)
            self.waited += time.perf_counter() - t
            yield batch
            step += 1
            self._next = step


class StreamEvalSet:
    """A split read by the input pipeline, each process its shard; every process runs the same
    number of batches, padded and masked, so the collectives match."""

    def __init__(self, source, cfg: ImageNetConfig, run: loop.Run):
        shard = pipeline.Shard.of_jax_process()
        self.local = max(1, run.eval_batch_size // shard.count)
        self.dataset = pipeline.eval_dataset(source, size=cfg.image_size,
                                             global_batch=self.local * shard.count, shard=shard,
                                             style=cfg.transforms)
        self.num_batches = math.ceil(math.ceil(len(source) / shard.count) / self.local)
        self.size, self.workers, self.mesh = cfg.image_size, cfg.workers, run.mesh
        self.step = steps.jit_eval_batch(run.mesh, run.eval_def, mean=run.mean, std=run.std)

    def sums(self, state: steps.TrainState, metrics: dict) -> dict:
        sharding = NamedSharding(self.mesh, P("data"))
        it = pipeline.iterate(self.dataset, self.workers)
        for _ in range(self.num_batches):
            b = next(it, None)
            n = 0 if b is None else len(b["label"])
            x = np.zeros((self.local, self.size, self.size, 3), np.uint8)
            y = np.zeros((self.local,), np.int32)
            if n:
                x[:n], y[:n] = b["image"], b["label"]
            valid = np.arange(self.local) < n
            x, y, valid = (jax.make_array_from_process_local_data(sharding, a)
                           for a in (x, y, valid))
            metrics = self.step(state, metrics, x, y, valid)
        return metrics


def prepare(cfg: ImageNetConfig) -> tuple[loop.Run, tuple[str, ...], int, int]:
    """The run ``cfg`` describes, fed by the input pipeline: ``(run, classes, training images,
    steps per epoch)``."""
    train_src, val_src = sources(cfg)
    cfg.num_classes = cfg.num_classes or len(train_src.classes)
    spe = len(train_src) // cfg.batch_size
    if spe == 0:
        raise DataError(f"{len(train_src)} training images are fewer than one batch of "
                        f"{cfg.batch_size}")
    run = loop.setup(cfg, None, spe)
    dataset = pipeline.train_dataset(train_src, size=cfg.image_size, global_batch=cfg.batch_size,
                                     seed=cfg.seed, shard=pipeline.Shard.of_jax_process(),
                                     style=cfg.transforms)
    run.feed = StreamFeed(dataset, run.mesh, cfg.workers, spe)
    run.eval_sets["test"] = StreamEvalSet(val_src, cfg, run)
    return run, train_src.classes, len(train_src), spe


def train(cfg: ImageNetConfig, on_step=None) -> dict:
    """Trains ``cfg`` on its images through :func:`train.loop.fit`."""
    run, classes, n_train, spe = prepare(cfg)
    return loop.fit(cfg, run, classes, n_train, spe, cfg.tfds or cfg.data_dir, on_step)


def sources(cfg: ImageNetConfig) -> tuple:
    """The training and evaluation sources ``cfg`` names: an image folder's splits, or a tfds
    dataset's."""
    if cfg.tfds:
        split = cfg.eval_split or "validation"
        train_src, val_src = (pipeline.TfdsSource(cfg.tfds, s, cfg.data_dir)
                              for s in (cfg.train_split, split))
    else:
        if not cfg.data_dir:
            raise DataError("--data-dir: give the image folder (or .tar) to train on")
        split = cfg.eval_split or "val"
        train_src, val_src = (pipeline.ImageFolder(cfg.data_dir, s)
                              for s in (cfg.train_split, split))
    if val_src.classes != train_src.classes:
        raise DataError(f"{cfg.tfds or cfg.data_dir}: the splits {cfg.train_split} and {split} "
                        "hold different classes")
    return train_src, val_src


def parse_args(argv: list[str] | None = None) -> ImageNetConfig:
    return cli.parse_config(argv, prog="python -m train.imagenet", description=__doc__,
                            config=ImageNetConfig)


def main(argv: list[str] | None = None) -> None:
    retain_freed_memory()
    cfg = parse_args(argv)
    cli.launch(cfg, lambda: train(cfg))


if __name__ == "__main__":
    main()
