"""Test tiers: the default ``pytest`` is the quick change-test loop; ``pytest --full`` adds the
tests marked ``full`` (the whole parity matrix, long studies), which CI runs as well.
``--cpu-conv onednn`` runs the parity suite with oneDNN's CPU convolutions (docs/onednn.md)."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked 'full' (whole parity matrix; CI runs them)")
    parser.addoption("--cpu-conv", choices=("xla", "onednn"), default="xla",
                     help="CPU convolutions of the parity suite's flaxres models (CpuOps.conv)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full: runs only with --full (whole matrix, long runs)")
    if config.getoption("--cpu-conv") == "onednn":
        from flaxres.cpu import onednn

        if reason := onednn.unavailable_reason():
            raise pytest.UsageError(f"--cpu-conv onednn: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full tier: run with pytest --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)
