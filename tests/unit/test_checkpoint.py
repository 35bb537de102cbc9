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
