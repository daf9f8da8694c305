"""The tutorials' studies as one command: degradation (plain vs residual, He et al. 2016 Fig. 6)
and gradient flow, with and without BatchNorm.

    python -m train.degradation --quick --workdir runs/degradation --data-dir DATA

trains every net of the comparison set on the same data order and seeds with the trainer's own
pieces (``train.data``, ``train.steps.train_step``, ``train.optim``) and writes into
``--workdir``: ``summary.json`` (every number), ``report.md`` (each claim: held or not, with
numbers) and the plots. The measurements come from ``train_step(probe=True)``, i.e. from the
gradients the optimizer is given, not from a second model evaluation. ``--quick`` (a subset, few
epochs, shallower nets) is sized for a 2-core CPU; the default is the paper's setting, for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxres
from flaxres.cpu.malloc import retain_freed_memory
from train import data, optim, probe, steps, study_report
from train.config import CIFAR_MEAN, CIFAR_STD


@dataclass(frozen=True)
class Net:
    """One net of the comparison set and how it is trained."""

    label: str
    depth: int  # 6n + 2 weight layers
    residual: bool
    norm: bool
    widths: tuple[int, int, int] = (16, 32, 64)
    epochs: int = 164
    lr: float = 0.1
    weight_decay: float = 1e-4
    step_decay: bool = True  # lr / 10 at 50% and 75% of training (the paper's 32k/48k of 64k)
    # "kaiming": flaxres' (He et al.'s) init; "torch_default": nn.Conv2d's own default, which the
    # tutorials' hand-written no-BN nets get, and under which a deep plain net cannot start.
    init: str = "kaiming"

    def build(self, seed: int) -> flaxres.ResNet:
        n = flaxres.registry.cifar_blocks_per_stage(self.depth)
        model = flaxres.ResNet(flaxres.BasicBlock, (n, n, n), self.widths, stem="cifar",
                               stem_width=self.widths[0],
                               shortcut="A" if self.residual else None, norm=self.norm,
                               rngs=nnx.Rngs(seed))
        if self.init == "torch_default":
            torch_default_conv_init(model, seed)
        elif self.init != "kaiming":
            raise ValueError(f"unknown init {self.init!r}: 'kaiming' or 'torch_default'")
        return model


def torch_default_conv_init(model: nnx.Module, seed: int) -> None:
    """Redraws every conv kernel as ``nn.Conv2d.reset_parameters`` does:
    ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance
    1/(3 fan_in), a sixth of what keeps a ReLU net's signal. (Biases and ``fc`` already follow
    PyTorch's defaults in flaxres.)"""
    key = jax.random.PRNGKey(seed)
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    for i, conv in enumerate(convs):
        shape = conv.kernel.shape
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # HWIO: fan_in = kh * kw * cin
        conv.kernel[...] = jax.random.uniform(jax.random.fold_in(key, i), shape,
                                              conv.kernel.dtype, -bound, bound)


@dataclass(frozen=True)
class Study:
    """The comparison set and the data it sees; roles name the nets each claim compares."""

    nets: tuple[Net, ...]
    roles: dict  # role -> label: bn_plain_shallow/deep, bn_res_shallow/deep, nobn_plain/res, baseline
    train_subset: int | None = None  # first N of a fixed random order; None = all
    test_subset: int | None = None
    batch_size: int = 128
    augment: bool = True
    probe_steps: tuple[int, ...] = (0, 100)  # plus the last step of each net
    seed: int = 0


def _nobn(label: str, depth: int, residual: bool, epochs: int, init: str = "torch_default",
          lr: float = 0.05) -> Net:
    # The tutorials' setting: no BatchNorm, no weight decay, a constant learning rate and
    # PyTorch's default conv init.
    return Net(label, depth, residual, norm=False, epochs=epochs, lr=lr, weight_decay=0.0,
               step_decay=False, init=init)


_ROLES = ("bn_plain_shallow", "bn_plain_deep", "bn_res_shallow", "bn_res_deep", "nobn_plain",
          "nobn_res", "baseline")


