"""The MMDiT's building blocks as they were before the optimisations benchmarks/run.py led to, so that
"before" and "after" are measured side by side in the same interleaved rounds (docs/PERFORMANCE.md).

`model_code(...)` swaps them into `ng_jax.models.nets.layers` / `ng_jax.models.nets.mmdit` while a step is traced;
parameters are identical, so the same weights run through both.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp


def legacy_attention(q, k, v, key_mask=None, implementation="reference"):
    """`ng_jax.models.nets.layers.attention` as it was before this benchmark's optimisation: einsums on the
    [B, L, H, D] layout and the scale applied to the [B, H, Lq, Lk] logits (the reference path only)."""
    del implementation
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


@contextlib.contextmanager
def model_code(flax_dense: bool = False, old_attention: bool = False):
    """Trace the MMDiT with earlier building blocks (same parameters): flax's `nn.Dense` in place of
    `ng_jax.models.nets.layers.Dense`, `legacy_attention` in place of `layers.attention`. The "before" of
    the optimisations, measured side by side with the "after" in the same rounds."""
    import flax.linen as nn

    from ng_jax.models.nets import layers, mmdit

    swaps = ([(m, "Dense", nn.Dense) for m in (layers, mmdit)] if flax_dense else []) + (
        [(mmdit, "attention", legacy_attention)] if old_attention else [])
    saved = [(m, name, getattr(m, name)) for m, name, _ in swaps]
    for m, name, new in swaps:
        setattr(m, name, new)
    try:
        yield
    finally:
        for m, name, old in saved:
            setattr(m, name, old)


# (key, model_code kwargs): the NFT step with earlier model code, timed in the same rounds.
BEFORE = (("jax_base_at_head", dict(flax_dense=True, old_attention=True)),   # nn.Dense, [B,L,H,D] attention
          ("jax_base_dense_only", dict(old_attention=True)))                  # layers.Dense, [B,L,H,D] attention


def optimisations(nft: dict) -> dict:
    """Speedups of the model-code optimisations from the NFT rounds (empty if not measured)."""
    if BEFORE[0][0] not in nft:
        return {}

    def one(before, after):
        b, a = nft[before], nft[after]
        return {"before": b, "after": a, "speedup": b["median_ms"] / a["median_ms"],
                "speedup_min": b["min_ms"] / a["min_ms"]}
    return {"dense_2d_matmul": one("jax_base_at_head", "jax_base_dense_only"),
            "attention_bhld": one("jax_base_dense_only", "jax_base"),
            "total": one("jax_base_at_head", "jax_base")}
