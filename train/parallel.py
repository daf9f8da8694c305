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
from jax.sharding import Mesh

from train import steps


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree of host (or single-device) arrays -> global arrays replicated on every device.

    Each process passes its own identical copy; nothing is sent between processes.
    """
    sharding = steps.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def is_main_process() -> bool:
    """Process 0 alone writes logs, plots and the progress bar."""
    return jax.process_index() == 0


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               peer_timeout: int) -> None:
    """``jax.distributed.initialize`` (arguments ``None`` are auto-detected on SLURM, Open MPI,
    Cloud TPU and Kubernetes JobSets), with ``peer_timeout`` seconds as both the heartbeat
    timeout (a silent peer is declared dead) and the shutdown barrier's timeout (a process
    exiting does not wait longer than that for the others)."""
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=peer_timeout,
                               shutdown_timeout_seconds=peer_timeout)


def lost_peer_message(error: Exception) -> str:
    """One line for a collective that failed because another process died or hung; XLA's own
    message repeats "Error dispatching computation: " once per queued step."""
    cause = str(error).splitlines()[0].replace("Error dispatching computation: ", "")
    return (f"error: process {jax.process_index()} of {jax.process_count()}: a collective with "
            f"the other processes failed ({cause[:300]}). Another process probably died or hung: "
            "see its log, then restart every process with --resume.")
