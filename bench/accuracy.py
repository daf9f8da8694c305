"""Same recipe, two frameworks: flaxres (``train.cifar``) vs a plain PyTorch loop, over seeds:
the accuracy-level parity check.

    python -m bench.accuracy --arch resnet20 --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --epochs 3 --subset 10000 --seeds 0 1 2 --json compare.json

Both sides get the same arrays, batch size, epochs, per-iteration lr schedule (the very optax
schedule function, evaluated in Python for PyTorch), SGD hyper-parameters, normalisation and
augmentation (4-px zero pad + random crop + flip, drawn with each framework's own RNG) and the
reference PyTorch model of :func:`parity.reference.create_torch_model`, under one matmul/conv
precision policy (:mod:`bench.speed.precision`; it matters on GPUs only). PyTorch trains on CUDA
where it sees a GPU, with augmentation on the CPU as the popular scripts' data loaders do. Each
prints mean +- std final test accuracy; ``--json`` keeps every run's numbers and the machine.

He et al.'s Table 6 recipe, per depth (64k iterations, /10 at 32k and 48k, weight decay 1e-4):

    python -m bench.accuracy --arch resnet56 --data-dir DIR --steps 64000 --seeds 0 \
        --workdir runs/t6-resnet56 --json t6-resnet56.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy_table import run_length
from bench.speed import precision
from bench.speed.report import machine
from flaxres.checkpoint import CheckpointError
from flaxres.cpu.malloc import retain_freed_memory
from parity.reference import create_torch_model
from train import cli, loop
from train.config import Config, add_flags
from train.data import DataError


def torch_augment(x, gen):
    """uint8 NHWC -> uint8 NHWC: zero-pad 4, random 32x32 crop, flip half (vectorised)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    oy, ox = (torch.randint(0, 9, (n,), generator=gen) for _ in range(2))
    ar = torch.arange(32)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(2), out)


# train.cifar's flags that both frameworks share here (the rest keep Config's defaults).
RECIPE = ("arch", "data_dir", "cache_dir", "epochs", "steps", "subset", "batch_size", "lr",
          "momentum", "nesterov", "weight_decay", "schedule", "matmul_precision")
# Config fields a resumed PyTorch run must share with its state file.
TORCH_RESUME_FIXED = ("arch", "data_dir", "epochs", "steps", "subset", "seed", "batch_size",
                      "lr", "momentum", "nesterov", "weight_decay", "schedule", "augment")


