import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import sharding
from ng_jax.checkpoint import Checkpointer, CheckpointError
from ng_jax.state import TrainState


def _state(mesh, scale=1.0, width=8):
    sh = sharding.param_shardings({"w": jnp.zeros((width, 4))}, mesh, [("w", "fsdp")])
    params = jax.device_put({"w": scale * jnp.arange(width * 4.0).reshape(width, 4)}, sh)
    return TrainState(step=jnp.array(3), params=params, ema=params, opt_state=(jnp.ones(2),),
                      rng=jax.random.key(1))


def test_round_trip_keeps_values_and_shardings(tmp_path):
    mesh = sharding.make_mesh((2, 4, 1))
    ck = Checkpointer(str(tmp_path / "ck"))
    saved = _state(mesh, 2.0)
    ck.save(5, saved, {"epoch": 5, "data": {"position": 7}})
    ck.wait()
    restored, meta, step = ck.restore(_state(mesh, 0.0))
    assert step == 5 and meta == {"epoch": 5, "data": {"position": 7}}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(saved.params["w"]))
    assert restored.params["w"].sharding.spec == saved.params["w"].sharding.spec
    assert jnp.array_equal(jax.random.key_data(restored.rng), jax.random.key_data(saved.rng))


def test_missing_mismatched_and_corrupt_checkpoints_raise(tmp_path):
    mesh = sharding.make_mesh((2, 4, 1))
    ck = Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ck.restore(_state(mesh))
    ck.save(1, _state(mesh))
    ck.wait()
    with pytest.raises(CheckpointError, match="cannot restore|shape"):
        ck.restore(_state(mesh, width=16))
    # Corrupt: truncate every data file of the saved state.
    for root, _, files in os.walk(tmp_path / "ck" / "1"):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0 and not f.endswith(".json"):
                with open(path, "r+b") as fh:
                    fh.truncate(1)
    with pytest.raises(CheckpointError):
        Checkpointer(str(tmp_path / "ck")).restore(_state(mesh))


def _corrupt(step_dir):
    """Truncate every data file of a saved step (its JSON metadata stays readable)."""
    for root, _, files in os.walk(step_dir):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 0 and not f.endswith(".json"):
                with open(path, "r+b") as fh:
                    fh.truncate(1)


def test_a_corrupt_latest_checkpoint_names_the_newest_intact_one_and_restore_step_resumes(tmp_path):
    mesh = sharding.make_mesh((2, 4, 1))
    ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=5)
    for step in (2, 4, 6):
        ck.save(step, _state(mesh, float(step)), {"epoch": step})
    ck.wait()
    _corrupt(tmp_path / "ck" / "6")
    _corrupt(tmp_path / "ck" / "4")
    ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=5)
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint step 6 .*the newest intact checkpoint is "
                                              r"step 2: resume from it with --config.ckpt.restore_step=2"):
        ck.restore(_state(mesh))
    with pytest.raises(CheckpointError, match=r"restore_step=3: no such checkpoint .*saved steps: \[2, 4, 6\]"):
        ck.restore(_state(mesh), 3)
    restored, meta, step = ck.restore(_state(mesh), 2)
    assert step == 2 and meta == {"epoch": 2}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(_state(mesh, 2.0).params["w"]))
    # the later (corrupt) steps are kept aside, not deleted, and the run saves its own from there on
    assert sorted(os.listdir(tmp_path / "ck.abandoned")) == ["4", "6"] and ck.all_steps() == [2]
    ck.save(4, _state(mesh, 40.0), {"epoch": 4})
    ck.wait()
    assert ck.restore(_state(mesh))[2] == 4


def test_a_save_interrupted_before_its_commit_leaves_the_previous_checkpoint(tmp_path):
    """Orbax writes a step into a temporary directory and renames it when complete: a process killed during
    an (asynchronous) save leaves that temporary directory, which is not a checkpoint."""
    mesh = sharding.make_mesh((2, 4, 1))
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, _state(mesh, 1.0), {"epoch": 1})
    ck.wait()
    ck.save(2, _state(mesh, 2.0), {"epoch": 2})
    ck.wait()
    # what a kill mid-save leaves: step 2's files under an uncommitted temporary name
    os.replace(tmp_path / "ck" / "2", tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234567")
    ck = Checkpointer(str(tmp_path / "ck"))
    assert ck.resume_step() == 1
    restored, meta, step = ck.restore(_state(mesh))
    assert step == 1 and meta == {"epoch": 1}
