"""``python -m train.cifar``: He et al. (2016)'s CIFAR recipe with flaxres.

    python -m train.cifar --arch resnet20 --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 1
    python -m train.cifar --workdir runs/r20 --resume
    python -m train.cifar --eval-only --checkpoint runs/r20
    python -m train.cifar --predict cat.png dog.jpg --checkpoint runs/r20

Data parallel over every visible device (``jax.jit`` on a 1-D mesh, batch sharded on 'data',
parameters replicated), so BatchNorm sees the global batch exactly as one PyTorch process would.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxres
from train import checkpoint, data, finetune, optim, steps
from train.config import Config

# Fields a resumed run must share with its checkpoint (others, e.g. --epochs, may change).
_RESUME_FIXED = ("arch", "dataset", "batch_size", "seed", "subset", "val_split", "precision",
                 "augment", "mean", "std", "freeze_backbone")


class Diverged(RuntimeError):
    """The training loss became NaN or inf."""


class _Interrupted(Exception):
    """Ctrl-C arrived; raised at the next step boundary, where the state is whole."""


@contextlib.contextmanager
def _ctrl_c_at_step_boundary():
    """The first Ctrl-C only sets a flag (a KeyboardInterrupt inside a jitted call could lose
    the donated state); the loop checks it after each step. A second Ctrl-C aborts at once."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> Config:
    """argparse generated from :class:`Config`: one flag per field, its help and default."""
    p = argparse.ArgumentParser(prog="python -m train.cifar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_ = meta.pop("help") + ("" if f.default is None else f" (default: {f.default})")
        typ = hints[f.name]
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help_)
            continue
        base = typ
        if isinstance(typ, types.UnionType):  # X | None
            base = next(a for a in typing.get_args(typ) if a is not type(None))
        if typing.get_origin(base) is tuple:
            p.add_argument(flag, nargs="+", type=typing.get_args(base)[0], default=f.default,
                           help=help_, **meta)
        else:
            p.add_argument(flag, type=base, default=f.default, help=help_, **meta)
    ns = p.parse_args(argv)
    cfg = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()})
    if (cfg.eval_only or cfg.predict) and not cfg.checkpoint:
        p.error("--eval-only and --predict need --checkpoint PATH")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        p.error("--mean and --std take three numbers (R G B)")
    if cfg.freeze_backbone and not cfg.init_from:
        p.error("--freeze-backbone needs --init-from PATH")
    return cfg


def build_model(cfg: Config) -> flaxres.ResNet:
    """``create_model`` for registered names; any other ``resnetN`` through
    ``flaxres.cifar_resnet`` (e.g. resnet8, handy for quick experiments), whose error names the
    valid depths."""
    dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    m = re.fullmatch(r"resnet(\d+)", cfg.arch)
    if cfg.arch not in flaxres.list_models() and m:
        return flaxres.cifar_resnet(int(m.group(1)), num_classes=cfg.num_classes, dtype=dtype,
                                    rngs=nnx.Rngs(cfg.seed))
    return flaxres.create_model(cfg.arch, num_classes=cfg.num_classes, seed=cfg.seed, dtype=dtype)


# ----------------------------------------------------------------------------- helpers


class _Run(types.SimpleNamespace):
    """The built pieces of a run: mesh, jitted steps, device data, schedule."""


