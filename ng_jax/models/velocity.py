"""The one velocity-model contract every family implements.

    model = make_velocity_model(cfg)
    params = model.init(rng)                       # a plain parameter pytree
    v = model.apply(params, x_t, sigma, cond)      # x_t [B, *sample_shape], sigma [B] in [0, 1]

`cond` is a `TextCond` (per-token embeddings, pooled embedding, mask). Policy, old/EMA and
reference are separate parameter pytrees used with the same `apply`; nothing here knows about
training or checkpoints (pretrained weights: `ng_jax.models.weights`, called by `ng_jax.models.stack`).
Families:

- "toy_mmdit": the shapes world's MMDiT, pixel space (config keys: image_size, patch_size,
  in_channels, hidden_size, depth, num_heads, mlp_ratio, qk_norm, context_dim, pooled_dim).
- "sd3" / "sd35": diffusers' `SD3Transformer2DModel` (SD3, SD3.5 with RMS qk-norm and MMDiT-X
  dual-attention blocks) on NHWC latents. The keys mirror the transformer's config.json:
  sample_size, patch_size, in_channels, num_layers, attention_head_dim, num_attention_heads,
  joint_attention_dim, caption_projection_dim, pooled_projection_dim, out_channels,
  pos_embed_max_size, qk_norm, dual_attention_layers; plus latent_size (the latent side used for
  init and sample_shape; default sample_size, which also fixes the position table's base size and
  so must stay the checkpoint's value). The text mask is ignored (diffusers' SD3 attends to every
  text token).
- "flux1_dev": diffusers' `FluxTransformer2DModel` (FLUX.1-dev with the guidance embedding;
  `guidance_embeds=False` for schnell-like checkpoints) on NHWC latents, packed 2x2 inside. Keys:
  config.json's patch_size, in_channels, out_channels, num_layers, num_single_layers,
  attention_head_dim, num_attention_heads, joint_attention_dim, pooled_projection_dim,
  guidance_embeds, axes_dims_rope; plus sample_size (latent pixels, int or (H, W)),
  max_sequence_length (T5 tokens of the init inputs) and guidance (None -> 3.5 with
  guidance_embeds). `apply` takes an optional per-call `guidance` (scalar or [B]).

Every family also reads dtype (compute dtype), remat, attention (`model.attention`, default "auto":
which implementation the network's attention calls run, `ng_jax.models.nets.layers.attention`) and,
for the real ones, scan_blocks.
`ng_jax.models.weights.transformer.model_config_from_diffusers` builds an sd3/sd35/flux1_dev
config from a checkpoint's config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ng_jax.models.dtypes import dtype_of
from ng_jax.models.nets.flux import PACK, FluxTransformer, latent_image_ids, pack_latents, text_ids, unpack_latents
from ng_jax.models.nets.layers import resolve_attention
from ng_jax.models.nets.mmdit import MMDiT
from ng_jax.models.nets.text import TextCond

FAMILIES = ("toy_mmdit", "sd3", "sd35", "flux1_dev")
SD3_FAMILIES = ("sd3", "sd35")
# Keys of an sd3/sd35 config that must be given (they mirror diffusers' config.json).
SD3_REQUIRED = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")


@dataclasses.dataclass(frozen=True)
class VelocityModel:
    """A Flax module behind the contract. The module is called as
    `module(x_t, time_scale * sigma, tokens, pooled, mask)` (the MMDiTs); families whose module takes
    other inputs override `module_inputs` / `module_output` (FLUX, below)."""

    module: Any
    sample_shape: tuple[int, ...]   # one sample, without batch (NHWC for images/latents)
    context_shape: tuple[int, int]  # (tokens, context_dim) used to build init inputs
    pooled_dim: int
    time_scale: float = 1000.0      # SD3 is fed t = 1000 * sigma

    def module_inputs(self, x_t, sigma, cond: TextCond) -> tuple:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x_t.shape[0],))
        return x_t, self.time_scale * sigma, cond.tokens, cond.pooled, cond.mask

    def module_output(self, out, x_t) -> jax.Array:
        return out

    def init(self, rng, batch_size: int = 1):
        x = jnp.zeros((batch_size,) + tuple(self.sample_shape), jnp.float32)
        cond = TextCond(tokens=jnp.zeros((batch_size,) + tuple(self.context_shape), jnp.float32),
                        pooled=jnp.zeros((batch_size, self.pooled_dim), jnp.float32),
                        mask=jnp.ones((batch_size, self.context_shape[0]), bool))
        return self.module.init(rng, *self.module_inputs(x, jnp.zeros((batch_size,)), cond))["params"]

    def apply(self, params, x_t, sigma, cond: TextCond, *args, **kwargs) -> jax.Array:
        """v = the velocity at (x_t, sigma); family options (FLUX: guidance) follow `cond`."""
        out = self.module.apply({"params": params}, *self.module_inputs(x_t, sigma, cond, *args, **kwargs))
        return self.module_output(out, x_t)

    @property
    def apply_fn(self) -> Callable:
        return self.apply


@dataclasses.dataclass(frozen=True)
class FluxVelocityModel(VelocityModel):
    """FLUX.1 on NHWC latents [B, H, W, C] (H, W even): packed to [B, HW/4, 4C] for the transformer
    and unpacked after. `guidance` is the distilled guidance scale fed to a `guidance_embeds` model
    (FLUX.1-dev: 3.5); None for models without it (schnell). `apply(..., guidance=g)` overrides it
    per call (scalar or [B])."""

    guidance: float | None = None
    time_scale: float = 1.0         # FLUX's transformer is fed sigma (x1000 inside the module)

    def _guidance(self, guidance, batch: int):
        g = self.guidance if guidance is None else guidance
        if not self.module.guidance_embeds:
            if guidance is not None:
                raise ValueError("this FLUX model has no guidance embedding (guidance_embeds=False)")
            return None
        if g is None:
            raise ValueError("a guidance_embeds FLUX model needs model.guidance (FLUX.1-dev uses 3.5)")
        return jnp.broadcast_to(jnp.asarray(g, jnp.float32), (batch,))

    def module_inputs(self, x_t, sigma, cond: TextCond, guidance=None) -> tuple:
        """Packed latents, tokens, pooled, timestep, image ids, text ids, guidance (the ids are numpy,
        so the RoPE tables are compile-time constants)."""
        b, hgt, wid, _ = x_t.shape
        if hgt % PACK or wid % PACK:
            raise ValueError(f"FLUX latents need even height and width, got {tuple(x_t.shape[1:3])}")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        return (pack_latents(x_t), cond.tokens, cond.pooled, self.time_scale * sigma,
                latent_image_ids(hgt // PACK, wid // PACK), text_ids(cond.tokens.shape[1]),
                self._guidance(guidance, b))

    def module_output(self, out, x_t) -> jax.Array:
        return unpack_latents(out, x_t.shape[1], x_t.shape[2])


def make_velocity_model(cfg) -> VelocityModel:
    """The velocity model of `cfg` (a ConfigDict; FLUX's may be a plain dict; `family` defaults to "toy_mmdit")."""
    family = cfg.get("family", "toy_mmdit")
    # A bad name, or a kernel this backend (or model.dtype) cannot run: one line, here rather than at trace time.
    resolve_attention(attention_of(cfg), dtype=dtype_of(cfg.get("dtype", "float32")))
    if family in SD3_FAMILIES:
        return _make_sd3(cfg)
    if family == "flux1_dev":
        return _make_flux(cfg)
    if family != "toy_mmdit":
        raise ValueError(f"unknown model.family {family!r}; expected one of {FAMILIES}")
    size, patch = int(cfg.image_size), int(cfg.patch_size)
    if size % patch:
        raise ValueError(f"model.image_size={size} is not divisible by model.patch_size={patch}")
    if int(cfg.hidden_size) % int(cfg.num_heads):
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    module = MMDiT(patch_size=patch, in_channels=int(cfg.in_channels), hidden_size=int(cfg.hidden_size),
                   depth=int(cfg.depth), num_heads=int(cfg.num_heads), mlp_ratio=float(cfg.mlp_ratio),
                   qk_norm=cfg.get("qk_norm") or None, dtype=dtype_of(cfg.get("dtype", "float32")),
                   remat=bool(cfg.get("remat", False)), attention=attention_of(cfg))
    return VelocityModel(module=module, sample_shape=(size, size, int(cfg.in_channels)),
                         context_shape=(1, int(cfg.context_dim)),  # any length works
                         pooled_dim=int(cfg.pooled_dim))


def attention_of(cfg) -> str:
    """`model.attention` of a model config ("auto" when unset, e.g. in bundles saved before it existed)."""
    return str(cfg.get("attention") or "auto")


def _make_sd3(cfg) -> VelocityModel:
    missing = [k for k in SD3_REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"model.family={cfg.get('family')!r} needs model.{', model.'.join(missing)} "
                         "(the transformer's config.json keys; see weights.transformer.model_config_from_diffusers)")
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
                   dtype=dtype_of(cfg.get("dtype", "float32")), remat=bool(cfg.get("remat", False)),
                   dual_attention_layers=dual, scan_blocks=bool(cfg.get("scan_blocks", False)),
                   use_text_mask=False, attention=attention_of(cfg))
    return VelocityModel(module=module, sample_shape=(latent, latent, in_ch),
                         context_shape=(1, int(cfg.joint_attention_dim)), pooled_dim=int(cfg.pooled_projection_dim))


