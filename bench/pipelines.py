"""The two input paths learn alike: ``train.imagenet`` (JPEGs decoded and augmented on the host by
Grain's workers, streamed to the device) against ``train.cifar`` (the dataset held on the device
and augmented there), on the same images with the same recipe, a few seeds each.

    python -m bench.pipelines --data-dir cifar10-jpeg --arch resnet20 --epochs 10 --seeds 0 1 \\
        --json docs/results/pipelines-resnet20.json
    python -m bench.pipelines --table docs/results/pipelines-resnet20.json

``--data-dir`` is an image folder ``train/<class>/*`` and ``test/<class>/*`` of 32x32 images.
``train.imagenet`` runs with ``--image-size 32 --transforms cifar`` (the 4-pixel padded random
crop and flip that ``train.cifar`` applies) and the CIFAR normalisation, so both runs optimise
the same objective; only the source of the batches differs (the two draw different crops and
orders from the same seed). The table gives each trainer's final test accuracy over the seeds
and Welch's t-test of the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy import stats

from flaxres.registry import CIFAR_MEAN, CIFAR_STD
from train.config import OneLineParser

TRAINERS = ("train.cifar", "train.imagenet")


def recipe(args: argparse.Namespace, seed: int, workdir: Path) -> list[str]:
    """The flags both trainers take."""
    return ["--arch", args.arch, "--data-dir", str(args.data_dir), "--epochs", str(args.epochs),
            "--batch-size", "128", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-4",
            "--schedule", "cosine", "--warmup", "off", "--seed", str(seed),
            "--workdir", str(workdir), "--no-plot",
            "--mean", *map(str, CIFAR_MEAN), "--std", *map(str, CIFAR_STD)]


def run_one(trainer: str, args: argparse.Namespace, seed: int) -> dict:
    """One run of ``python -m <trainer>``, as a user starts it, in a process of its own."""
    workdir = Path(args.workdir) / f"{trainer.split('.')[1]}-{args.arch}-s{seed}"
    flags = recipe(args, seed, workdir)
    if trainer == "train.imagenet":
        flags += ["--image-size", "32", "--transforms", "cifar", "--eval-split", "test",
                  "--workers", str(args.workers)]
    done = subprocess.run([sys.executable, "-m", trainer, *flags], check=False)
    if done.returncode:
        raise SystemExit(f"error: python -m {trainer} {' '.join(flags)} failed "
                         f"(exit {done.returncode})")
    h = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"trainer": trainer, "seed": seed, "final_acc": h[-1]["test_acc"], "history": h}


def table(results: dict) -> str:
    """Markdown: each trainer's final test accuracy (mean and std over seeds, and each seed),
    and Welch's t-test of the difference."""
    runs = results["runs"]
    acc = {t: [r["final_acc"] * 100 for r in runs if r["trainer"] == t] for t in TRAINERS}
    lines = [(f"{results['arch']}, {results['epochs']} epochs, batch 128, cosine lr 0.1, on "
             f"{results['images']}"), "",
             "| trainer | input | seeds | top-1 (%) | per seed |", "|---|---|---|---|---|"]
    inputs = {"train.cifar": "on the device", "train.imagenet": "Grain, JPEG decoded per epoch"}
    for t in TRAINERS:
        a = acc[t]
        sd = statistics.stdev(a) if len(a) > 1 else float("nan")
        lines.append(f"| {t} | {inputs[t]} | {len(a)} | {statistics.mean(a):.2f} ± {sd:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in a)} |")
    diff = statistics.mean(acc["train.imagenet"]) - statistics.mean(acc["train.cifar"])
    if min(map(len, acc.values())) > 1:
        p = stats.ttest_ind(acc["train.imagenet"], acc["train.cifar"], equal_var=False).pvalue
        lines += ["", (f"Difference (imagenet − cifar): {diff:+.2f} points, Welch's t-test "
                      f"p = {p:.2f}.")]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m bench.pipelines", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="image folder with train/ and test/ splits of 32x32 images")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2, help="train.imagenet's decode processes")
    p.add_argument("--workdir", default="runs/pipelines")
    p.add_argument("--json", help="write the runs here (and read them back with --table)")
    p.add_argument("--table", metavar="JSON", help="print the table of a results file, only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.data_dir:
        print("error: --data-dir: give the image folder (train/ and test/)", file=sys.stderr)
        raise SystemExit(2)
    results = {"arch": args.arch, "epochs": args.epochs, "images": Path(args.data_dir).name,
               "runs": []}
    for seed in args.seeds:
        for trainer in TRAINERS:
            results["runs"].append(run_one(trainer, args, seed))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
