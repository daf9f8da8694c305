"""The trainers' checkpoint writer saves in the background: ``save`` returns while Orbax still
writes, training goes on meanwhile, and ``wait`` returns once the checkpoint is complete."""

import threading

import numpy as np
import orbax.checkpoint as ocp

from flaxres import checkpoint


def test_a_save_returns_before_the_checkpoint_is_written(tmp_path, monkeypatch):
    release = threading.Event()
    finalize = ocp.CheckpointManager._finalize

    def held_finalize(self, *args, **kwargs):  # the background write's last act: the rename
        release.wait(timeout=60)
        return finalize(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize", held_finalize)
    writer = checkpoint.Writer()
    tree = {"w": np.arange(1000, dtype=np.float32)}
    writer.save(tmp_path / "last", 5, tree, {"epoch": 1})
    tree["w"] += 1  # the next steps change the state: the save holds its own copy
    assert checkpoint.newest_step(tmp_path / "last") is None  # still being written
    release.set()
    writer.close()
    assert checkpoint.newest_step(tmp_path / "last") == 5
    restored = checkpoint.restore_state(tmp_path / "last", 5, {"w": np.zeros(1000, np.float32)})
    np.testing.assert_array_equal(restored["w"], np.arange(1000, dtype=np.float32))
    assert checkpoint.restore_meta(tmp_path / "last", 5) == {"epoch": 1}