def _hw(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _make_flux(cfg) -> FluxVelocityModel:
    get = cfg.get
    if int(get("patch_size", 1)) != 1:
        raise ValueError(f"FLUX packs 2x2 latent patches outside the transformer; patch_size must be 1, "
                         f"got {cfg['patch_size']}")
    in_ch = int(cfg["in_channels"])
    out_ch = get("out_channels")
    if out_ch is not None and int(out_ch) != in_ch:
        raise ValueError(f"a velocity model needs out_channels == in_channels, got {out_ch} vs {in_ch}")
    if in_ch % (PACK * PACK):
        raise ValueError(f"in_channels={in_ch} must be 4 x latent channels (2x2 packing)")
    head_dim, heads = int(cfg["attention_head_dim"]), int(cfg["num_attention_heads"])
    axes = tuple(int(a) for a in get("axes_dims_rope", (16, 56, 56)))
    if sum(axes) != head_dim:
        raise ValueError(f"axes_dims_rope {axes} must sum to attention_head_dim={head_dim}")
    guidance_embeds = bool(get("guidance_embeds", False))
    guidance = get("guidance", None)
    if guidance_embeds and guidance is None:
        guidance = 3.5
    if not guidance_embeds and guidance is not None:
        raise ValueError(f"model.guidance={guidance} given but guidance_embeds=False (schnell-like)")
    hgt, wid = _hw(get("sample_size", 128))
    if hgt % PACK or wid % PACK:
        raise ValueError(f"model.sample_size {(hgt, wid)} must be even (2x2 packing)")
    module = FluxTransformer(in_channels=in_ch, num_layers=int(cfg["num_layers"]),
                             num_single_layers=int(cfg["num_single_layers"]), attention_head_dim=head_dim,
                             num_attention_heads=heads, guidance_embeds=guidance_embeds, axes_dims_rope=axes,
                             dtype=dtype_of(get("dtype", "float32")), remat=bool(get("remat", False)),
                             scan_blocks=bool(get("scan_blocks", False)), attention=attention_of(cfg))
    return FluxVelocityModel(module=module, sample_shape=(hgt, wid, in_ch // (PACK * PACK)),
                             context_shape=(int(get("max_sequence_length", 512)), int(cfg["joint_attention_dim"])),
                             pooled_dim=int(cfg["pooled_projection_dim"]),
                             guidance=None if guidance is None else float(guidance))


@dataclasses.dataclass(frozen=True)
class ShiftedVelocityModel:
    """`inner` reparametrised to the sample space `z = x - shift` (per channel): with
    `x_t = (1 - sigma) x0 + sigma eps` and `z_t = x_t - (1 - sigma) shift`, the velocity is
    `v_z(z_t) = v_x(z_t + (1 - sigma) shift) + shift` (the target `eps - z0 = eps - x0 + shift`). An
    exact change of coordinates: Euler and Flow-SDE steps, guidance and every flow-matching loss give
    the same images and values in both spaces; what moves is the origin of the velocity's norm. Same
    parameters as `inner`; everything but `apply` is `inner`'s."""

    inner: Any
    shift: tuple[float, ...]

    def __getattr__(self, name):
        if name in ("inner", "shift") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def apply(self, params, z_t, sigma, cond: TextCond, *args, **kwargs) -> jax.Array:
        b = jnp.asarray(self.shift, jnp.float32)
        s = jnp.asarray(sigma, jnp.float32)
        s = s.reshape(s.shape + (1,) * (z_t.ndim - s.ndim))
        v = self.inner.apply(params, z_t + (1.0 - s) * b, sigma, cond, *args, **kwargs)
        return v + b.astype(v.dtype)

    @property
    def apply_fn(self) -> Callable:
        return self.apply
