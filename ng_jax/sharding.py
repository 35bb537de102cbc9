"""The device mesh, one vocabulary of logical axis names, and the rule table that maps them.

Part 1, the mesh and parameter shardings by path rules:

Device mesh, parameter partition rules and shardings.

The mesh always has the three axes ("data", "fsdp", "tensor"). The batch is split over
("data", "fsdp"); parameters follow a rule table (regex on the '/'-joined parameter path -> rule),
declared as data in the config, as in big_vision:

- "replicate": every device holds the whole tensor;
- "fsdp": shard the largest dimension that the fsdp axis divides (replicate if none does);
- a tuple such as ("fsdp", None) or (None, "tensor"): an explicit PartitionSpec.

The first matching rule wins; a path that matches no rule is replicated.

Part 2, logical axis names:

Logical axis names for parameters and activations, mapped to mesh axes by ONE rule table.

Every parameter dimension gets a logical name from its path and rank (`param_axes`): a Dense kernel
[in, out] of an attention projection is ("embed", "heads"), its output projection ("heads", "embed"),
a feed-forward ("embed", "mlp") / ("mlp", "embed"), an adaLN modulation ("embed", "mod"), scanned
blocks add a leading "layers" axis, biases take the last name of their kernel, LoRA adapters the
names of the kernel they adapt (`lora_a` [in, "lora"], `lora_b` ["lora", out]), optimizer moments
those of their parameter (their path ends with the parameter's path). Activations are named where the
models call `constrain(x, ("batch", "seq", "embed"))`.

The config's rule table (`mesh.logical_rules`, flax's `logical_axis_rules` format) maps names to mesh
axes ("data", "fsdp", "tensor"):

    (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ...)

Resolution, for one tensor: rules are taken in table order; a rule applies to the first dimension of
that name not yet assigned when its mesh axes (size-1 axes dropped) are unused by this tensor and
divide the dimension. A later rule for the same name is a fallback (("mlp", "tensor") then
("mlp", "fsdp")); a dimension no rule fits stays unsharded (said in a debug log), and the
replicated-bytes check (`check_replication`, `mesh.max_replicated_fraction`) catches a
table that leaves too much replicated. The frozen reference (and the text encoders) may use their
own table, `mesh.ref_logical_rules` (levanter's separate parameter mappings: shard the reference
more heavily than the policy). `mesh.rules` (regex on the '/'-joined path -> "fsdp" / "replicate" /
spec tuple, `param_shardings`) still works as an override checked first.

Activation constraints are active only inside `with_rules(fn, mesh, rules)` (the train step and the
rollout are traced that way); everywhere else `constrain` returns its input, so unit tests and
the toy world's host-side models are unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
import threading
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


# --- logical axis names -------------------------------------------------------------------------

log = logging.getLogger(__name__)

# The default table: batch over data x fsdp, the model width over fsdp (FSDP: every weight matrix is
# split along its embed dimension), heads / MLP / modulation / vocabulary over tensor (Megatron-style
# when tensor > 1), falling back to fsdp when the embed dimension does not divide. Unlisted names
# ("seq", "kv", "layers", "lora", "channels") are never sharded.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"), ("mlp", "tensor"), ("mod", "tensor"), ("vocab", "tensor"),
    ("heads", "fsdp"), ("mlp", "fsdp"), ("mod", "fsdp"), ("vocab", "fsdp"),
)

_ATTN = r"(^|/)(attn2?|self_attn|SelfAttention)/"
# (regex on the full '/'-joined path, logical names of the trailing dimensions); first match wins.
# Biases and LoRA adapters without an entry take their kernel's names (`param_axes`).
PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    # attention (SD3/SD3.5/FLUX `attn`, `attn2`; CLIP `self_attn`; T5 `SelfAttention`)
    (_ATTN + r"(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|q|k|v)/kernel$",
     ("embed", "heads")),
    (_ATTN + r"(to_out_0|to_add_out|out_proj|o)/kernel$", ("heads", "embed")),
    (_ATTN + r"(norm_q|norm_k|norm_added_q|norm_added_k)/weight$", ("kv",)),
    (r"(^|/)relative_attention_bias/embedding$", (None, "heads")),
    # feed-forwards (diffusers `ff`, `ff_context`, FLUX single blocks; CLIP `mlp`; T5 `DenseReluDense`)
    (r"(^|/)single_transformer_blocks(_\d+)?/proj_out/kernel$", ("mlp", "embed")),  # [attn; mlp] -> embed
    (r"(^|/)(net_0/proj|fc1|wi|wi_0|wi_1|proj_mlp)/kernel$", ("embed", "mlp")),
    (r"(^|/)(net_2|fc2|wo)/kernel$", ("mlp", "embed")),
    # adaLN modulation: width -> k x width shifts, scales, gates
    (r"(^|/)(norm1|norm1_context|norm|norm_out)/linear/kernel$", ("embed", "mod")),
    # embedders: latent patches / text features / sinusoids ("channels") -> width, and back
    (r"(^|/)pos_embed/proj/kernel$", (None, None, "channels", "embed")),
    (r"(^|/)(x_embedder|context_embedder|linear_1)/kernel$", ("channels", "embed")),
    (r"(^|/)linear_2/kernel$", ("embed", "embed")),
    (r"(^|/)proj_out/kernel$", ("embed", "channels")),
    # text encoders (transformers' Flax CLIP / T5, the toy encoder)
    (r"(^|/)(token_embedding|shared)/embedding$", ("vocab", "embed")),
    (r"(^|/)position_embedding(/embedding)?$", (None, "embed")),
    (r"(^|/)text_projection/kernel$", ("embed", "embed")),
    (r"(^|/)(layer_norm\d?|final_layer_norm)/(scale|bias|weight)$", ("embed",)),
)
_COMPILED = [(re.compile(p), names) for p, names in PARAM_AXES]


def _match(path: str) -> tuple | None:
    for pattern, names in _COMPILED:
        if pattern.search(path):
            return names
    return None


def param_axes(path: str, ndim: int) -> tuple | None:
    """Logical names of a parameter leaf's dimensions, or None when nothing names it."""
    names = _match(path)
    head, _, leaf = path.rpartition("/")
    if names is None and leaf in ("bias", "lora_a", "lora_b"):
        kernel = _match(head + "/kernel")
        if kernel is not None:
            names = {"bias": (kernel[-1],), "lora_a": (kernel[-2], "lora"), "lora_b": ("lora", kernel[-1])}[leaf]
    if names is None or ndim == 0:
        return () if ndim == 0 else None
    if ndim == len(names) + 1:       # a scanned stack: [layers, ...]
        return ("layers",) + tuple(names)
    return tuple(names) if ndim == len(names) else None


