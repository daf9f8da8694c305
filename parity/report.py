"""``python -m parity.report [--arch resnet20,resnet18] [--checks eval,grads]``: the parity table.

Rows are architectures, columns the checks of :mod:`parity.checks` with the measured worst
relative error (a ``✗`` marks a failure); below the table each failure names the tensor or layer
where it is worst. Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import torch

from parity.checks import CASES, CHECKS, TOL, Case, Measure, case_id, check_schedules, run_case

_COLUMNS = ("eval", "train", "features", "grads", "optim", "traj_loss", "traj_state", "checkpoint")


def _cell(m: Measure | None) -> str:
    if m is None:
        return "-"
    return f"{m.error:.1e}" + ("" if m.ok else " ✗")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="comma-separated case ids (default: all)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    args = p.parse_args(argv)
    cases = CASES if args.arch is None else [c for c in CASES if case_id(*c) in args.arch.split(",")]
    if args.arch and not cases:
        p.error(f"no such case; choose from {', '.join(case_id(*c) for c in CASES)}")
    checks = args.checks.split(",")
    print(f"fp32 CPU, {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}; worst relative error "
          f"||flaxres - torch|| / ||torch|| per tensor; tolerances: "
          + ", ".join(f"{c} {TOL[c]:.0e}" for c in _COLUMNS) + "\n")
    print("| architecture | input | " + " | ".join(_COLUMNS) + " | time |")
    print("|---" * (len(_COLUMNS) + 3) + "|")
    failures = []
    for name, overrides in cases:
        t = time.perf_counter()
        case = Case(name, overrides)
        measures = {m.check: m for m in run_case(case, checks)}
        failures += [(case.id, m) for m in measures.values() if not m.ok]
        print(f"| {case.id} | {case.batch}x{case.hw}x{case.hw} | "
              + " | ".join(_cell(measures.get(c)) for c in _COLUMNS)
              + f" | {time.perf_counter() - t:.0f}s |", flush=True)
        del case
    sched = check_schedules()[0]
    failures += [("schedules", sched)] if not sched.ok else []
    print(f"\nSchedules vs MultiStepLR / ConstantLR warm-up, every iteration of 64k: {sched}")
    for cid, m in failures:
        print(f"FAIL {cid}: {m}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