def _study(shallow: int, deep: int, nobn_depth: int, epochs: int, nobn_epochs: int,
           **kw) -> Study:
    nets = (Net(f"plain{shallow}", shallow, False, True, epochs=epochs),
            Net(f"plain{deep}", deep, False, True, epochs=epochs),
            Net(f"resnet{shallow}", shallow, True, True, epochs=epochs),
            Net(f"resnet{deep}", deep, True, True, epochs=epochs),
            _nobn(f"plain{nobn_depth}-noBN", nobn_depth, False, nobn_epochs),
            _nobn(f"resnet{nobn_depth}-noBN", nobn_depth, True, nobn_epochs),
            # A shallow plain net in the same no-BN setting, with He et al.'s init.
            _nobn("plain8-noBN-he", 8, False, nobn_epochs, init="kaiming"))
    return Study(nets=nets, roles=dict(zip(_ROLES, (n.label for n in nets))), **kw)


# The paper's 64k iterations of batch 128 on 50k images (~164 epochs); a GPU run.
FULL = _study(20, 56, 56, epochs=164, nobn_epochs=20, probe_steps=(0, 100, 1000))
# Sized for a 2-core CPU: 2048 images, 5 epochs, depths 8/20 for 20/56.
QUICK = _study(8, 20, 20, epochs=5, nobn_epochs=5, train_subset=2048, test_subset=1000,
               probe_steps=(0, 20))


