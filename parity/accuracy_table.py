"""The results table from ``parity.accuracy`` results files: one markdown row per model and
recipe, with each framework's accuracy over the seeds found, the training time and the machine,
so that a table in the README (or He et al.'s Table 6, one file per depth) is a command's output,
not a transcription. Files of the same recipe (one per framework or seed) merge into one row.

    python -m parity.accuracy_table docs/results/accuracy-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HEADER = ("| model | recipe | flaxres | PyTorch reference | training time per run (flaxres / PyTorch) "
          "| machine |\n|---|---|---|---|---|---|")
FRAMEWORKS = ("flax", "torch")


def run_length(config: dict) -> str:
    """A run's length as its flags gave it: ``--steps`` iterations, else ``--epochs``."""
    return f"{config['steps']} iterations" if config.get("steps") else f"{config['epochs']} epochs"


def recipe(config: dict) -> str:
    """What the two frameworks share in a results file, as the table states it."""
    subset = f", first {config['subset']} images" if config.get("subset") else ""
    return (f"{run_length(config)}, {config['schedule']}, lr {config['lr']}, "
            f"wd {config['weight_decay']}, batch {config['batch_size']}{subset}")


def machine(results: dict) -> str:
    """Where a file's runs trained; files written before the machine was recorded say it by
    hand, or nothing."""
    m = results.get("machine")
    if not m or isinstance(m, str):
        return m or "not recorded"
    accelerators = [d for d in m["devices"] if not d.startswith("cpu")]  # JAX's, e.g. "cuda:0"
    jax_on = f"{accelerators[0].split(':')[0]} ×{len(accelerators)}" if accelerators else "CPU"
    return (f"{m['cpu']}, {m['cores']} cores, {m['date_utc'][:10]}; JAX on {jax_on}, PyTorch on "
            f"{results['torch_device']}")


def _accuracy(runs: list[dict]) -> str:
    if not runs:
        return "not run"
    accs = [r["final_acc"] for r in runs]
    if len(accs) == 1:
        return f"{accs[0]:.2%} (seed {runs[0]['seed']})"
    return (f"{statistics.mean(accs):.2%} ± {statistics.stdev(accs):.2%} "
            f"(seeds {', '.join(str(r['seed']) for r in runs)})")


def _hours(runs: list[dict]) -> str:
    return ", ".join(f"{r['train_time'] / 3600:.2f}" for r in runs) + " h" if runs else "–"


def table(files: list[dict]) -> str:
    """The markdown table of ``files`` (parsed results), rows in the order first seen."""
    groups: dict[tuple[str, str], dict] = {}
    for results in files:
        key = (results["config"]["arch"], recipe(results["config"]))
        group = groups.setdefault(key, {"machines": [], **{fw: [] for fw in FRAMEWORKS}})
        for fw in FRAMEWORKS:
            group[fw] += results["runs"].get(fw, [])
        where = machine(results)
        if where not in group["machines"]:
            group["machines"].append(where)
    rows = [f"| {arch} | {rec} | {_accuracy(g['flax'])} | {_accuracy(g['torch'])} | "
            f"{_hours(g['flax'])} / {_hours(g['torch'])} | {'; '.join(g['machines'])} |"
            for (arch, rec), g in groups.items()]
    return "\n".join([HEADER, *rows])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m parity.accuracy_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="parity.accuracy --json files")
    args = p.parse_args(argv)
    files = []
    for name in args.results:
        try:
            files.append(json.loads(Path(name).read_text()))
            table(files[-1:])  # reads all the table reads of it, so a bad file is named
        except OSError as e:
            print(f"error: {name}: {e.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: {name}: not a parity.accuracy results file "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            raise SystemExit(2) from None
    out = table(files)
    print(out)
    return out


if __name__ == "__main__":
    main()
