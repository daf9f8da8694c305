"""Parametrisation shared by the parity tests, and which of them run in the default tier.

A test taking ``case`` runs once per architecture of :data:`parity.cases.CASES`; with
``precision`` too, once per (architecture, fp32/fp64). The ``case`` fixture is session-scoped,
so pytest runs all checks of one architecture together and drops its models before building the
next (the largest nets hold ~1 GB); under pytest-xdist (``-n``) all tests of one architecture go
to one worker (``xdist_group``); ``--cases representative`` leaves out the cases outside
``REPRESENTATIVE``. Marked ``full`` (``pytest --full``): float64 outside
``REPRESENTATIVE``, and every test marked ``representative`` outside ``REPRESENTATIVE``.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator

import jax
import pytest
import torch
from _pytest.nodes import Node

import flaxres
from parity.cases import CASES, FULL_ONLY, PRECISIONS, REPRESENTATIVE
from parity.checks import Case

torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "representative: a check over every case whose code "
                            "does not depend on the net: outside REPRESENTATIVE it runs with --full")
    # pytest-xdist's loadgroup (3.8) writes each test's group into Node._nodeid; pytest 9.2 keeps
    # the id elsewhere, so the groups were silently ignored and both workers built the same deep
    # nets at once (the full matrix then overran the machine's memory).
    if config.getoption("dist", "no") == "loadgroup" and not hasattr(Node, "_nodeid"):
        raise pytest.UsageError(f"pytest {pytest.__version__} and this pytest-xdist do not keep "
                                "the parity cases' xdist_group together; install the pytest "
                                "versions pyproject.toml allows")


# The nets whose full-matrix checks take the most memory (resnext101_32x8d's float64 steps
# 15.6 GB, resnet1202's 7 GB) share one worker, so that they never run at once on the 23 GB
# machine.
HEAVY = frozenset({"resnext101_32x8d", "resnet1202", "wide_resnet101_2", "resnext101_64x4d"})


def _group(cid: str) -> str:
    return "heavy" if cid in HEAVY else cid


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    params = []
    every = metafunc.config.getoption("--cases") == "all"
    for arch in (a for a in CASES if every or a.id in REPRESENTATIVE):
        for p in PRECISIONS if "precision" in metafunc.fixturenames else (None,):
            full = arch.id in FULL_ONLY or arch.id not in REPRESENTATIVE and (
                p == "fp64" or "representative" in metafunc.definition.keywords)
            values = (arch, p) if p else (arch,)
            params.append(pytest.param(*values, id=f"{arch.id}-{p}" if p else arch.id,
                                       marks=[pytest.mark.xdist_group(_group(arch.id))]
                                       + ([pytest.mark.full] if full else [])))
    names = ("case", "precision") if "precision" in metafunc.fixturenames else ("case",)
    metafunc.parametrize(names, params, indirect=["case"], scope="session")


@pytest.fixture(scope="session")
def case(request) -> Iterator[Case]:
    """Every case with the CPU convolutions and BatchNorm of ``pytest --cpu-conv``; its memory
    is given back before the next case (:func:`release_memory`)."""
    c = Case(request.param, cpu_ops=flaxres.CpuOps(conv=request.config.getoption("--cpu-conv")))
    yield c
    c.release()
    release_memory()


def release_memory() -> None:
    """Drops JAX's compiled executables and returns freed heap to the system. Kept, they
    accumulate over the cases a worker runs: in the full matrix a worker held 11.8 GB when it
    reached resnet1202 (whose own checks peak at 7 GB alone), and two such workers overran the
    machine's 23 GB. Executables of equal blocks are shared within a net, not needed across nets,
    and the compilation cache on disk makes a rebuilt one cheap."""
    jax.clear_caches()
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed arenas' pages otherwise


def assert_measures(*measures) -> None:
    bad = [str(m) for m in measures if not m.ok]
    assert not bad, "\n".join(bad)
