"""The training checkpoint format: ``<workdir>/checkpoints/{last,best}/<step>/{state,meta}``.

The library owns it, so that :mod:`flaxres.weights` reads a workdir without knowing any trainer,
and the trainers write it through :func:`save`. ``state`` is an Orbax tree ``{"state": TrainState,
"metrics": ...}`` whose ``TrainState`` holds ``params`` and ``batch_stats`` (plus optimizer
state and the partial-epoch metric sums, so a run stopped mid-epoch resumes with identical epoch
metrics); ``meta`` is JSON: epoch, config, history, best accuracy, class names, machines. Orbax
writes into a temporary folder and renames it when complete, so a run killed while saving leaves
the previous checkpoint intact. A trainer saves through a :class:`Writer`, which writes in the
background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
KINDS = ("best", "last")  # which kind a workdir means: the best checkpoint, else the last
ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


def _manager(directory: Path, background: bool = False) -> ocp.CheckpointManager:
    # The processes' barriers are named by step: the folder's name keeps the best and last
    # checkpoints of one step, written at once, apart.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=background,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name))
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=ITEMS)


def _save(mngr: ocp.CheckpointManager, step: int, tree: Any, meta: dict) -> None:
    """Saves ``step`` unless it is already saved (a Ctrl-C right after an epoch's save)."""
    if step not in mngr.all_steps():
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                meta=ocp.args.JsonSave(meta)), force=True)


def save(directory: Path, step: int, tree: Any, meta: dict) -> None:
    """Saves ``step`` and returns when it is on disk."""
    with _manager(directory) as mngr:
        _save(mngr, step, tree, meta)
        mngr.wait_until_finished()


class Writer:
    """Saves in the background, so that a save does not stall training: :meth:`save` returns
    once the arrays are copied off the devices, and Orbax writes them while the next steps run
    (one save per folder at a time: the next save there waits for the one before). :meth:`wait`
    returns when every save is on disk; a trainer calls it before it exits."""

    def __init__(self):
        self._managers: dict[Path, ocp.CheckpointManager] = {}

    def save(self, directory: Path, step: int, tree: Any, meta: dict) -> None:
        if directory not in self._managers:
            self._managers[directory] = _manager(directory, background=True)
        _save(self._managers[directory], step, tree, meta)

    def wait(self) -> None:
        for mngr in self._managers.values():
            mngr.wait_until_finished()

    def close(self) -> None:
        """Waits, then releases the managers."""
        for mngr in self._managers.values():
            mngr.close()
        self._managers.clear()


def newest_step(directory: Path) -> int | None:
    """The highest numbered step folder in ``directory`` (Orbax's CheckpointManager layout)."""
    if not directory.is_dir():
        return None
    steps = [int(d.name) for d in directory.iterdir() if d.is_dir() and d.name.isdigit()]
    return max(steps) if steps else None


def find_step(path: Path) -> tuple[Path, int] | None:
    """(manager folder, newest step) under a workdir, its ``checkpoints/`` folder (meaning the
    best checkpoint, else the last: a finished run may keep only ``last``) or
    ``checkpoints/{best,last}``; ``None`` when there is none."""
    for kind in KINDS:
        for cand in (path / CHECKPOINTS / kind, path / kind):
            if (step := newest_step(cand)) is not None:
                return cand, step
    if (step := newest_step(path)) is not None:
        return path, step
    return None


def model_trees(tree: dict) -> list:
    """The parts of a restored ``state`` tree that hold the model: parameters and BatchNorm
    statistics of a training checkpoint, or the whole tree of a plain ``nnx.state`` save."""
    if "state" in tree and "params" in tree["state"]:
        return [tree["state"]["params"], tree["state"]["batch_stats"]]
    return [tree]


def resolve(path: str | Path) -> tuple[Path, int]:
    """A workdir, its ``checkpoints/`` folder, ``checkpoints/{best,last}`` or one step folder
    -> (manager folder, step). A workdir or ``checkpoints/`` means the best checkpoint (the
    last where there is no best)."""
    p = Path(path).expanduser()
    if found := find_step(p):
        return found
    if p.is_dir() and p.name.isdigit() and (p / "meta").exists():
        return p.parent, int(p.name)
    raise CheckpointError(f"no checkpoint found at {p} (expected a workdir, its checkpoints/ "
                          "folder, checkpoints/best or checkpoints/last, or a step folder in one)")


def restore_meta(directory: Path, step: int) -> dict:
    try:
        with _manager(directory) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many kinds (missing files, JSON, tensorstore)
        raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable: its metadata "
                              f"could not be loaded ({type(e).__name__}: {e}). Delete it or point "
                              "at another checkpoint.") from e


def restore_state(directory: Path, step: int, target: Any) -> Any:
    """Restores the tree saved at ``step`` with ``target``'s structure, shapes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with _manager(directory) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
        raise CheckpointError(f"checkpoint {directory / str(step)} is unreadable or does not fit "
                              f"this model ({type(e).__name__}: {e}). Delete it or point at "
                              "another checkpoint.") from e