def take_subset(images: np.ndarray, labels: np.ndarray, n: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random ``n`` images (sources may be sorted by class); the same for every seed."""
    if n is None or n >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:n])
    return images[keep], labels[keep]


class _Eval:
    """Eval-mode logits of the test set, padded to whole batches (the padding is dropped)."""

    def __init__(self, images: np.ndarray, batch: int, rep):
        self.n, self.batch = len(images), batch
        total = math.ceil(self.n / batch) * batch
        padded = np.zeros((total, *images.shape[1:]), np.uint8)
        padded[: self.n] = images
        self.x = jax.device_put(padded, rep)

    def logits(self, fn, state: steps.TrainState) -> np.ndarray:
        out = [fn(state, self.x[i: i + self.batch]) for i in range(0, len(self.x), self.batch)]
        return np.asarray(jnp.concatenate(out))[: self.n]


def train_net(net: Net, study: Study, arrays: data.Arrays, log=print) -> dict:
    """Trains ``net`` with ``train_step(probe=True)``; returns its history, probes and stats."""
    mesh = steps.make_mesh()
    rep = steps.replicated(mesh)
    n_train = len(arrays.train_labels)
    spe = n_train // study.batch_size
    total = net.epochs * spe
    lr = (optim.multistep_schedule(net.lr, (total // 2, total * 3 // 4)) if net.step_decay
          else net.lr)
    tx = optim.sgd(lr, momentum=0.9, weight_decay=net.weight_decay)
    train_def, eval_def, state = steps.init_state(net.build(study.seed), tx, study.seed)
    state = jax.device_put(state, rep)
    step_fn = steps.jit_train_step(mesh, train_def, tx, batch_size=study.batch_size,
                                   mean=CIFAR_MEAN, std=CIFAR_STD, augment=study.augment,
                                   probe=True)
    logits_fn = jax.jit(functools.partial(steps.predict_logits, eval_def, mean=CIFAR_MEAN,
                                          std=CIFAR_STD))
    test = _Eval(arrays.test_images, 500, rep)
    labels = arrays.test_labels
    nc = int(max(labels.max(), arrays.train_labels.max())) + 1
    train_x = jax.device_put(arrays.train_images, rep)
    train_y = jax.device_put(arrays.train_labels, rep)
    # The trainer's data order: a function of (seed, epoch) only, hence the same for every net.
    order_key = jax.random.fold_in(jax.random.PRNGKey(study.seed), 2)

    init_logits = test.logits(logits_fn, state)
    start = probe.logit_stats(init_logits, labels, nc)
    history, probes, diverged = [], {}, None
    probe_at = {s for s in study.probe_steps if s < total} | {total - 1}
    t0 = time.perf_counter()
    step = 0
    for epoch in range(net.epochs):
        metrics = jax.device_put(steps.zero_metrics(), rep)
        perm = data.epoch_permutation(order_key, epoch, n_train)
        for i in range(spe):
            state, metrics, measured = step_fn(state, metrics, perm, train_x, train_y,
                                               jnp.int32(i))
            if step in probe_at:
                m = jax.device_get(measured)
                names, norms = probe.ordered_grad_norms(m["grad_norm"])
                probes[str(step)] = {"grad_norm": norms, "layers": names,
                                     "act_std": [float(a) for a in m["act_std"]],
                                     "logit_spread": float(m["logit_std"])}
            step += 1
        m = jax.device_get(metrics)
        h = {"epoch": epoch + 1, "step": step,
             "train_loss": float(m["loss_sum"] / m["count"]),
             "train_error": float(1 - m["correct"] / m["count"])}
        if m["nonfinite"]:
            diverged = f"loss became NaN/inf in epoch {epoch + 1}"
            history.append(h)
            log(f"  {net.label}: {diverged}; stopped")
            break
        ts = probe.logit_stats(test.logits(logits_fn, state), labels, nc)
        h.update(test_loss=ts["loss"], test_error=ts["error"])
        history.append(h)
        log(f"  {net.label} epoch {epoch + 1}/{net.epochs}: train loss {h['train_loss']:.4f} "
            f"err {h['train_error']:.2%} | test loss {h['test_loss']:.4f} "
            f"err {h['test_error']:.2%} ({time.perf_counter() - t0:.0f} s)")
    end_logits = test.logits(logits_fn, state)
    end = probe.logit_stats(end_logits, labels, nc)
    return {"net": dataclasses.asdict(net), "steps": step, "steps_per_epoch": spe,
            "diverged": diverged, "history": history, "probes": probes, "start": start,
            "end": end, "logit_change": probe.logit_change(init_logits, end_logits),
            "seconds": time.perf_counter() - t0}


def run(study: Study, arrays: data.Arrays, workdir: Path, title: str, log=print) -> dict:
    """Trains the whole comparison set and writes ``summary.json``, ``report.md`` and plots."""
    tr_x, tr_y = take_subset(arrays.train_images, arrays.train_labels, study.train_subset)
    te_x, te_y = take_subset(arrays.test_images, arrays.test_labels, study.test_subset)
    if len(tr_y) < study.batch_size:
        raise ValueError(f"{len(tr_y)} training images are fewer than one batch of "
                         f"{study.batch_size}")
    arrays = data.Arrays(tr_x, tr_y, te_x, te_y, arrays.classes)
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"{title}: {len(tr_y)} train / {len(te_y)} test images, "
        f"{len(study.nets)} nets on {jax.devices()[0].platform}")
    t0 = time.perf_counter()
    results = {}
    for net in study.nets:
        log(f"{net.label}: depth {net.depth}, {'residual' if net.residual else 'plain'}, "
            f"{'BN' if net.norm else 'no BN'}, widths {net.widths}, {net.epochs} epochs, "
            f"lr {net.lr}, wd {net.weight_decay}")
        results[net.label] = train_net(net, study, arrays, log)
    summary = {"title": title, "study": dataclasses.asdict(study), "classes": list(arrays.classes),
               "n_train": len(tr_y), "n_test": len(te_y), "platform": jax.devices()[0].platform,
               "seconds": time.perf_counter() - t0, "nets": results}
    summary["claims"] = study_report.claims(summary)
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, workdir / "summary.json")
    study_report.write(summary, workdir)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.degradation", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: 2048 train / 1000 test images, 5 epochs, depths 8 and "
                        "20 instead of 20 and 56 (default: the paper's setting, for a GPU)")
    p.add_argument("--workdir", required=True, help="output folder: summary.json, report.md, "
                                                    "*.png")
    p.add_argument("--data-dir", help="CIFAR-10 source, as train.cifar's --data-dir (image "
                                      "folder or its .tar.gz, official archive, tfds data_dir)")
    p.add_argument("--cache-dir", help="decoded-array cache, as train.cifar's --cache-dir")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, augmentation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    retain_freed_memory()  # before XLA's threads start, as in train.cifar
    args = parse_args(argv)
    # Reruns skip XLA compiles (seconds each on a small CPU); JAX_COMPILATION_CACHE_DIR wins.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(data.default_cache_dir() / "jax"))
    workdir = Path(args.workdir)
    study = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    try:
        if workdir.exists() and not workdir.is_dir():
            raise ValueError(f"--workdir {workdir} is a file, not a folder")
        arrays = data.load_arrays("cifar10", args.data_dir, args.cache_dir)
        run(study, arrays, workdir, "quick" if args.quick else "full")
    except (data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"done: {workdir / 'report.md'}")


if __name__ == "__main__":
    main()
