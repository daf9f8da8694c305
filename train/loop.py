"""The training loop of ``python -m train.cifar`` as small functions: build the model, load the
data, set up a :class:`Run` on the mesh, resume, train epoch by epoch, evaluate, checkpoint.

Data parallel over every device of every process (``jax.jit`` on a 1-D mesh, batch sharded on
'data', parameters replicated; see :mod:`train.parallel`), so BatchNorm sees the global batch
exactly as one PyTorch process would, and N processes compute what one process over the same
devices computes.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import flaxres
from flaxres import checkpoint
from flaxres.cpu import onednn
from train import data, finetune, host, parallel, steps
from train.config import Config
from train.report import Report

# Fields a resumed run must share with its checkpoint (others, e.g. --epochs, may change).
RESUME_FIXED = ("arch", "dataset", "batch_size", "seed", "subset", "val_split", "precision",
                "augment", "mean", "std", "freeze_backbone", "dropout", "ema_decay")


class Diverged(RuntimeError):
    """The training loss became NaN or inf."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived; raised at the next step boundary, where the state is whole."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_at_step_boundary() -> Iterator[dict[str, int | None]]:
    """The first Ctrl-C or SIGTERM only records itself (a KeyboardInterrupt inside a jitted call
    could lose the donated state); the loop checks after each step, saves and stops. Cluster
    schedulers send SIGTERM before they preempt a job. A second Ctrl-C aborts at once."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signum"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- building blocks


def build_model(cfg: Config) -> flaxres.ResNet:
    """``create_model`` for registered names; any other ``resnetN`` through
    ``flaxres.cifar_resnet`` and ``wrnD_K`` through ``flaxres.registry.wide_resnet_cifar``
    (e.g. resnet8 or wrn10_1, handy for quick experiments), whose errors name the valid
    depths."""
    dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    cpu_ops = flaxres.CpuOps(conv=onednn.resolve_conv(cfg.cpu_conv))
    m = re.fullmatch(r"resnet(\d+)", cfg.arch)
    extra = {"dropout": cfg.dropout} if cfg.dropout else {}
    common = {"num_classes": cfg.num_classes, "dtype": dtype, "cpu_ops": cpu_ops,
              "rngs": nnx.Rngs(cfg.seed), **extra}
    if cfg.arch not in flaxres.list_models() and m:
        return flaxres.cifar_resnet(int(m.group(1)), **common)
    if cfg.arch not in flaxres.list_models() and (w := re.fullmatch(r"wrn(\d+)_(\d+)", cfg.arch)):
        return flaxres.registry.wide_resnet_cifar(int(w[1]), int(w[2]), **common)
    try:
        return flaxres.create_model(cfg.arch, num_classes=cfg.num_classes, seed=cfg.seed,
                                    dtype=dtype, cpu_ops=cpu_ops, **extra)
    except ValueError as e:
        if extra and "dropout" in str(e):
            raise ValueError(f"--dropout {cfg.dropout}: {cfg.arch} has no dropout (only the "
                             "pre-activation nets do: preact_*, wrn*)") from None
        raise


def load_data(cfg: Config) -> tuple[data.Arrays, np.ndarray | None, np.ndarray | None]:
    """The arrays ``cfg`` trains on: ``--subset`` applied, ``--val-split`` held out (val x, y)."""
    arrays = data.load_arrays(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    if cfg.subset:
        # A fixed random subset (the same for every --seed): sources may be sorted by class.
        keep = np.sort(np.random.default_rng(0).permutation(len(arrays.train_labels))[: cfg.subset])
        arrays.train_images = arrays.train_images[keep]
        arrays.train_labels = arrays.train_labels[keep]
    val_x = val_y = None
    if cfg.val_split:
        arrays.train_images, arrays.train_labels, val_x, val_y = data.split_validation(
            arrays.train_images, arrays.train_labels, cfg.val_split, cfg.seed)
    return arrays, val_x, val_y


class EvalSet(NamedTuple):
    """A split on device, padded to whole eval batches, and the jitted step that masks the pad."""

    images: jax.Array
    labels: jax.Array
    num_batches: int
    step: Callable

    def sums(self, state: steps.TrainState, metrics: dict[str, jax.Array]) -> dict:
        for i in range(self.num_batches):
            metrics = self.step(state, metrics, self.images, self.labels, jnp.int32(i))
        return metrics


class DeviceFeed:
    """Training batches from a dataset on the device: each epoch's order is drawn there from
    the seed and the epoch alone, so the step the checkpoint holds says where a resumed run
    goes on."""

    def __init__(self, run: Run):
        self.run = run

    def batches(self, epoch: int, first: int, end: int) -> Iterator[tuple]:
        """``run.train_step``'s arguments after the state and metrics, for steps first..end-1."""
        perm = self.run.permute(epoch)
        for i in range(first, end):
            yield perm, self.run.train_x, self.run.train_y, jnp.int32(i)