def _setup(cfg: Config, arrays: data.Arrays | None, steps_per_epoch: int = 1) -> _Run:
    """Model, optimizer and jitted steps on the mesh; ``arrays``' training set goes on device.
    (``steps_per_epoch`` only shapes the lr schedule, irrelevant for inference.)"""
    mesh = steps.make_mesh()
    ndev = mesh.devices.size
    if cfg.batch_size % ndev:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {ndev} devices")
    schedule = cfg.lr_schedule(steps_per_epoch)
    tx = optim.sgd(schedule, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    tx = finetune.head_only(tx) if cfg.freeze_backbone else tx
    train_def, eval_def, state = steps.init_state(finetune.initial_model(cfg, build_model), tx,
                                                  cfg.seed)
    rep = steps.replicated(mesh)
    static = {"mean": cfg.mean, "std": cfg.std}
    eval_bs = max(ndev, cfg.eval_batch_size // ndev * ndev)
    run = _Run(mesh=mesh, rep=rep, schedule=schedule, mean=cfg.mean, std=cfg.std,
               eval_def=eval_def, state=jax.device_put(state, rep), eval_bs=eval_bs,
               train_step=steps.jit_train_step(mesh, train_def, tx, batch_size=cfg.batch_size,
                                               augment=cfg.augment, **static),
               predict=jax.jit(lambda s, x: steps.predict_probs(eval_def, s, x, **static)))
    run.eval_sets = {}
    if arrays is not None:
        run.train_x = jax.device_put(arrays.train_images, rep)
        run.train_y = jax.device_put(arrays.train_labels, rep)
    return run


def _eval_set(run: _Run, images: np.ndarray, labels: np.ndarray) -> tuple:
    """Device copies padded to whole eval batches, and the jitted step that masks the padding."""
    n = len(labels)
    total = math.ceil(n / run.eval_bs) * run.eval_bs
    x = np.zeros((total, *images.shape[1:]), np.uint8)
    y = np.zeros((total,), np.int32)
    x[:n], y[:n] = images, labels
    step = steps.jit_eval_step(run.mesh, run.eval_def, batch_size=run.eval_bs, num_valid=n,
                               mean=run.mean, std=run.std)
    return jax.device_put(x, run.rep), jax.device_put(y, run.rep), total // run.eval_bs, step


def evaluate(run: _Run, name: str) -> dict[str, float]:
    x, y, nbatches, step = run.eval_sets[name]
    m = jax.device_put(steps.zero_metrics(), run.rep)
    for i in range(nbatches):
        m = step(run.state, m, x, y, jnp.int32(i))
    m = jax.device_get(m)
    return {f"{name}_loss": float(m["loss_sum"] / m["count"]),
            f"{name}_acc": float(m["correct"] / m["count"])}


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


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs test (and val): the plot every CIFAR seed ends with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test"):
            key = f"{split}_{what}"
            if key in history[0]:
                vals = [h[key] * (100 if what == "acc" else 1) for h in history]
                ax.plot(ep, vals, marker="." if len(ep) < 30 else None, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if what == "loss" else "accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or path.parent.name)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _fmt(h: dict) -> str:
    parts = [f"epoch {h['epoch']:>3}", f"train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}"]
    for split in ("val", "test"):
        if f"{split}_loss" in h:
            parts.append(f"{split} loss {h[f'{split}_loss']:.4f} acc {h[f'{split}_acc']:.2%}")
    parts += [f"lr {h['lr']:.4g}", f"{h['epoch_time']:.1f}s", f"{h['img_per_s']:.0f} img/s"]
    return " | ".join(parts)


# ----------------------------------------------------------------------------- train


def train(cfg: Config) -> dict:
    """Trains, checkpoints and logs; returns ``{"best_acc", "final_acc", "history", ...}``."""
    from tqdm import tqdm

    arrays, val_x, val_y = load_data(cfg)
    n_train = len(arrays.train_labels)
    spe = n_train // cfg.batch_size
    if spe == 0:
        raise ValueError(f"{n_train} training images are fewer than one batch of "
                         f"{cfg.batch_size}")
    total = cfg.total_steps(spe)
    run = _setup(cfg, arrays, spe)
    run.eval_sets["test"] = _eval_set(run, arrays.test_images, arrays.test_labels)
    if val_x is not None:
        run.eval_sets["val"] = _eval_set(run, val_x, val_y)
    select = "val_acc" if val_x is not None else "test_acc"

    work = Path(cfg.workdir)
    ckpt_dir = work / "checkpoints"
    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.jsonl"
    history: list[dict] = []
    best = {"acc": -1.0, "epoch": 0}
    metrics = jax.device_put(steps.zero_metrics(), run.rep)
    last_step = checkpoint.latest(ckpt_dir / "last")
    if cfg.resume and last_step is not None:
        meta = checkpoint.restore_meta(ckpt_dir / "last", last_step)
        saved = Config.from_dict(meta["config"])
        diff = [k for k in _RESUME_FIXED if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"--resume: {', '.join(diff)} differ from the checkpoint in "
                             f"{ckpt_dir} ({', '.join(f'{k}={getattr(saved, k)!r}' for k in diff)})")
        tree = checkpoint.restore_state(ckpt_dir / "last", last_step,
                                        {"state": run.state, "metrics": metrics})
        run.state, metrics = tree["state"], tree["metrics"]
        history, best = meta["history"], meta["best"]
        print(f"resumed from {ckpt_dir / 'last'} at step {last_step} (epoch "
              f"{last_step // spe + 1}, {last_step % spe}/{spe} steps into it)")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {ckpt_dir / 'last'}; starting from scratch")
    elif last_step is not None:
        raise ValueError(f"{ckpt_dir} already holds a run: pass --resume to continue it or "
                         "choose another --workdir")
    # metrics.jsonl is rewritten from the checkpoint's history, so lines written after the last
    # checkpoint by a killed run disappear and the file equals an uninterrupted run's.
    main_proc = jax.process_index() == 0  # multi-host: one process writes logs and plots
    if main_proc:
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    def meta_now(epoch: int) -> dict:
        return {"epoch": epoch, "config": cfg.to_dict(), "history": history, "best": best,
                "classes": list(arrays.classes), "steps_per_epoch": spe}

    def save_last(epoch: int) -> None:
        checkpoint.save(ckpt_dir / "last", int(run.state.step),
                        {"state": run.state, "metrics": metrics}, meta_now(epoch))

    order_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2)
    permute = jax.jit(data.epoch_permutation, static_argnums=(1, 2), out_shardings=run.rep)
    ndev = run.mesh.devices.size
    print(f"{cfg.arch} on {cfg.dataset}: {n_train} train images, {spe} steps/epoch, {total} steps "
          f"({math.ceil(total / spe)} epochs), batch {cfg.batch_size} over {ndev} "
          f"{jax.devices()[0].platform} device(s), {cfg.precision}")
    step = int(run.state.step)
    with _ctrl_c_at_step_boundary() as ctrl_c:
        try:
            while step < total:
                epoch = step // spe
                end = min(spe, total - epoch * spe)
                perm = permute(order_key, epoch, n_train)
                bar = tqdm(total=end, initial=step % spe, desc=f"epoch {epoch + 1}", leave=False,
                           unit="step", dynamic_ncols=True,
                           disable=None if main_proc else True)
                t0 = t_log = time.perf_counter()
                n_log, first = 0, step % spe
                for i in range(step % spe, end):
                    run.state, metrics = run.train_step(run.state, metrics, perm, run.train_x,
                                                        run.train_y, jnp.int32(i))
                    step += 1
                    n_log += 1
                    if ctrl_c["set"]:
                        raise _Interrupted
                    if n_log == cfg.log_every or i == end - 1:
                        m = jax.device_get(metrics)
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
                m = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                h = {"epoch": epoch + 1, "step": step, "lr": float(run.schedule(step - 1)),
                     "train_loss": float(m["loss_sum"] / m["count"]),
                     "train_acc": float(m["correct"] / m["count"])}
                for name in run.eval_sets:
                    h.update(evaluate(run, name))
                h.update(epoch_time=elapsed, img_per_s=(end - first) * cfg.batch_size / elapsed)
                history.append(h)
                if h[select] > best["acc"]:
                    best = {"acc": h[select], "epoch": epoch + 1, "test_acc": h["test_acc"]}
                    checkpoint.save(ckpt_dir / "best", step, {"state": run.state,
                                                              "metrics": metrics}, meta_now(epoch + 1))
                metrics = jax.device_put(steps.zero_metrics(), run.rep)
                save_last(epoch + 1)
                if main_proc:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(h) + "\n")
                    if cfg.plot:
                        plot_curves(history, work / "curves.png", f"{cfg.arch} on {cfg.dataset}")
                    print(_fmt(h), flush=True)
        except _Interrupted:
            save_last(step // spe)
            print(f"\ninterrupted at step {step}: saved {ckpt_dir / 'last'}; continue with "
                  f"--workdir {work} --resume", file=sys.stderr)
            raise SystemExit(130) from None
        except Diverged as e:
            print(f"\nstopped: {e}. The last good checkpoint ({ckpt_dir / 'last'}, step "
                  f"{checkpoint.latest(ckpt_dir / 'last')}) is kept; try a lower --lr or "
                  "--warmup on.", file=sys.stderr)
            raise SystemExit(1) from None
    final = history[-1]["test_acc"] if history else float("nan")
    print(f"done: best {select.replace('_acc', '')} acc {best['acc']:.2%} (epoch {best['epoch']}, "
          f"test acc {best.get('test_acc', float('nan')):.2%}); final test acc {final:.2%}. "
          f"Curves: {work / 'curves.png'}, log: {metrics_path}")
    return {"best_acc": best["acc"], "best_epoch": best["epoch"], "final_acc": final,
            "history": history}


# ----------------------------------------------------------------------------- eval / predict


def _restore_for_inference(cfg: Config) -> tuple[Config, _Run, dict]:
    directory, step = checkpoint.resolve(cfg.checkpoint)
    meta = checkpoint.restore_meta(directory, step)
    saved = Config.from_dict(meta["config"])
    saved.init_from = None  # the checkpoint has the weights
    saved.data_dir = cfg.data_dir or saved.data_dir
    saved.cache_dir = cfg.cache_dir or saved.cache_dir
    run = _setup(saved, None)
    template = {"state": run.state, "metrics": jax.device_put(steps.zero_metrics(), run.rep)}
    run.state = checkpoint.restore_state(directory, step, template)["state"]
    print(f"loaded {saved.arch} from {directory / str(step)} (epoch {meta['epoch']})")
    return saved, run, meta


def evaluate_checkpoint(cfg: Config) -> dict[str, float]:
    saved, run, _ = _restore_for_inference(cfg)
    arrays = data.load_arrays(saved.dataset, saved.data_dir, saved.cache_dir)
    run.eval_sets["test"] = _eval_set(run, arrays.test_images, arrays.test_labels)
    res = evaluate(run, "test")
    print(f"test loss {res['test_loss']:.4f} acc {res['test_acc']:.2%} "
          f"({len(arrays.test_labels)} images)")
    return res


def predict(cfg: Config) -> list[list[tuple[str, float]]]:
    """Top-k classes with probabilities for each image (resized to 32x32 if needed)."""
    images = data.load_images(cfg.predict)  # before the checkpoint: a bad file fails at once
    _, run, meta = _restore_for_inference(cfg)
    probs = np.asarray(run.predict(run.state, jax.device_put(images, run.rep)))
    classes = meta["classes"]
    out = []
    for path, pr in zip(cfg.predict, probs):
        top = np.argsort(-pr)[: cfg.top_k]
        out.append([(classes[c], float(pr[c])) for c in top])
        print(path)
        for rank, (name, prob) in enumerate(out[-1], 1):
            print(f"  {rank}. {name:<14} {prob:7.2%}")
    return out


def enable_compilation_cache() -> None:
    """Caches XLA executables on disk (default ~/.cache/flaxres/jax): on a small CPU each of the
    ~30 compiles of model init, train and eval steps takes about a second, so reruns and
    resumes start much faster. ``JAX_COMPILATION_CACHE_DIR`` / ``JAX_PERSISTENT_CACHE_*`` win."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(data.default_cache_dir() / "jax"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.distributed:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    enable_compilation_cache()
    try:
        if cfg.predict:
            predict(cfg)
        elif cfg.eval_only:
            evaluate_checkpoint(cfg)
        else:
            train(cfg)
    except (data.DataError, checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
