"""One :class:`parity.checks.Case` per architecture, shared by every parity test file.

The fixture is session-scoped and parametrised, so pytest runs all checks of one architecture
together and drops its models before building the next (the largest nets hold ~1 GB).
"""

import pytest
import torch

import flaxres
from parity.checks import CASES, Case, case_id

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cpu_ops(request) -> flaxres.CpuOps:
    """flaxres's CPU paths for every case: ``pytest --cpu-conv onednn`` for oneDNN convolutions."""
    return flaxres.CpuOps(conv=request.config.getoption("--cpu-conv"))


@pytest.fixture(scope="session", params=CASES, ids=[case_id(n, o) for n, o in CASES])
def case(request, cpu_ops) -> Case:
    name, overrides = request.param
    return Case(name, overrides, cpu_ops=cpu_ops)


def assert_measures(measures) -> None:
    bad = [str(m) for m in measures if not m.ok]
    assert not bad, "\n".join(bad)
