"""Data parallelism over every device of every process: one 1-D mesh, parameters replicated,
the batch sharded on axis 'data'.

Host arrays become global ``jax.Array``s through ``jax.make_array_from_process_local_data``, so
the same code runs in one process or in many (``jax.device_put`` cannot place data on another
process's devices). Every process holds the whole (small) dataset, replicated on its devices;
a step gathers the global batch by index on device and each device keeps its shard, so no
process ever feeds another's rows and no image crosses the host-device boundary per step.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from train import steps


def make_mesh() -> Mesh:
    """All devices of all processes (``steps.make_mesh``), in ``jax.devices()`` order."""
    return steps.make_mesh()


def replicated(mesh: Mesh) -> NamedSharding:
    return steps.replicated(mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree of host (or single-device) arrays -> global arrays replicated on every device.

    Each process passes its own identical copy; nothing is sent between processes.
    """
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def is_main_process() -> bool:
    """Process 0 alone writes logs, plots and the progress bar."""
    return jax.process_index() == 0
