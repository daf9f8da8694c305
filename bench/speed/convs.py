"""One convolution at a time, flaxres's oneDNN call against PyTorch's, at ResNet-20's 3x3
stride-1 shapes (batch 128, channels-last, fp32): whether a whole-net gap sits in the kernels.

    python -m bench.speed.convs [--rounds 3] [--threads 2] [--batch 128]

Each (framework, round) runs in a fresh process, the frameworks alternating, so neither's
OpenMP runtime shares a process with the other's; each line is the median of ``--reps`` calls
after an untimed first one.
flaxres is timed bare (``onednn.conv_forward``) and with the inference post-ops that
``ops.conv_batch_norm_eval`` adds (eval-mode BatchNorm, ReLU, residual add).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

from bench.speed.timing import add_worker_flags, alternate_workers, interleave

SHAPES = ((32, 16), (16, 32), (8, 64))  # (H = W, C = O) of ResNet-20's three stages


def _median_ms(runners: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median ms per synchronous call of each runner, one runner after another (its first,
    compiling call apart)."""
    return {name: interleave({name: run}, reps, warmup=0)[name].summary(batch=1)["median_ms"]
            for name, run in runners.items()}


def time_flaxres(batch: int, reps: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxres.cpu import onednn

    if not onednn.available():
        raise SystemExit(f"error: the oneDNN extension is not built ({onednn.unavailable_reason()})")
    rng, pads, runners = np.random.default_rng(0), ((1, 1), (1, 1)), {}
    for hw, c in SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, c)), jnp.float32)
        bn = tuple(jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(3))
        variants = {
            "conv": lambda x, w, bn: onednn.conv_forward(x, w, (1, 1), pads),
            "conv+bn+relu": lambda x, w, bn: onednn.conv_batch_norm_forward(
                x, w, *bn, None, (1, 1), pads, 1, True, 0),
            "conv+bn+residual+relu": lambda x, w, bn: onednn.conv_batch_norm_forward(
                x, w, *bn, x, (1, 1), pads, 1, True, 0)}
        for name, f in variants.items():
            runners[f"{hw}x{hw}x{c} {name}"] = functools.partial(
                lambda jf, *a: jf(*a).block_until_ready(), jax.jit(f), x, w, bn)
    return _median_ms(runners, reps)


def time_torch(batch: int, reps: int) -> dict[str, float]:
    import torch

    runners = {}
    for hw, c in SHAPES:
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(batch, c, hw, hw).to(memory_format=torch.channels_last)
        runners[f"{hw}x{hw}x{c} conv"] = functools.partial(conv, x)
    with torch.no_grad():
        return _median_ms(runners, reps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.speed.convs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_flags(p, rounds=3, reps=30, reps_help="timed calls per line")
    p.add_argument("--worker", choices=("flaxres", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one framework in this fresh process
        from bench.speed.threads import set_threads

        set_threads(args.threads)
        fn = time_flaxres if args.worker == "flaxres" else time_torch
        print(json.dumps(fn(args.batch, args.reps)))
        return
    rows: dict[tuple[str, str], list[float]] = {}
    workers = alternate_workers(
        "bench.speed.convs", ("flaxres", "torch"), args.rounds,
        ["--threads", str(args.threads), "--batch", str(args.batch), "--reps", str(args.reps)])
    for fw, stdout in workers:
        for key, ms in json.loads(stdout.splitlines()[-1]).items():
            rows.setdefault((fw, key), []).append(ms)
    print(f"batch {args.batch}, {args.threads} threads, ms per call (median of {args.reps}) "
          "in each round:")
    for (fw, key), ms in sorted(rows.items(), key=lambda r: (r[0][1].split()[0], r[0][0])):
        print(f"  {fw:<8} {key:<32} " + "  ".join(f"{m:6.2f}" for m in ms))


if __name__ == "__main__":
    main()
