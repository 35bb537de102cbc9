"""The one velocity-model contract every family implements.

    model = make_velocity_model(cfg)
    params = model.init(rng)                       # a plain parameter pytree
    v = model.apply(params, x_t, sigma, cond)      # x_t [B, *sample_shape], sigma [B] in [0, 1]

`cond` is a `TextCond` (per-token embeddings, pooled embedding, mask). Policy, old/EMA and
reference are separate parameter pytrees used with the same `apply`; nothing here knows about
training. Families: "toy_mmdit" (the shapes world, pixel space), later the SD3/SD3.5 and FLUX ports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ng_jax.models.text import TextCond

FAMILIES = ("toy_mmdit",)


@dataclasses.dataclass(frozen=True)
class VelocityModel:
    module: Any
    sample_shape: tuple[int, ...]   # one sample, without batch (NHWC for images/latents)
    context_shape: tuple[int, int]  # (tokens, context_dim) used to build init inputs
    pooled_dim: int
    time_scale: float = 1000.0      # SD3 is fed t = 1000 * sigma

    def init(self, rng, batch_size: int = 1):
        x = jnp.zeros((batch_size,) + self.sample_shape, jnp.float32)
        cond = TextCond(tokens=jnp.zeros((batch_size,) + self.context_shape, jnp.float32),
                        pooled=jnp.zeros((batch_size, self.pooled_dim), jnp.float32),
                        mask=jnp.ones((batch_size, self.context_shape[0]), bool))
        return self.module.init(rng, x, jnp.zeros((batch_size,)), cond.tokens, cond.pooled, cond.mask)["params"]

    def apply(self, params, x_t, sigma, cond: TextCond) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x_t.shape[0],))
        return self.module.apply({"params": params}, x_t, self.time_scale * sigma, cond.tokens, cond.pooled,
                                 cond.mask)

    @property
    def apply_fn(self) -> Callable:
        return self.apply


def _dtype(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}") from None


def make_velocity_model(cfg) -> VelocityModel:
    family = cfg.get("family", "toy_mmdit")
    if family != "toy_mmdit":
        raise ValueError(f"unknown model.family {family!r}; expected one of {FAMILIES}")
    from ng_jax.models.mmdit import MMDiT

    size, patch = int(cfg.image_size), int(cfg.patch_size)
    if size % patch:
        raise ValueError(f"model.image_size={size} is not divisible by model.patch_size={patch}")
    if int(cfg.hidden_size) % int(cfg.num_heads):
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    module = MMDiT(patch_size=patch, in_channels=int(cfg.in_channels), hidden_size=int(cfg.hidden_size),
                   depth=int(cfg.depth), num_heads=int(cfg.num_heads), mlp_ratio=float(cfg.mlp_ratio),
                   qk_norm=cfg.get("qk_norm") or None, dtype=_dtype(cfg.get("dtype", "float32")),
                   remat=bool(cfg.get("remat", False)))
    return VelocityModel(module=module, sample_shape=(size, size, int(cfg.in_channels)),
                         context_shape=(1, int(cfg.context_dim)),  # any length works
                         pooled_dim=int(cfg.pooled_dim))
