"""The one velocity-model contract every family implements.

    model = make_velocity_model(cfg)
    params = model.init(rng)                       # a plain parameter pytree
    v = model.apply(params, x_t, sigma, cond)      # x_t [B, *sample_shape], sigma [B] in [0, 1]

`cond` is a `TextCond` (per-token embeddings, pooled embedding, mask). Policy, old/EMA and
reference are separate parameter pytrees used with the same `apply`; nothing here knows about
training. Families:

- "toy_mmdit": the shapes world's MMDiT, pixel space (config keys: image_size, patch_size,
  in_channels, hidden_size, depth, num_heads, mlp_ratio, qk_norm, context_dim, pooled_dim).
- "sd3" / "sd35": diffusers' `SD3Transformer2DModel` (SD3, SD3.5 with RMS qk-norm and MMDiT-X
  dual-attention blocks) on NHWC latents. The keys mirror the transformer's config.json:
  sample_size, patch_size, in_channels, num_layers, attention_head_dim, num_attention_heads,
  joint_attention_dim, caption_projection_dim, pooled_projection_dim, out_channels,
  pos_embed_max_size, qk_norm, dual_attention_layers; plus dtype, remat, scan_blocks,
  weights_dir (WEIGHTS_DIR holding transformer/) and latent_size (the latent side used for init
  and sample_shape; default sample_size, which also fixes the position table's base size and so
  must stay the checkpoint's value). `sd3_weights.model_config_from_diffusers` builds this config
  from a checkpoint; `model.load_pretrained()` loads `weights_dir` strictly. The text mask is
  ignored (diffusers' SD3 attends to every text token).
- "flux1_dev": diffusers' `FluxTransformer2DModel` (FLUX.1-dev with the guidance embedding;
  `guidance_embeds=False` for schnell-like checkpoints) on NHWC latents, packed 2x2 inside; see
  `ng_jax.models.nets.flux.make_flux_model` and `flux_weights.model_config_from_diffusers`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ng_jax.models.nets.text import TextCond

FAMILIES = ("toy_mmdit", "sd3", "sd35", "flux1_dev")
SD3_FAMILIES = ("sd3", "sd35")
# Keys of an sd3/sd35 config that must be given (they mirror diffusers' config.json).
SD3_REQUIRED = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")


@dataclasses.dataclass(frozen=True)
class VelocityModel:
    module: Any
    sample_shape: tuple[int, ...]   # one sample, without batch (NHWC for images/latents)
    context_shape: tuple[int, int]  # (tokens, context_dim) used to build init inputs
    pooled_dim: int
    time_scale: float = 1000.0      # SD3 is fed t = 1000 * sigma
    # (dtype=None, shardings=None) -> params from pretrained weights; None for families without.
    loader: Callable | None = dataclasses.field(default=None, compare=False)

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

    def load_pretrained(self, dtype=None, shardings=None):
        """Strictly load the configured pretrained weights (`model.weights_dir`) as a params tree."""
        if self.loader is None:
            raise ValueError("this model has no pretrained weights configured (set model.weights_dir)")
        return self.loader(dtype=dtype, shardings=shardings)

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
    if family in SD3_FAMILIES:
        return _make_sd3(cfg)
    if family == "flux1_dev":  # FLUX.1-dev and schnell-like (guidance_embeds=False): ng_jax.models.nets.flux
        from ng_jax.models.nets.flux import make_flux_model

        return make_flux_model(cfg)
    if family != "toy_mmdit":
        raise ValueError(f"unknown model.family {family!r}; expected one of {FAMILIES}")
    from ng_jax.models.nets.mmdit import MMDiT

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


def _make_sd3(cfg) -> VelocityModel:
    from ng_jax.models.nets.mmdit import MMDiT

    missing = [k for k in SD3_REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"model.family={cfg.get('family')!r} needs model.{', model.'.join(missing)} "
                         "(the transformer's config.json keys; see sd3_weights.model_config_from_diffusers)")
    patch, heads, head_dim = int(cfg.patch_size), int(cfg.num_attention_heads), int(cfg.attention_head_dim)
    hidden = heads * head_dim
    if int(cfg.caption_projection_dim) != hidden:
        raise ValueError(f"model.caption_projection_dim={cfg.caption_projection_dim} must equal "
                         f"num_attention_heads * attention_head_dim = {hidden} (as in every SD3 checkpoint)")
    sample_size = int(cfg.sample_size)
    latent = int(cfg.get("latent_size") or sample_size)
    if latent % patch:
        raise ValueError(f"model latent size {latent} is not divisible by model.patch_size={patch}")
    max_size = cfg.get("pos_embed_max_size")
    max_size = int(max_size) if max_size else None
    if max_size is not None and latent // patch > max_size:
        raise ValueError(f"model latent size {latent} gives {latent // patch} patches per side, more than "
                         f"pos_embed_max_size={max_size}")
    layers = int(cfg.num_layers)
    dual = tuple(int(i) for i in (cfg.get("dual_attention_layers") or ()))
    bad = [i for i in dual if not 0 <= i < layers]
    if bad:
        raise ValueError(f"model.dual_attention_layers {bad} outside [0, {layers})")
    in_ch = int(cfg.in_channels)
    module = MMDiT(patch_size=patch, in_channels=in_ch, out_channels=int(cfg.get("out_channels") or in_ch),
                   hidden_size=hidden, depth=layers, num_heads=heads, mlp_ratio=4.0,
                   qk_norm=cfg.get("qk_norm") or None, pos_embed_max_size=max_size, base_size=sample_size // patch,
                   dtype=_dtype(cfg.get("dtype", "float32")), remat=bool(cfg.get("remat", False)),
                   dual_attention_layers=dual, scan_blocks=bool(cfg.get("scan_blocks", False)),
                   use_text_mask=False)
    loader = None
    if cfg.get("weights_dir"):
        from ng_jax.models.weights.sd3 import load_sd3_transformer

        loader = functools.partial(load_sd3_transformer, str(cfg.weights_dir), cfg)
    return VelocityModel(module=module, sample_shape=(latent, latent, in_ch),
                         context_shape=(1, int(cfg.joint_attention_dim)), pooled_dim=int(cfg.pooled_projection_dim),
                         loader=loader)
