"""How long ``train.imagenet``'s steps wait for their input: the share of each training step spent
waiting for the next batch, with Grain's workers decoding JPEGs on the same machine.

    python -m bench.input --make-images /tmp/inet-synth --count 1000   # if there is no ImageNet
    python -m bench.stall --data-dir /tmp/inet-synth --arch resnet50 --batch-size 64 --steps 12 \\
        --json stall.json

Each step is synchronised (``--log-every 1``), so that a wait for data cannot hide behind the
asynchronous dispatch of the step before: the time the loop spends in ``next(batches)`` is time
in which the device has nothing to do. The first ``--skip`` steps (compilation, the workers'
start-up) are left out. The workers compete with the step for the CPU, so the step time here is
also what training costs with this input pipeline running beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.speed.report import machine
from train import imagenet, loop
from train.config import OneLineParser
from train.data import DataError


def measure(args: argparse.Namespace) -> dict:
    marks: list[tuple[int, float, float]] = []  # (step, time, seconds waited so far)
    with tempfile.TemporaryDirectory() as workdir:
        flags = ["--data-dir", args.data_dir, "--arch", args.arch, "--image-size",
                 str(args.image_size), "--batch-size", str(args.batch_size), "--eval-batch-size",
                 str(args.batch_size), "--steps", str(args.steps), "--log-every", "1",
                 "--no-plot", "--workdir", workdir]
        if args.workers is not None:
            flags += ["--workers", str(args.workers)]
        cfg = imagenet.parse_args(flags)
        run, classes, n_train, spe = imagenet.prepare(cfg)
        if spe < args.steps:
            raise DataError(f"--data-dir {args.data_dir}: {n_train} training images make "
                            f"{spe} steps of {args.batch_size}; --steps {args.steps} needs more")
        loop.fit(cfg, run, classes, n_train, spe, args.data_dir,
                 lambda step: marks.append((step, time.perf_counter(), run.feed.waited)))
    (s0, t0, w0), (s1, t1, w1) = marks[args.skip - 1], marks[-1]
    step_s, wait_s = (t1 - t0) / (s1 - s0), (w1 - w0) / (s1 - s0)
    return {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
            "workers": cfg.workers, "steps_timed": s1 - s0, "step_s": step_s,
            "wait_s": wait_s, "stall_share": wait_s / step_s,
            "img_s": args.batch_size / step_s, "machine": machine()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m bench.stall", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="image folder {train,val}/<class>/<image>")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="training steps in all (default: 12)")
    p.add_argument("--skip", type=int, default=3,
                   help="first steps left out: compilation and the workers' start-up "
                        "(default: 3)")
    p.add_argument("--workers", type=int, default=None,
                   help="decode processes (default: train.imagenet's)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if not 0 < args.skip < args.steps:
        p.error(f"--skip {args.skip} must be at least 1 and less than --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        out = measure(args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {out['workers']} "
          f"workers: {out['step_s']:.2f} s per step ({out['img_s']:.1f} img/s), of which "
          f"{out['wait_s']:.3f} s waiting for data: {out['stall_share']:.1%} stall "
          f"(steps {args.skip + 1}-{args.steps})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
