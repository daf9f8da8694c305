"""``--eval-only`` and ``--predict``: a saved checkpoint evaluated on the test set, or
classifying image files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import flaxres
from flaxres import checkpoint, weights
from train import data, parallel
from train.config import Config
from train.loop import Run, evaluate, make_eval_set, setup, zero_metrics


def restore(cfg: Config) -> tuple[Config, Run, dict]:
    """The run saved at ``--checkpoint``: its config (``--data-dir``/``--cache-dir`` may be
    overridden), a :class:`Run` holding its state, and its metadata. ``--checkpoint`` may also
    name weights alone (a shipped set's name, a weights file or URL), evaluated as ``--arch``
    (or the set's architecture) with the flags' recipe."""
    if not Path(cfg.checkpoint).expanduser().is_dir():
        return _restore_weights(cfg)
    directory, step = checkpoint.resolve(cfg.checkpoint)
    meta = checkpoint.restore_meta(directory, step)
    saved = type(cfg).from_dict(meta["config"])
    saved.init_from = None  # the checkpoint has the weights
    saved.data_dir = cfg.data_dir or saved.data_dir
    saved.cache_dir = cfg.cache_dir or saved.cache_dir
    run = setup(saved, None)
    template = {"state": run.state, "metrics": zero_metrics(run)}
    run.state = checkpoint.restore_state(directory, step, template)["state"]
    if parallel.is_main_process():
        print(f"loaded {saved.arch} from {directory / str(step)} (epoch {meta['epoch']})")
    return saved, run, meta


def _restore_weights(cfg: Config) -> tuple[Config, Run, dict]:
    """A :class:`Run` for weights without a training state; a shipped set brings its own
    architecture and normalisation."""
    saved = dataclasses.replace(cfg, init_from=cfg.checkpoint)
    if cfg.checkpoint in flaxres.list_pretrained():
        entry = flaxres.pretrained_cfg(cfg.checkpoint)
        saved = dataclasses.replace(saved, arch=entry.arch, mean=entry.mean, std=entry.std)
    elif not (Path(cfg.checkpoint).expanduser().exists() or weights.is_url(cfg.checkpoint)):
        raise checkpoint.CheckpointError(
            f"--checkpoint {cfg.checkpoint}: no such file or directory, and no shipped weights "
            f"of that name (flaxres.list_pretrained(): {', '.join(flaxres.list_pretrained())})")
    run = setup(saved, None)
    classes = (data.CIFAR10_CLASSES if saved.dataset == "cifar10"
               else tuple(map(str, range(saved.num_classes))))
    if parallel.is_main_process():
        print(f"loaded {saved.arch} from {cfg.checkpoint}")
    return saved, run, {"classes": classes}


def evaluate_checkpoint(cfg: Config) -> dict[str, float]:
    """Test loss and accuracy of ``--checkpoint``."""
    saved, run, _ = restore(cfg)
    arrays = data.load_arrays(saved.dataset, saved.data_dir, saved.cache_dir)
    run.eval_sets["test"] = make_eval_set(run, arrays.test_images, arrays.test_labels)
    res = evaluate(run, "test")
    if parallel.is_main_process():
        print(f"test loss {res['test_loss']:.4f} acc {res['test_acc']:.2%} "
              f"({len(arrays.test_labels)} images)")
    return res


def predict(cfg: Config) -> list[list[tuple[str, float]]]:
    """Top-k classes with probabilities for each image (resized to 32x32 if needed)."""
    images = data.load_images(cfg.predict)  # before the checkpoint: a bad file fails at once
    _, run, meta = restore(cfg)
    probs = np.asarray(run.predict(run.state, parallel.replicate(images, run.mesh)))
    classes = meta["classes"]
    out = []
    for path, pr in zip(cfg.predict, probs):
        top = np.argsort(-pr)[: cfg.top_k]
        out.append([(classes[c], float(pr[c])) for c in top])
        if parallel.is_main_process():
            print(path)
            for rank, (name, prob) in enumerate(out[-1], 1):
                print(f"  {rank}. {name:<14} {prob:7.2%}")
    return out