def tree_axes(tree):
    """A pytree like `tree` of logical-name tuples (None for unnamed leaves); for inspection and tests."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_axes(path_str(p), len(x.shape)), tree)


def _check_rules(rules, mesh: Mesh) -> tuple:
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"logical rule {rule!r}: expected (logical name, mesh axis | tuple of axes | None)")
        name, target = rule
        axes = () if target is None else (tuple(target) if isinstance(target, (tuple, list)) else (target,))
        bad = [a for a in axes if a not in mesh.axis_names]
        if bad:
            raise ValueError(f"logical rule {rule!r}: unknown mesh axis {bad[0]!r} (mesh axes {mesh.axis_names})")
        out.append((name, axes))
    return tuple(out)


def logical_to_spec(names: Sequence, shape: Sequence[int], mesh: Mesh, rules, where: str = "") -> P:
    """PartitionSpec for a tensor whose dimensions have logical `names`, by the rule table (module doc)."""
    assigned: list = [None] * len(names)
    used: set = set()
    for name, axes in _check_rules(rules, mesh):
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if not axes or used & set(axes):
            continue
        size = math.prod(mesh.shape[a] for a in axes)
        for i, n in enumerate(names):
            if n != name or assigned[i] is not None:
                continue
            if shape[i] % size:
                log.debug("%s: dimension %d (%s = %d) is not divisible by mesh %s = %d; not sharded by this rule",
                          where or "tensor", i, name, shape[i], axes, size)
                continue
            assigned[i] = axes[0] if len(axes) == 1 else axes
            used.update(axes)
            break
    return P(*assigned)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a parameter tree is placed: regex `overrides` first (`param_shardings` rules), then
    the logical rule table on the names of `param_axes`; an unnamed leaf is replicated (debug log)."""

    logical_rules: tuple = LOGICAL_RULES
    overrides: tuple = ()

    def spec(self, path: str, shape: Sequence[int], mesh: Mesh) -> P:
        for pattern, rule in self.overrides:
            if re.search(pattern, path):
                return _spec_for(tuple(shape), rule, mesh)
        names = param_axes(path, len(shape))
        if names is None:
            log.debug("no logical axes for %s %s: replicated", path, tuple(shape))
            return P()
        return logical_to_spec(names, shape, mesh, self.logical_rules, where=path)

    def shardings(self, tree, mesh: Mesh):
        """A pytree of NamedShardings matching `tree` (arrays or ShapeDtypeStructs)."""
        return jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(mesh, self.spec(path_str(p), tuple(x.shape), mesh)), tree)

    def __call__(self, tree, mesh: Mesh):
        return self.shardings(tree, mesh)


def _rules(value, default) -> tuple:
    return default if value is None else tuple(tuple(r) for r in value)


def layouts(mesh_cfg) -> tuple[Layout, Layout]:
    """(policy layout, reference layout) from a config's `mesh` block; missing keys take the defaults
    (`mesh.ref_logical_rules` None = the policy's table)."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else (lambda k, d=None: d)
    overrides = tuple(tuple(r) for r in (get("rules", ()) or ()))
    policy = _rules(get("logical_rules", None), LOGICAL_RULES)
    ref = _rules(get("ref_logical_rules", None), policy)
    return Layout(policy, overrides), Layout(ref, overrides)


def as_layout(rules) -> Layout:
    """A Layout, or a legacy regex rule list (`mesh.rules` alone) turned into one."""
    return rules if isinstance(rules, Layout) else Layout(LOGICAL_RULES, tuple(tuple(r) for r in rules))


# ------------------------------------------------------------------------------------ activations

_CONTEXT = threading.local()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules=LOGICAL_RULES):
    """Within this context `constrain` places activations on `mesh` by `rules`."""
    prev = getattr(_CONTEXT, "value", None)
    _CONTEXT.value = (mesh, tuple(tuple(r) for r in rules))
    try:
        yield
    finally:
        _CONTEXT.value = prev


def with_rules(fn, mesh: Mesh, rules=LOGICAL_RULES):
    """`fn` with the activation rules active while it runs (i.e. while jit traces it)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with axis_rules(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def constrain(x, names: Sequence):
    """`jax.lax.with_sharding_constraint` of activation `x` by its logical `names`, when rules are
    active; otherwise `x` itself. The batch dimension must map to its mesh axes (else no constraint:
    an unshardable batch, e.g. a model's init input, should not move other dimensions onto them)."""
    ctx = getattr(_CONTEXT, "value", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(names, x.shape, mesh, rules, where="activation " + "/".join(map(str, names)))
    if "batch" in names and spec[list(names).index("batch")] is None:
        batch_axes = [a for n, axes in _check_rules(rules, mesh) if n == "batch" for a in axes if mesh.shape[a] > 1]
        if batch_axes:
            return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
