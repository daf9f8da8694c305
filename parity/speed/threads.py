"""CPU thread settings shared by both frameworks; they must be set before jax is imported."""

from __future__ import annotations

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
