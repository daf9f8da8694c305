"""``python -m parity.report [--arch resnet20,resnet18] [--checks eval,grads]``: the parity table.

Rows are architectures, columns the checks of :mod:`parity.checks`. Each cell is the worst
relative error of flaxres against PyTorch float64 with flaxres in float64 (the "same function"
proof) and in fp32; where fp32 exceeds the tolerance, PyTorch fp32's own error against float64
follows in brackets (fp32 passes within FLOOR_FACTOR of it), and "(kinks)" says the fp32
gradients were measured against float64 on fp32's side of every ReLU kink (see
``Case.check_grads``). A ``✗`` marks a failure; below the
table each failure names the tensor or layer where it is worst. The trajectory runs for ``parity.checks.TRAJ_CASES`` unless
``FLAXRES_PARITY_FULL=1``. Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import torch

import flaxres
from flaxres.cpu import onednn
from parity.checks import (
    CASES,
    CHECKS,
    FLOOR_FACTOR,
    TOL,
    TRAJ_CASES,
    TRAJ_FULL,
    Case,
    Measure,
    case_id,
    check_schedules,
    run_case,
)

_COLUMNS = ("eval", "train", "features", "grads", "optim", "traj_loss", "traj_state", "checkpoint")


def _cell(fp64: Measure | None, fp32: Measure | None) -> str:
    if fp64 is None and fp32 is None:
        return "-"
    s = (f"{fp64.error:.0e}" if fp64 else "–") + " · " + (f"{fp32.error:.1e}" if fp32 else "–")
    if fp32 and fp32.error > fp32.tol:
        s += f" [{fp32.floor:.1e}]" if fp32.floor else ""
        s += " (kinks)" if "ReLU kink" in fp32.note else ""
    return s + ("" if all(m.ok for m in (fp64, fp32) if m) else " ✗")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="comma-separated case ids (default: all)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--cpu-conv", choices=("xla", "onednn"), default="xla",
                   help="CPU convolutions of the flaxres models (CpuOps.conv; docs/onednn.md)")
    args = p.parse_args(argv)
    if args.cpu_conv == "onednn" and (reason := onednn.unavailable_reason()):
        p.error(f"--cpu-conv onednn: {reason}")
    cpu_ops = flaxres.CpuOps(conv=args.cpu_conv)
    cases = CASES if args.arch is None else [c for c in CASES if case_id(*c) in args.arch.split(",")]
    if args.arch and not cases:
        p.error(f"no such case; choose from {', '.join(case_id(*c) for c in CASES)}")
    checks = args.checks.split(",")
    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}, CPU convolutions "
          f"{args.cpu_conv}. Cells: worst relative error "
          f"||flaxres - torch|| / ||torch|| per tensor against PyTorch float64, flaxres float64 · "
          f"flaxres fp32 [PyTorch fp32's own error, where fp32 exceeds the tolerance; fp32 passes "
          f"within {FLOOR_FACTOR:g}x of it]; (kinks): fp32 gradients against float64 on fp32's "
          f"side of every ReLU kink. Tolerances: "
          + ", ".join(f"{c} {TOL[c]:.0e}" for c in _COLUMNS) + "\n")
    print("| architecture | input | " + " | ".join(_COLUMNS) + " | time |")
    print("|---" * (len(_COLUMNS) + 3) + "|")
    failures, notes = [], []
    for name, overrides in cases:
        t = time.perf_counter()
        case = Case(name, overrides, cpu_ops=cpu_ops)
        todo = [c for c in checks if c != "trajectory" or TRAJ_FULL or case.id in TRAJ_CASES]
        measures = {(m.check, m.precision): m for m in run_case(case, todo)}
        failures += [(case.id, m) for m in measures.values() if not m.ok]
        notes += [(case.id, m) for m in measures.values() if m.ok and m.note]
        print(f"| {case.id} | {case.batch}x{case.hw}x{case.hw} | "
              + " | ".join(_cell(measures.get((c, "fp64")), measures.get((c, "fp32")))
                           for c in _COLUMNS)
              + f" | {time.perf_counter() - t:.0f}s |", flush=True)
        del case
    sched = check_schedules()[0]
    failures += [("schedules", sched)] if not sched.ok else []
    print(f"\nSchedules vs MultiStepLR / ConstantLR warm-up, every iteration of 64k: {sched}")
    for cid, m in notes:
        print(f"note {cid}: {m}")
    for cid, m in failures:
        print(f"FAIL {cid}: {m}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