@dataclass
class Run:
    """The built pieces of a run: mesh, jitted steps, device data, schedule, current state."""

    mesh: Mesh
    replicated: jax.sharding.NamedSharding
    schedule: optax.Schedule
    state: steps.TrainState
    eval_def: nnx.GraphDef
    eval_batch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_step: Callable
    predict: Callable
    train_x: jax.Array | None = None
    train_y: jax.Array | None = None
    permute: Callable[[int], jax.Array] | None = None  # epoch -> that epoch's data order
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)  # or any object with .sums
    feed: Any = None  # where training batches come from: a DeviceFeed, or a streaming one


def setup(cfg: Config, arrays: data.Arrays | None, steps_per_epoch: int = 1,
          model: nnx.Module | None = None) -> Run:
    """Model, optimizer and jitted steps on the mesh; ``arrays``' training set goes on device.
    (``steps_per_epoch`` only shapes the lr schedule, irrelevant for inference.) ``model``
    replaces the one ``cfg`` describes (parity/test_training_path.py: PyTorch's weights in
    float64)."""
    mesh = steps.make_mesh()
    ndev = mesh.devices.size
    if cfg.batch_size % ndev:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {ndev} devices")
    tx = cfg.optimizer(steps_per_epoch)
    tx = finetune.head_only(tx) if cfg.freeze_backbone else tx
    model = finetune.initial_model(cfg, build_model) if model is None else model
    train_def, eval_def, state = steps.init_state(model, tx, cfg.seed, ema=bool(cfg.ema_decay))
    static = {"mean": cfg.mean, "std": cfg.std}
    objective = {"label_smoothing": cfg.label_smoothing,
                 "ema": steps.Ema(cfg.ema_decay, cfg.ema_steps, steps_per_epoch,
                                  cfg.warmup_length(steps_per_epoch))
                 if cfg.ema_decay else None}
    run = Run(mesh=mesh, replicated=steps.replicated(mesh),
              schedule=cfg.lr_schedule(steps_per_epoch),
              state=parallel.replicate(state, mesh), eval_def=eval_def,
              eval_batch_size=max(ndev, cfg.eval_batch_size // ndev * ndev), **static,
              # A dataset on the device is gathered (and augmented) there; without one the
              # batches come from a streaming input pipeline, augmented on the host.
              train_step=steps.jit_train_step(mesh, train_def, tx, batch_size=cfg.batch_size,
                                              augment=cfg.augment, **static, **objective)
              if arrays is not None else
              steps.jit_batch_step(mesh, train_def, tx, batch_size=cfg.batch_size, **static,
                                   **objective),
              predict=jax.jit(lambda s, x: steps.predict_probs(eval_def, s, x, **static)))
    if arrays is not None:
        run.train_x, run.train_y = parallel.replicate(
            (arrays.train_images, arrays.train_labels), mesh)
        order_key = parallel.replicate(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2), mesh)
        permute = jax.jit(data.epoch_permutation, static_argnums=(1, 2),
                          out_shardings=run.replicated)
        run.permute = lambda epoch: permute(order_key, epoch, len(arrays.train_labels))
        run.feed = DeviceFeed(run)
    return run


