"""``python -m parity.report [--arch resnet20,resnet18] [--checks eval,grads] [--full]``: the
parity table.

Rows are architectures (every registered one and its variants, then the tiny trajectory nets),
columns the checks of :mod:`parity.checks`. Each cell is the worst relative error of flaxres
against PyTorch float64 with flaxres in float64 (the "same function" proof) and in fp32; where
fp32 exceeds the tolerance, PyTorch fp32's own error against float64 follows in brackets (fp32
passes within FLOOR_FACTOR of it), and "(kinks)" says the fp32 gradients were measured against
PyTorch float64 on flaxres fp32's side of every ReLU kink (see ``Case.check_grads``). A ``✗``
marks a failure, ``~`` an fp32 check that chaos makes moot (PyTorch fp32 itself beyond
``CHAOS_LIMIT``); below the table each failure names the tensor where it is worst. Trajectories
run for the tiny nets, and with ``--full`` for every architecture. Exits 1 if anything failed.
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
from parity.cases import BY_ID, CHAOS_LIMIT, PRECISIONS, TOL, TRAJ_TINY
from parity.checks import Case
from parity.measure import FLOOR_FACTOR, Measure
from parity.schedules import check_schedules
from train.config import add_flags

CHECKS = ("eval", "train", "features", "grads", "optim", "trajectory", "checkpoint")
_COLUMNS = ("eval", "train", "features", "grads", "optim", "traj_loss", "traj_state", "checkpoint")


def _cell(fp64: Measure | None, fp32: Measure | None) -> str:
    if fp64 is None and fp32 is None:
        return "-"
    s = (f"{fp64.error:.0e}" if fp64 else "–") + " · " + (f"{fp32.error:.1e}" if fp32 else "–")
    if fp32 and fp32.error > fp32.tol:
        s += f" [{fp32.floor:.1e}]" if fp32.floor else ""
        s += " (kinks)" if "ReLU kink" in fp32.note else ""
    if any(m.chaotic for m in (fp64, fp32) if m):
        return s + " ~"
    return s + ("" if all(m.ok for m in (fp64, fp32) if m) else " ✗")


def run_case(case: Case, checks: list[str], trajectory: bool) -> list[Measure]:
    out = []
    for c in checks:
        if c in ("optim",):
            out.append(case.check_optim())
        elif c == "checkpoint":
            out.append(case.check_checkpoint())
        elif c == "trajectory":
            out += [m for p in PRECISIONS for m in case.check_trajectory(p)] if trajectory else []
        else:
            out += [getattr(case, f"check_{c}")(p) for p in PRECISIONS]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.report",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--arch", default=None, help="comma-separated case ids (default: all)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    add_flags(p, ["cpu_conv"])
    p.add_argument("--full", action="store_true",
                   help="trajectories for every architecture too (as pytest --full)")
    args = p.parse_args(argv)
    try:
        args.cpu_conv = onednn.resolve_conv(args.cpu_conv)
    except ValueError as e:
        p.error(str(e))
    tiny = {a.id: a for a in TRAJ_TINY}
    every = {**BY_ID, **tiny}
    ids = list(every) if args.arch is None else args.arch.split(",")
    unknown = [i for i in ids if i not in every]
    if unknown:
        p.error(f"--arch: no such case {', '.join(unknown)}; choose from {', '.join(every)}")
    checks = args.checks.split(",")
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        p.error(f"--checks: unknown {', '.join(bad)}; choose from {','.join(CHECKS)}")
    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), jax {jax.__version__}, CPU convolutions "
          f"{args.cpu_conv}. Cells: worst relative error "
          f"||flaxres - torch|| / ||torch|| per tensor against PyTorch float64, flaxres float64 · "
          f"flaxres fp32 [PyTorch fp32's own error, where fp32 exceeds the tolerance; fp32 passes "
          f"within {FLOOR_FACTOR:g}x of it]; (kinks): fp32 gradients against PyTorch float64 on "
          f"flaxres fp32's side of every ReLU kink. Tolerances: "
          + ", ".join(f"{c} {TOL[c]:.0e}" for c in _COLUMNS) + "\n")
    print("| architecture | input | " + " | ".join(_COLUMNS) + " | time |")
    print("|---" * (len(_COLUMNS) + 3) + "|")
    failures, notes, chaotic = [], [], []
    for cid in ids:
        t = time.perf_counter()
        case = Case(every[cid], cpu_ops=flaxres.CpuOps(conv=args.cpu_conv))
        todo = ["trajectory"] if cid in tiny else checks
        measures = {(m.check, m.precision): m
                    for m in run_case(case, [c for c in todo if c in checks],
                                      trajectory=args.full or cid in tiny)}
        failures += [(case.id, m) for m in measures.values() if not (m.ok or m.chaotic)]
        chaotic += [(case.id, m) for m in measures.values() if m.chaotic]
        notes += [(case.id, m) for m in measures.values() if m.ok and m.note]
        print(f"| {case.id} | {case.batch}x{case.hw}x{case.hw} | "
              + " | ".join(_cell(measures.get((c, "fp64")), measures.get((c, "fp32")))
                           for c in _COLUMNS)
              + f" | {time.perf_counter() - t:.0f}s |", flush=True)
        del case
    schedules = check_schedules()
    failures += [("schedules", m) for m in schedules if not m.ok]
    print(f"\nSchedules vs PyTorch's schedulers, every iteration ({len(schedules)} schedules): "
          f"worst {max(schedules, key=lambda m: m.error)}")
    for cid, m in notes:
        print(f"note {cid}: {m}")
    for cid, m in chaotic:
        print(f"chaotic (~) {cid}: {m}; PyTorch fp32 is itself beyond {CHAOS_LIMIT:.0e}")
    for cid, m in failures:
        print(f"FAIL {cid}: {m}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
