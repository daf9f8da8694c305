"""Timing: compile time apart, then timed repetitions (median and spread), fresh worker processes
in alternation, and the machine's matmul peak that the achieved FLOP/s are compared with."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Timing:
    """One framework's compile time and its timed repetitions, in seconds."""

    compile_s: float = 0.0
    times_s: list[float] = field(default_factory=list)

    def summary(self, batch: int) -> dict:
        """img/s at the median rep, the spread (min..max, IQR) and the compile time."""
        t = sorted(self.times_s)
        med = statistics.median(t)
        q1, q3 = (statistics.quantiles(t, n=4)[0], statistics.quantiles(t, n=4)[2]) if len(t) > 1 \
            else (med, med)
        return {"img_s": batch / med, "median_ms": med * 1e3, "min_ms": t[0] * 1e3,
                "max_ms": t[-1] * 1e3, "iqr_ms": (q3 - q1) * 1e3,
                "img_s_range": [batch / t[-1], batch / t[0]], "compile_s": self.compile_s,
                "reps": len(t)}


def timed(fn: Callable[[], object]) -> float:
    """Seconds one synchronous call of ``fn`` takes."""
    s = time.perf_counter()
    fn()
    return time.perf_counter() - s


def interleave(runners: dict[str, Callable[[], None]], reps: int, warmup: int
               ) -> dict[str, Timing]:
    """Times each synchronous ``runners[name]()``: the first call (compilation) apart, then
    ``warmup`` untimed and ``reps`` timed rounds, one call of each runner per round, so that a
    load change on the machine hits all runners alike."""
    out = {name: Timing(compile_s=timed(step)) for name, step in runners.items()}
    for _ in range(warmup):
        for step in runners.values():
            step()
    for _ in range(reps):
        for name, step in runners.items():
            out[name].times_s.append(timed(step))
    return out


def at_least_one(text: str) -> int:
    """argparse type for a count of rounds, reps, images or threads: zero or less is refused
    with one line naming the flag, not left to fail inside a worker."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return n


def add_worker_flags(p: argparse.ArgumentParser, rounds: int, reps: int, reps_help: str,
                     batch: int = 128) -> None:
    """The flags of a command that times each framework in ``alternate_workers``' processes."""
    p.add_argument("--rounds", type=at_least_one, default=rounds,
                   help=f"processes per framework (default: {rounds})")
    p.add_argument("--threads", type=at_least_one, default=2,
                   help="threads per process (default: 2)")
    p.add_argument("--batch", type=at_least_one, default=batch, help=f"(default: {batch})")
    p.add_argument("--reps", type=at_least_one, default=reps,
                   help=f"{reps_help} (default: {reps})")


def alternate_workers(module: str, frameworks: Sequence[str], rounds: int, worker_args: list[str],
                      env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """``python -m module --worker FW *worker_args`` in a fresh process per framework and round,
    the frameworks alternating (no OpenMP runtime shares a process with another's, and drift in
    the machine's speed falls on all alike); yields each (framework, stdout). A failing worker
    ends the command with one line: which worker, and the last line it wrote to stderr."""
    for _ in range(rounds):
        for fw in frameworks:
            done = subprocess.run([sys.executable, "-m", module, "--worker", fw, *worker_args],
                                  capture_output=True, text=True, check=False, env=env)
            if done.returncode:
                raise SystemExit(f"error: the {fw} worker failed: "
                                 + (done.stderr.strip().splitlines() or ["no output"])[-1])
            yield fw, done.stdout


def peak_flops(precision: str, torch_device: str = "cpu") -> dict:
    """Best of a large square matmul in JAX and in torch (same threads, same kind of device),
    FLOP/s: the 100% that the models' achieved FLOP/s are expressed against."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n = 2048 if precision == "bf16" else 4096
    jdt = jnp.bfloat16 if precision == "bf16" else jnp.float32
    tdt = torch.bfloat16 if precision == "bf16" else torch.float32
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jdt)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    jt = min(timed(lambda: mm(a).block_until_ready()) for _ in range(5))
    from bench.speed.torch_runner import sync

    ta = torch.randn(n, n, dtype=tdt, device=torch_device)
    torch.mm(ta, ta)
    sync(torch_device)
    tt = min(timed(lambda: (torch.mm(ta, ta), sync(torch_device))) for _ in range(5))
    f = 2 * n ** 3
    return {"matmul_n": n, "jax_flop_s": f / jt, "torch_flop_s": f / tt,
            "peak_flop_s": max(f / jt, f / tt)}
