import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import sharding


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)


def test_param_rules_and_replicated_fraction():
    mesh = sharding.make_mesh((2, 4, 1))
    params = {"block": {"kernel": jnp.zeros((16, 12)), "bias": jnp.zeros((12,))},
              "odd": {"kernel": jnp.zeros((3, 5))}, "head": {"kernel": jnp.zeros((8, 8))}}
    rules = [("head/kernel", (None, "fsdp")), ("kernel", "fsdp"), ("bias", "replicate")]
    sh = sharding.param_shardings(params, mesh, rules)
    assert sh["block"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)  # largest divisible dim
    assert sh["block"]["bias"].spec == jax.sharding.PartitionSpec()
    assert sh["odd"]["kernel"].spec == jax.sharding.PartitionSpec()  # nothing divisible by 4: replicated
    assert sh["head"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    frac = sharding.replicated_fraction(params, sh)
    assert frac == pytest.approx((12 + 15) / (16 * 12 + 12 + 15 + 64))
    with pytest.raises(ValueError, match="not divisible"):
        sharding.param_shardings({"k": jnp.zeros((3, 3))}, mesh, [("k", ("fsdp", None))])


def test_shard_batch_splits_leading_axis():
    mesh = sharding.make_mesh((2, 4, 1))
    x = sharding.shard_batch({"a": np.arange(16.0).reshape(16, 1)}, mesh)["a"]
    assert len(x.addressable_shards) == 8
    assert {s.data.shape for s in x.addressable_shards} == {(2, 1)}
    np.testing.assert_array_equal(np.asarray(x), np.arange(16.0).reshape(16, 1))


def test_check_replication_fails_when_big_tensors_are_replicated():
    mesh = sharding.make_mesh((1, 8, 1))
    params = {"big": jnp.zeros((64, 32)), "bias": jnp.zeros((3,))}
    sharded = sharding.param_shardings(params, mesh, [(".*", "fsdp")])
    frac = sharding.check_replication(params, sharded, max_fraction=0.05)
    assert frac == pytest.approx(3 / (64 * 32 + 3))  # only the bias (3 is not divisible by 8)
    replicated = sharding.param_shardings(params, mesh, [("bias", "fsdp"), (".*", "replicate")])
    with pytest.raises(ValueError, match="replicated on every device"):
        sharding.check_replication(params, replicated, max_fraction=0.05)
    # On a pure data-parallel mesh replication is the design: no error.
    dp = sharding.make_mesh((8, 1, 1))
    assert sharding.check_replication(params, sharding.param_shardings(params, dp, [(".*", "fsdp")]), 0.05) == 1.0
    assert sharding.any_process(True) and not sharding.any_process(False)