def make_eval_set(run: Run, images: np.ndarray, labels: np.ndarray) -> EvalSet:
    """``images``/``labels`` on device, padded to whole batches of ``run.eval_batch_size``."""
    n, bs = len(labels), run.eval_batch_size
    total = math.ceil(n / bs) * bs
    x = np.zeros((total, *images.shape[1:]), np.uint8)
    y = np.zeros((total,), np.int32)
    x[:n], y[:n] = images, labels
    step = steps.jit_eval_step(run.mesh, run.eval_def, batch_size=bs, num_valid=n,
                               mean=run.mean, std=run.std)
    x, y = parallel.replicate((x, y), run.mesh)
    return EvalSet(x, y, total // bs, step)


def zero_metrics(run: Run) -> dict[str, jax.Array]:
    return parallel.replicate(steps.zero_metrics(), run.mesh)


def evaluate(run: Run, name: str) -> dict[str, float]:
    """Loss and accuracy on eval set ``name``, and of the EMA weights (``ema_<name>_*``) if the
    run keeps them: each device evaluates its shard of every batch; the sums are reduced over all
    devices of all processes."""
    weights = {name: run.state}
    if run.state.ema is not None:
        weights[f"ema_{name}"] = run.state.replace(**run.state.ema)
    out = {}
    for label, state in weights.items():
        m = jax.device_get(run.eval_sets[name].sums(state, zero_metrics(run)))
        out.update({f"{label}_loss": float(m["loss_sum"] / m["count"]),
                    f"{label}_acc": float(m["correct"] / m["count"])})
    return out


# ----------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """What a checkpoint carries besides the state: epoch history, best accuracy, the partial
    epoch's metric sums (so a run resumed mid-epoch logs identical epoch metrics) and the
    machines it trained on (:mod:`train.host`; one more each time it resumes elsewhere)."""

    metrics: dict[str, jax.Array]
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    machines: list[dict] = field(default_factory=list)

    def note_machine(self) -> None:
        here = host.host()
        if not self.machines or not host.same_machine(self.machines[-1], here):
            self.machines.append(here)


class Checkpoints:
    """``<workdir>/checkpoints/{last,best}``: what to save with each state, and resuming."""

    def __init__(self, cfg: Config, classes: tuple[str, ...], steps_per_epoch: int):
        self.cfg = cfg
        self.dir = Path(cfg.workdir) / checkpoint.CHECKPOINTS
        self.classes = classes
        self.steps_per_epoch = steps_per_epoch
        self.writer = checkpoint.Writer()

    def save(self, which: str, run: Run, progress: Progress, epoch: int) -> None:
        """Starts writing ``which`` in the background (:class:`flaxres.checkpoint.Writer`)."""
        meta = {"epoch": epoch, "config": self.cfg.to_dict(), "history": progress.history,
                "best": progress.best, "classes": list(self.classes),
                "steps_per_epoch": self.steps_per_epoch, "machines": progress.machines}
        self.writer.save(self.dir / which, int(run.state.step),
                         {"state": run.state, "metrics": progress.metrics}, meta)

    def start(self, run: Run, report: Report) -> Progress:
        """Fresh progress, or with ``--resume`` the last checkpoint's (``run.state`` restored).
        A workdir that holds a run is an error without ``--resume``."""
        progress = Progress(zero_metrics(run))
        last = self.dir / "last"
        step = checkpoint.newest_step(last)
        if step is None:
            if self.cfg.resume:
                report.say(f"--resume: no checkpoint in {last}; starting from scratch")
            progress.note_machine()
            return progress
        if not self.cfg.resume:
            raise ValueError(f"{self.dir} already holds a run: pass --resume to continue it or "
                             "choose another --workdir")
        meta = checkpoint.restore_meta(last, step)
        saved = type(self.cfg).from_dict(meta["config"])
        diff = [k for k in RESUME_FIXED if getattr(saved, k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError(f"--resume: {', '.join(diff)} differ from the checkpoint in "
                             f"{self.dir} ({', '.join(f'{k}={getattr(saved, k)!r}' for k in diff)})")
        tree = checkpoint.restore_state(last, step, {"state": run.state,
                                                     "metrics": progress.metrics})
        run.state = tree["state"]
        spe = self.steps_per_epoch
        report.say(f"resumed from {last} at step {step} (epoch {step // spe + 1}, "
                   f"{step % spe}/{spe} steps into it)")
        progress = Progress(tree["metrics"], meta["history"], meta["best"],
                            meta.get("machines", []))  # none in checkpoints before train.host
        progress.note_machine()
        return progress


# ----------------------------------------------------------------------------- train


def train_epoch(run: Run, cfg: Config, progress: Progress, epoch: int, first: int, end: int,
                steps_per_epoch: int, report: Report, stop: dict[str, int | None],
                on_step: Callable[[int], None] | None) -> None:
    """Steps ``first..end-1`` of ``epoch``; the progress bar syncs every ``--log-every`` steps,
    which is also where a NaN loss is noticed."""
    bar = report.progress_bar(epoch, first, end)
    t_log = time.perf_counter()
    n_log = 0
    for i, batch in zip(range(first, end), run.feed.batches(epoch, first, end)):
        run.state, progress.metrics = run.train_step(run.state, progress.metrics, *batch)
        step = epoch * steps_per_epoch + i + 1
        n_log += 1
        if on_step is not None:
            on_step(step)
        if stop["signum"] is not None:
            raise Interrupted(stop["signum"])
        if n_log == cfg.log_every or i == end - 1:
            m = jax.device_get(progress.metrics)
            if m["nonfinite"]:
                raise Diverged(f"loss became NaN/inf at step {step} (epoch {epoch + 1}, "
                               f"lr {float(run.schedule(step - 1)):.4g})")
            now = time.perf_counter()
            bar.update(n_log)
            bar.set_postfix(loss=f"{m['loss_sum'] / m['count']:.3f}",
                            acc=f"{m['correct'] / m['count']:.2%}",
                            img_s=f"{n_log * cfg.batch_size / (now - t_log):.0f}")
            t_log, n_log = now, 0
    bar.close()


def end_epoch(run: Run, cfg: Config, progress: Progress, ckpts: Checkpoints, report: Report,
              epoch: int, first: int, end: int, elapsed: float) -> None:
    """Epoch metrics and evaluation into the history; best and last checkpoints; the logs."""
    m = jax.device_get(progress.metrics)
    step = int(run.state.step)
    h = {"epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
         "train_loss": float(m["loss_sum"] / m["count"]),
         "train_acc": float(m["correct"] / m["count"])}
    for name in run.eval_sets:
        h.update(evaluate(run, name))
    h.update(epoch_time=elapsed, img_per_s=(end - first) * cfg.batch_size / elapsed)
    progress.history.append(h)
    select = selection_metric(run)
    if h[select] > progress.best["acc"]:
        progress.best = {"acc": h[select], "epoch": epoch + 1, "test_acc": h["test_acc"]}
        ckpts.save("best", run, progress, epoch + 1)
    progress.metrics = zero_metrics(run)
    ckpts.save("last", run, progress, epoch + 1)
    report.epoch(progress.history)


def selection_metric(run: Run) -> str:
    """The best checkpoint is chosen on validation accuracy if there is a validation set."""
    return "val_acc" if "val" in run.eval_sets else "test_acc"


def train(cfg: Config, on_step: Callable[[int], None] | None = None) -> dict:
    """Trains on CIFAR held on the device (:func:`fit`); returns ``{"best_acc", "final_acc",
    "history", ...}``.

    ``on_step(step)`` runs after each step is dispatched: a hook for tests that must act at a
    known step (e.g. deliver a signal there).
    """
    arrays, val_x, val_y = load_data(cfg)
    n_train = len(arrays.train_labels)
    spe = n_train // cfg.batch_size
    if spe == 0:
        raise ValueError(f"{n_train} training images are fewer than one batch of "
                         f"{cfg.batch_size}")
    run = setup(cfg, arrays, spe)
    run.eval_sets["test"] = make_eval_set(run, arrays.test_images, arrays.test_labels)
    if val_x is not None:
        run.eval_sets["val"] = make_eval_set(run, val_x, val_y)
    return fit(cfg, run, arrays.classes, n_train, spe, cfg.dataset, on_step)


def fit(cfg: Config, run: Run, classes: tuple[str, ...], n_train: int, spe: int, data_name: str,
        on_step: Callable[[int], None] | None = None) -> dict:
    """The loop every trainer shares: resume or start, train epoch by epoch from ``run.feed``,
    evaluate ``run.eval_sets``, checkpoint, log; a signal saves and stops, a NaN loss stops."""
    total = cfg.total_steps(spe)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = Report(work, parallel.is_main_process(),
                    f"{cfg.arch} on {data_name}" if cfg.plot else None)
    ckpts = Checkpoints(cfg, classes, spe)
    progress = ckpts.start(run, report)
    report.restart(progress.history)
    report.say(f"{cfg.arch} on {data_name}: {n_train} train images, {spe} steps/epoch, "
               f"{total} steps ({math.ceil(total / spe)} epochs), batch {cfg.batch_size} over "
               f"{run.mesh.devices.size} {jax.devices()[0].platform} device(s) in "
               f"{jax.process_count()} process(es), {cfg.precision}")
    step = int(run.state.step)
    with signals_at_step_boundary() as stop:
        try:
            while step < total:
                epoch, first = divmod(step, spe)
                end = min(spe, total - epoch * spe)
                t0 = time.perf_counter()
                train_epoch(run, cfg, progress, epoch, first, end, spe, report, stop, on_step)
                end_epoch(run, cfg, progress, ckpts, report, epoch, first, end,
                          time.perf_counter() - t0)
                step = int(run.state.step)
            ckpts.writer.close()  # every save on disk before the run returns
        except Interrupted as e:
            ckpts.save("last", run, progress, int(run.state.step) // spe)
            ckpts.writer.close()
            print(f"\n{e} at step {int(run.state.step)}: saved {ckpts.dir / 'last'}; continue "
                  f"with --workdir {work} --resume", file=sys.stderr)
            # SIGTERM is a scheduler's request to stop: done as asked. Ctrl-C is the user's.
            raise SystemExit(0 if e.signum == signal.SIGTERM else 130) from None
        except Diverged as e:
            ckpts.writer.close()
            print(f"\nstopped: {e}. The last good checkpoint ({ckpts.dir / 'last'}, step "
                  f"{checkpoint.newest_step(ckpts.dir / 'last')}) is kept; try a lower --lr or "
                  "--warmup on.", file=sys.stderr)
            raise SystemExit(1) from None
        # Other errors leave an unfinished save behind, as a kill would (the checkpoint before
        # it stays whole): after a lost peer, waiting for it would wait for the dead process.
    return summarize(progress, selection_metric(run), report)


def summarize(progress: Progress, select: str, report: Report) -> dict:
    """The closing line, and the result :func:`train` returns."""
    best, history = progress.best, progress.history
    final = history[-1]["test_acc"] if history else float("nan")
    report.say(f"done: best {select.replace('_acc', '')} acc {best['acc']:.2%} (epoch "
               f"{best['epoch']}, test acc {best.get('test_acc', float('nan')):.2%}); final test "
               f"acc {final:.2%}. Curves: {report.curves_path}, log: {report.metrics_path}")
    return {"best_acc": best["acc"], "best_epoch": best["epoch"], "final_acc": final,
            "history": history}
