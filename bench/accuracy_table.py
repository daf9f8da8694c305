"""The results table from ``bench.accuracy`` results files and ``train.cifar`` workdirs: one
markdown row per model and recipe, with each framework's accuracy over the seeds found and the
gap between them, so that a table in the README (or He et al.'s Table 6, one file per depth) is
a command's output, not a transcription. Sources of the same recipe (one per framework or seed)
merge into one row; a workdir is flaxres's run of its last checkpoint. Each results file keeps
its runs' times and machine; accuracy does not depend on the machine, so the table leaves them.

    python -m bench.accuracy_table docs/results/accuracy-*.json runs/my-workdir
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NoReturn

from scipy import stats

from flaxres import checkpoint
from train.config import Config

HEADER = ("| model | recipe | flaxres | PyTorch reference | flaxres − PyTorch |\n"
          "|---|---|---|---|---|")
FRAMEWORKS = ("flax", "torch")
# Config fields bench.accuracy leaves at their defaults: a train.cifar run that set one otherwise
# trained another recipe, and its row says so.
FIXED_BY_PARITY = ("dataset", "momentum", "nesterov", "milestones", "val_split", "mean", "std",
                   "augment", "precision", "init_from", "freeze_backbone")


def run_length(config: dict) -> str:
    """A run's length as its flags gave it: ``--steps`` iterations, else ``--epochs``."""
    return f"{config['steps']} iterations" if config.get("steps") else f"{config['epochs']} epochs"


def recipe(config: dict) -> str:
    """What the two frameworks share in a results file, as the table states it."""
    subset = f", fixed {config['subset']}-image subset" if config.get("subset") else ""
    other = "".join(f", {change}" for change in config.get("changed", ()))
    return (f"{run_length(config)}, {config['schedule']}, lr {config['lr']}, "
            f"wd {config['weight_decay']}, batch {config['batch_size']}{subset}{other}")


def _warmup_steps(cfg: Config) -> int:
    return cfg.warmup_steps if cfg.use_warmup() else 0


def from_workdir(path: Path) -> dict:
    """A finished ``train.cifar`` run (its workdir or a ``weights/`` folder) as a results file
    holding one flaxres run: the last checkpoint's config, its last epoch's test accuracy, and
    its summed epoch times as ``bench.accuracy`` counts them. The "best" checkpoint is never
    read: without a validation split it is chosen on the test set."""
    last = path / checkpoint.CHECKPOINTS / "last"
    step = checkpoint.newest_step(last)
    if step is None:
        raise ValueError(f"no checkpoint in {last}")
    meta = checkpoint.restore_meta(last, step)
    cfg = Config.from_dict(meta["config"])
    total = cfg.total_steps(meta["steps_per_epoch"])
    if step != total:
        raise ValueError(f"unfinished run: its last checkpoint is step {step} of {total}")
    parity_cfg = Config(arch=cfg.arch)
    changed = [f"{name} {getattr(cfg, name)}" for name in FIXED_BY_PARITY
               if getattr(cfg, name) != getattr(parity_cfg, name)]
    if _warmup_steps(cfg) != _warmup_steps(parity_cfg):
        changed.append(f"warm-up {_warmup_steps(cfg)} steps")
    history = meta["history"]
    config = {"arch": cfg.arch, "epochs": cfg.epochs, "steps": cfg.steps, "subset": cfg.subset,
              "schedule": cfg.schedule, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
              "batch_size": cfg.batch_size, "changed": changed}
    machines = "; ".join(_host(m) for m in meta.get("machines", []))  # older runs: none
    return {"config": config, "machine": machines or None, "runs": {"flax": [
        {"seed": cfg.seed, "final_acc": history[-1]["test_acc"],
         "train_time": sum(h["epoch_time"] for h in history)}]}}


def _host(m: dict) -> str:
    accelerators = [d for d in m["devices"] if not d.startswith("cpu")]  # JAX's, e.g. "cuda:0"
    jax_on = f"{accelerators[0].split(':')[0]} ×{len(accelerators)}" if accelerators else "CPU"
    return f"{m['cpu']}, {m['cores']} cores, {m['date_utc'][:10]}; JAX on {jax_on}"


def _accuracy(runs: list[dict]) -> str:
    if not runs:
        return "not run"
    accs = [r["final_acc"] for r in runs]
    if len(accs) == 1:
        return f"{accs[0]:.2%} (seed {runs[0]['seed']})"
    return (f"{statistics.mean(accs):.2%} ± {statistics.stdev(accs):.2%} "
            f"(seeds {', '.join(str(r['seed']) for r in runs)})")


def _gap(flax: list[dict], torch: list[dict]) -> str:
    """flaxres's mean minus PyTorch's, in points, and with two seeds or more on each side Welch's
    t-test p: how often seed noise alone would part two equally good frameworks this far. Welch's,
    not Student's, because each framework's seeds scatter by their own amount."""
    if not flax or not torch:
        return "–"
    ours, theirs = ([100 * r["final_acc"] for r in runs] for runs in (flax, torch))
    gap = f"{statistics.mean(ours) - statistics.mean(theirs):+.2f} points"
    if min(len(ours), len(theirs)) < 2:
        return gap
    if statistics.stdev(ours) == statistics.stdev(theirs) == 0:  # Welch's p would be nan
        return f"{gap} (no t-test: every seed alike on each side)"
    return f"{gap} (Welch's t-test p = {stats.ttest_ind(ours, theirs, equal_var=False).pvalue:.2f})"


def table(files: list[dict], names: list[str] | None = None) -> str:
    """The markdown table of ``files`` (parsed results, from the sources ``names``), rows in the
    order first seen. A seed given twice in one row is an error: the mean would count it twice."""
    groups: dict[tuple[str, str], dict] = {}
    for results, name in zip(files, names or ["?"] * len(files)):
        key = (results["config"]["arch"], recipe(results["config"]))
        group = groups.setdefault(key, {"sources": {}, **{fw: [] for fw in FRAMEWORKS}})
        for fw in FRAMEWORKS:
            for run in results["runs"].get(fw, []):
                if (seen := group["sources"].setdefault((fw, run["seed"]), name)) != name:
                    raise ValueError(f"{name}: {fw} seed {run['seed']} of {key[0]} ({key[1]}) "
                                     f"is also in {seen}")
                group[fw].append(run)
    for g in groups.values():
        for fw in FRAMEWORKS:
            g[fw].sort(key=lambda run: run["seed"])
    rows = [f"| {arch} | {rec} | {_accuracy(g['flax'])} | {_accuracy(g['torch'])} | "
            f"{_gap(g['flax'], g['torch'])} |"
            for (arch, rec), g in groups.items()]
    return "\n".join([HEADER, *rows])


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+",
                   help="bench.accuracy --json files and train.cifar workdirs")
    args = p.parse_args(argv)
    files = []
    for name in args.results:
        path = Path(name)
        kind = "finished train.cifar workdir" if path.is_dir() else "bench.accuracy results file"
        try:
            files.append(from_workdir(path) if path.is_dir() else json.loads(path.read_text()))
            table(files[-1:])  # reads all the table reads of it, so a bad file is named
        except OSError as e:
            fail(f"{name}: {e.strerror}")
        except checkpoint.CheckpointError as e:
            fail(str(e))
        except (ValueError, KeyError, TypeError) as e:
            fail(f"{name}: not a {kind} ({type(e).__name__}: {e})")
    try:
        out = table(files, args.results)
    except ValueError as e:
        fail(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
