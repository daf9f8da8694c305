"""Test tiers: the default ``pytest`` is the quick change-test loop; ``pytest --full`` adds the
tests marked ``full`` (the whole parity matrix, long studies); CI runs those of ``tests/``.
``--cpu-conv xla|onednn`` picks the parity suite's CPU convolutions and BatchNorm (default: oneDNN
where the C++ extension is built, as ``flaxres.CpuOps()``; docs/onednn.md); ``--cases
representative`` keeps its per-net checks to one net per block kind.

Compiled XLA executables persist in pytest's cache folder (``.pytest_cache/d/xla``), shared by
the xdist workers, the runs the tests start and the next ``pytest``: most of the suite's time on
a small CPU is compiling, and an executable is reused only for an identical program (the cache
key is the program and its compile options, so a changed model or step compiles anew).
``pytest --cache-clear`` starts cold; ``JAX_COMPILATION_CACHE_DIR`` still wins.

Each xdist worker (and each process its tests start) gets an equal share of the cores as
threads for OpenMP (oneDNN, PyTorch) and, at one core, single-threaded Eigen in XLA: the tests'
inputs are tiny, and two workers with two threads each on two cores spent a quarter of the parity
tier's time handing work between oversubscribed threads (measured: docs/parity.md, Tiers)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # set by xdist before a worker loads conftests
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    if _threads == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # after the thread settings above, which XLA and OpenMP read once
import pytest

from train.config import add_flags


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked 'full' (whole parity matrix, long runs)")
    add_flags(parser, ["cpu_conv"])  # for the parity suite's flaxres models
    parser.addoption("--cases", choices=("all", "representative"), default="all",
                     help="the parity cases whose checks run: all (default) or only "
                          "parity.cases.REPRESENTATIVE's (one net per block kind), for a second "
                          "CPU path whose code does not depend on the net")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full: runs only with --full (whole matrix, long runs)")
    from flaxres.cpu import onednn

    try:
        config.option.cpu_conv = onednn.resolve_conv(config.getoption("--cpu-conv"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache or jax.config.jax_compilation_cache_dir:
        from train import cli

        cli.enable_compilation_cache(cache and cache.mkdir("xla"))


@pytest.fixture(scope="session")
def xla_env() -> dict[str, str]:
    """Environment entries giving the processes a test starts the session's compilation cache."""
    d = jax.config.jax_compilation_cache_dir
    return {"JAX_COMPILATION_CACHE_DIR": d} if d else {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full tier: run with pytest --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)