def _torch_state(path: Path, cfg: Config) -> dict | None:
    """The saved state of an interrupted run, or None; a state from another recipe is an error
    (resuming it would mix two runs)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:  # by kind of damage
        raise ValueError(f"{path}: not a readable PyTorch run state ({e})") from None
    if not isinstance(state, dict) or "model" not in state:  # e.g. a bare state dict saved there
        raise ValueError(f"{path}: not a PyTorch run state saved by bench.accuracy")
    theirs = state.get("config", {})
    changed = [f for f in TORCH_RESUME_FIXED if theirs.get(f) != getattr(cfg, f)]
    if changed:
        raise ValueError(f"{path}: saved by a run with other settings ({', '.join(changed)}); "
                         "use another --workdir")
    return state


def _save_atomically(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a kill mid-write leaves the previous epoch's state whole


def train_torch(cfg: Config, threads: int | None = None, state_path: Path | None = None,
                compile_model: bool = False, device: str = "cpu") -> dict:
    """The PyTorch reference loop for ``cfg`` on ``device`` ("cpu" or "cuda"), as the popular
    CIFAR scripts train: batches drawn and augmented on the CPU, one test evaluation after every
    epoch as ``train.cifar`` does. With ``state_path`` the run
    saves model, optimizer and RNG state there after every epoch and continues from it, so a
    90-epoch reference survives interruptions; a resumed run equals an uninterrupted one.
    ``compile_model`` runs the training steps through ``torch.compile`` (the same function,
    about a fifth faster on the 2-core CPU); evaluation stays eager, so the eval-mode switch
    never recompiles."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN's fastest kernels
    saved = _torch_state(state_path, cfg) if state_path else None  # before the data: fail fast
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    arrays, _, _ = loop.load_data(cfg)
    xtr, ytr = torch.from_numpy(arrays.train_images), torch.from_numpy(arrays.train_labels).long()
    xte, yte = torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels).long()
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)

    def prep(x):  # uint8 NHWC -> normalised NCHW on the device, as ToTensor + Normalize
        return (x.to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std

    def test_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            correct = sum((model(prep(xte[i:i + 1000])).argmax(1).cpu() == yte[i:i + 1000])
                          .sum().item() for i in range(0, len(yte), 1000))
        return correct / len(yte)

    model = create_torch_model(cfg.arch, num_classes=cfg.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    forward = torch.compile(model) if compile_model else model
    spe = len(ytr) // cfg.batch_size
    total = cfg.total_steps(spe)
    schedule = cfg.lr_schedule(spe)
    step, train_time, history = 0, 0.0, []
    if saved:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        step, train_time, history = saved["step"], saved["train_time"], saved["history"]
        print(f"  torch: resumed {state_path} at epoch {len(history)}", flush=True)
    while step < total:
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        t_ep, seen = time.perf_counter(), 0
        # Summed on the device, read once an epoch: a read per step would stall a GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(min(spe, total - step)):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = prep(torch_augment(xtr[idx], gen) if cfg.augment else xtr[idx])
            y = ytr[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = float(schedule(step))
            out = forward(x)
            loss = torch.nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach().double() * len(idx)
            correct += (out.argmax(1) == y).sum()
            seen += len(idx)
        loss_sum, correct = loss_sum.item(), correct.item()  # waits for the device's last step
        train_elapsed = time.perf_counter() - t_ep
        train_time += train_elapsed
        test_acc = test_accuracy()
        history.append({"epoch": len(history) + 1, "train_loss": loss_sum / seen,
                        "train_acc": correct / seen, "test_acc": test_acc,
                        "img_per_s": seen / train_elapsed})
        print(f"  torch epoch {len(history)}: train loss {loss_sum / seen:.4f} acc "
              f"{correct / seen:.2%} | test acc {test_acc:.2%} ({seen / train_elapsed:.0f} img/s)",
              flush=True)
        if state_path:
            _save_atomically({"config": {f: getattr(cfg, f) for f in TORCH_RESUME_FIXED},
                              "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "generator": gen.get_state(), "step": step,
                              "train_time": train_time, "history": history}, state_path)
    return {"final_acc": history[-1]["test_acc"] if history else test_accuracy(),
            "history": history, "train_time": train_time}


def train_flax(cfg: Config, workdir: Path | None = None) -> dict:
    """``train.cifar``'s loop for ``cfg``; with ``workdir`` it checkpoints there and resumes
    what an earlier call left (``--resume``), else it runs in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.workdir, cfg.resume = str(workdir or tmp), workdir is not None
        res = loop.train(cfg)
    res["train_time"] = sum(h["epoch_time"] for h in res["history"])  # as the torch side's
    return res


def summarize(accs: list[float]) -> dict:
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "runs": accs}


def main(argv: list[str] | None = None) -> dict:
    retain_freed_memory()  # both frameworks' runs share this process's malloc settings
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, RECIPE)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds, one run per framework each (default: 0 1 2)")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where PyTorch trains (default: auto, CUDA if PyTorch sees a GPU)")
    p.add_argument("--frameworks", nargs="+", default=["flax", "torch"],
                   choices=("flax", "torch"), help="which sides to run (default: both)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--torch-compile", action="store_true",
                   help="train the PyTorch side through torch.compile (faster; needs a C++ "
                        "compiler on the CPU)")
    p.add_argument("--json", default="accuracy.json", help="results file "
                   "(default: accuracy.json)")
    p.add_argument("--workdir", default=None,
                   help="keep every run's state here (flax-seed<S>/ as train.cifar's workdir, "
                        "torch-seed<S>.pt) and continue what an interrupted call left; "
                        "default: nothing kept")
    args = p.parse_args(argv)
    cli.enable_compilation_cache()
    try:
        return compare(args)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_torch_compile() -> None:
    """Compiles a one-line function, so that a machine where ``torch.compile`` cannot work (no
    C++ compiler for inductor) fails before any run (3 s), not at PyTorch's first step after
    hours of flaxres runs."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise ValueError(f"--torch-compile: torch.compile does not work here "
                         f"({str(e).splitlines()[0]}); run without it") from None


def compare(args: argparse.Namespace) -> dict:
    """Every (framework, seed) run of ``args``; the results file is rewritten after each."""
    device = args.torch_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--torch-device cuda: PyTorch sees no CUDA device here")
    if args.torch_compile and "torch" in args.frameworks:
        check_torch_compile()
    work = Path(args.workdir) if args.workdir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": vars(args), "machine": machine(), "torch_device": device,
                     "runs": {}}
    for fw in args.frameworks:
        runs = []
        for seed in args.seeds:
            cfg = Config(**{f: getattr(args, f) for f in RECIPE}, seed=seed, plot=False)
            print(f"{fw} seed {seed}", flush=True)
            with precision.policy(args.matmul_precision) as results["precision_policy"]:
                if fw == "flax":
                    res = train_flax(cfg, work and work / f"flax-seed{seed}")
                else:
                    res = train_torch(cfg, args.threads, work and work / f"torch-seed{seed}.pt",
                                      compile_model=args.torch_compile, device=device)
            runs.append({"seed": seed, "final_acc": res["final_acc"],
                         "train_time": res["train_time"],
                         "img_per_s": [h["img_per_s"] for h in res["history"]],
                         "test_acc": [h["test_acc"] for h in res["history"]]})
            print(f"{fw} seed {seed}: final test acc {res['final_acc']:.2%} "
                  f"({res['train_time']:.0f} s)", flush=True)
            results["runs"][fw] = runs
            results[fw] = summarize([r["final_acc"] for r in runs])
            Path(args.json).write_text(json.dumps(results, indent=1))  # partial results survive
    print(f"\n{args.arch}, {run_length(vars(args))}, {args.subset or 'all'} training images, "
          f"seeds {args.seeds}:")
    for fw in args.frameworks:
        s = results[fw]
        # img/s after the first epoch (which includes XLA compilation for flax)
        ips = np.mean(np.concatenate([r["img_per_s"][1:] or r["img_per_s"]
                                      for r in results["runs"][fw]]))
        print(f"  {fw:<6} test acc {s['mean']:.2%} +- {s['std']:.2%}   ({ips:.0f} img/s)")
    if len(args.frameworks) > 1:  # measured: PyTorch after JAX in one process ran 15% slower
        print("  (img/s of runs sharing one process: python -m bench.speed compares speed)")
    print(f"results: {args.json}")
    return results


if __name__ == "__main__":
    main()
