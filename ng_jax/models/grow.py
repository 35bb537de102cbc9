"""Function-preserving depth growth of a trained toy model (warm start for a deeper pretraining run).

`grow_params(trained, fresh, ...)` maps the parameters of a trained text encoder + MMDiT onto the
parameter tree of a deeper one (`fresh`, a fresh initialisation of the deeper model) so that the deeper
model computes exactly what the trained one did:

- MMDiT: trained blocks 0..d-2 keep their places, the trained last block (context-pre-only, as in SD3)
  becomes the new last block, and the new blocks in between keep their fresh initialisation. Their
  adaLN-Zero modulations start at zero, so every gate is zero and each new block is the identity on both
  the image and the text stream until training moves it.
- Text encoder: new pre-LN layers are appended with their attention output projection and second MLP
  layer set to zero, so each is the identity on the residual stream.

Everything else (embedders, final norms and projections) is copied. Width, heads, patch size and the
other shapes must already agree; only depths may grow.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.errors import UserError
from ng_jax.models.nets.mmdit import block_name


class GrowError(UserError, ValueError):
    pass


def _copy_checked(dst: Any, src: Any, where: str) -> Any:
    shapes_dst = jax.tree.map(np.shape, dst)
    shapes_src = jax.tree.map(np.shape, src)
    if shapes_dst != shapes_src:
        raise GrowError(f"{where}: trained parameters {shapes_src} do not fit the grown model's {shapes_dst}; "
                        "only depths may differ")
    return src


def _zero_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def grow_velocity(trained: dict, fresh: dict, old_depth: int, new_depth: int) -> dict:
    """MMDiT parameters of depth `old_depth` -> depth `new_depth` (unscanned blocks)."""
    if new_depth < old_depth:
        raise GrowError(f"model.depth {new_depth} is shallower than the trained model's {old_depth}")
    out = {}
    moved = {block_name(old_depth - 1, old_depth): block_name(new_depth - 1, new_depth)}
    for name, sub in trained.items():
        target = moved.get(name, name)
        if target not in fresh:
            raise GrowError(f"trained MMDiT parameter {name!r} has no place in the grown model "
                            "(scanned blocks cannot be grown)")
        out[target] = _copy_checked(fresh[target], sub, f"MMDiT {name}")
    for name, sub in fresh.items():
        if name not in out:
            if "linear" not in sub.get("norm1", {}):
                raise GrowError(f"new MMDiT block {name!r} has no adaLN-Zero modulation to start it at identity")
            # zero gates (and shifts/scales): the block is the identity
            out[name] = {k: _zero_like(v) if k in ("norm1", "norm1_context") else v for k, v in sub.items()}
    return out


def grow_text(trained: dict, fresh: dict, old_depth: int, new_depth: int) -> dict:
    """Toy text-encoder parameters of depth `old_depth` -> depth `new_depth`."""
    if new_depth < old_depth:
        raise GrowError(f"text.depth {new_depth} is shallower than the trained encoder's {old_depth}")
    out = {}
    for name, sub in trained.items():
        if name not in fresh:
            raise GrowError(f"trained text-encoder parameter {name!r} has no place in the grown encoder")
        out[name] = _copy_checked(fresh[name], sub, f"text {name}")
    for i in range(old_depth, new_depth):
        layer = fresh[f"layers_{i}"]
        out[f"layers_{i}"] = dict(layer, self_attn=dict(layer["self_attn"], out_proj=_zero_like(layer["self_attn"]["out_proj"])),
                                  mlp=dict(layer["mlp"], fc2=_zero_like(layer["mlp"]["fc2"])))
    return out


def grow_params(trained: dict, fresh: dict, old_cfg: tuple[int, int], new_cfg: tuple[int, int]) -> dict:
    """{"text", "velocity"} of a trained model with (text depth, MMDiT depth) `old_cfg` onto `fresh`,
    a fresh initialisation with depths `new_cfg`; the result computes what `trained` does."""
    return {"text": grow_text(trained["text"], fresh["text"], old_cfg[0], new_cfg[0]),
            "velocity": grow_velocity(trained["velocity"], fresh["velocity"], old_cfg[1], new_cfg[1])}
