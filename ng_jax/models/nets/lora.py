"""Low-rank adapters on Dense kernels (also scanned stacks [layers, in, out]), as pure pytree functions.

With LoRA the frozen base parameters are the reference model and the policy is only the adapter
tree: `lora_init` returns a nested dict mirroring the base, holding `{"lora_a": [in, r],
"lora_b": [r, out]}` where the base holds a targeted `kernel`; `lora_merge` gives the policy's
full parameters `kernel + (alpha / rank) * a @ b`. `lora_b` starts at zero, so policy == reference
at step 0 exactly.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp


def _targets(base, patterns: Sequence[str]) -> list[tuple[str, ...]]:
    """Paths (as key tuples, without the trailing 'kernel') of 2-D kernels whose path matches a pattern."""
    regexes = [re.compile(p) for p in patterns]
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if keys[-1] != "kernel" or jnp.ndim(leaf) not in (2, 3):  # 3: a scanned stack [layers, in, out]
            continue
        name = "/".join(keys[:-1])
        if any(r.search(name) for r in regexes):
            found.append(keys[:-1])
    return found


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def lora_init(base, rng, *, rank: int, alpha: float, targets: Sequence[str]) -> dict:
    """Adapters for every targeted Dense kernel; raises if the patterns match nothing."""
    del alpha  # the scale is applied in lora_merge
    paths = _targets(base, targets)
    if not paths:
        raise ValueError(f"lora.targets {tuple(targets)} match no Dense kernel of the model")
    adapters: dict = {}
    for i, keys in enumerate(paths):
        kernel = _get(base, keys + ("kernel",))
        *lead, d_in, d_out = kernel.shape  # lead: the layer axis of scanned blocks (one adapter per layer)
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, d_in, rank), jnp.float32) / jnp.sqrt(d_in)
        _set(adapters, keys, {"lora_a": a, "lora_b": jnp.zeros((*lead, rank, d_out), jnp.float32)})
    return adapters


def lora_merge(base, adapters, *, alpha: float, rank: int):
    """The policy's full parameters: base with `kernel + (alpha / rank) * lora_a @ lora_b` where adapted."""
    scale = alpha / rank

    def merge(b, a):
        if isinstance(a, dict) and "lora_a" in a:
            out = dict(b)
            out["kernel"] = b["kernel"] + scale * (a["lora_a"] @ a["lora_b"]).astype(b["kernel"].dtype)
            return out
        out = dict(b)
        for k, sub in a.items():
            if k not in b:
                raise KeyError(f"LoRA adapter {k!r} has no counterpart in the base parameters")
            out[k] = merge(b[k], sub)
        return out

    return merge(base, adapters)
