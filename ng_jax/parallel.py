"""Device mesh, parameter partition rules and shardings.

The mesh always has the three axes ("data", "fsdp", "tensor"). The batch is split over
("data", "fsdp"); parameters follow a rule table (regex on the '/'-joined parameter path -> rule),
declared as data in the config, as in big_vision:

- "replicate": every device holds the whole tensor;
- "fsdp": shard the largest dimension that the fsdp axis divides (replicate if none does);
- a tuple such as ("fsdp", None) or (None, "tensor"): an explicit PartitionSpec.

The first matching rule wins; a path that matches no rule is replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill one -1 entry so that the product equals `num_devices`; validate the rest."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, {num_devices} available")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A GSPMD-style (Auto axes) mesh over ("data", "fsdp", "tensor")."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def path_str(path) -> str:
    """'/'-joined names of a pytree key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _spec_for(shape: tuple[int, ...], rule: Any, mesh: Mesh) -> P:
    if rule == "replicate" or len(shape) == 0:
        return P()
    if rule == "fsdp":
        n = mesh.shape["fsdp"]
        if n == 1:
            return P()
        for dim in np.argsort(shape)[::-1]:
            if shape[dim] % n == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
        return P()
    rule = tuple(rule)
    if len(rule) != len(shape):
        raise ValueError(f"partition rule {rule} has {len(rule)} entries for a tensor of shape {shape}")
    for dim, axis in zip(shape, rule):
        if axis is not None:
            axes = axis if isinstance(axis, tuple) else (axis,)
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                raise ValueError(f"partition rule {rule}: dimension {dim} not divisible by mesh {axes}={size}")
    return P(*rule)


def param_shardings(params, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """A pytree of NamedShardings matching `params` (arrays or ShapeDtypeStructs)."""
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def one(path, leaf):
        name = path_str(path)
        for pattern, rule in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec_for(tuple(leaf.shape), rule, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, params)


def replicated_fraction(params, shardings) -> float:
    """Fraction of parameter bytes that every device holds in full (on a mesh of >1 device)."""
    total = replicated_bytes = 0
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if all(a is None for a in sharding.spec):
            replicated_bytes += nbytes
    return replicated_bytes / max(total, 1)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host, sharded) jax array as a full numpy array on this host.

    Arrays spanning devices of other processes are gathered with `process_allgather` (a collective:
    every process must call it with the same array); local or replicated ones are just fetched."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a collective: all processes must call it at the
    same point, e.g. the step boundary). Used so that SIGTERM on one host checkpoints all of them."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.any(flags))


def check_replication(params, shardings, max_fraction: float, what: str = "parameters") -> float:
    """The replicated fraction of `params` bytes; ValueError when it exceeds `max_fraction` on a mesh that
    could shard (a rule table that forgot the big tensors would otherwise silently copy them to every
    device)."""
    frac = replicated_fraction(params, shardings)
    leaves = jax.tree.leaves(shardings)
    mesh = leaves[0].mesh if leaves else None
    shardable = mesh is not None and (mesh.shape.get("fsdp", 1) > 1 or mesh.shape.get("tensor", 1) > 1)
    if shardable and frac > max_fraction:
        raise ValueError(f"{100 * frac:.1f}% of the {what}' bytes are replicated on every device (limit "
                         f"mesh.max_replicated_fraction={max_fraction}); add partition rules for them")
    return frac


def tree_to_host(tree):
    return jax.tree.map(to_host, tree)


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (pytree of numpy arrays, identical on every process) on the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
