"""CPU process settings shared by both frameworks: threads (before jax is imported) and malloc
(before the first computation)."""

from __future__ import annotations

import argparse
import os


def set_threads(n: int) -> None:
    """``n`` threads for XLA:CPU, torch's OpenMP/MKL pools, and core pinning below the core count
    (XLA:CPU sizes its pool by the cores it may use, so pinning is how it gets ``n``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=true"
    os.environ["XLA_FLAGS"] = flags.strip()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


def add_malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                   help="retain: glibc keeps freed memory for reuse in every framework's process "
                        "(flaxres.cpu.malloc; XLA:CPU otherwise page-faults each step's buffer "
                        "in anew); glibc: its defaults, for before/after comparisons")


def set_malloc(choice: str) -> str:
    """Applies ``--malloc``; what took effect, for the results."""
    from flaxres.cpu.malloc import retain_freed_memory  # imports jax: after set_threads

    if choice == "retain" and not retain_freed_memory():
        return "glibc (no mallopt here)"
    return choice
