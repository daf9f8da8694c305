"""Where a run ran: CPU model, cores, JAX and Flax versions, devices and date, recorded with its
results so that an accuracy or a time can be traced to its machine."""

from __future__ import annotations

import os
import platform
import time


def cpu_name() -> str:
    """The CPU model with its family, model number and widest vector ISA (AVX-512 or AVX2),
    which decide the speed of CPU kernels."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
    except (OSError, ValueError):
        return cpu
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "")
    return (f"{info.get('model name', cpu)} (family {info.get('cpu family')} model "
            f"{info.get('model')}{', ' + isa if isa else ''})")


def host() -> dict:
    """This machine as results files record it."""
    import flax  # when called: bench.speed imports its callers before it needs JAX
    import jax

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
            "flax": flax.__version__, "python": platform.python_version(),
            "devices": [str(d) for d in jax.devices()],
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def same_machine(a: dict, b: dict) -> bool:
    """Whether two records are one machine and software (their dates aside)."""
    return {k: v for k, v in a.items() if k != "date_utc"} == \
        {k: v for k, v in b.items() if k != "date_utc"}
