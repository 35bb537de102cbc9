"""FLUX.1 transformer (dev / schnell) in Flax linen, weight-compatible with diffusers' `FluxTransformer2DModel`.

Ground truth: diffusers 0.39 `models/transformers/transformer_flux.py` and the pieces it uses
(`CombinedTimestep[Guidance]TextProjEmbeddings`, `AdaLayerNormZero[Single]`,
`AdaLayerNormContinuous`, `FluxPosEmbed` / `apply_rotary_emb`), and `FluxPipeline` for the 2x2
latent packing and the position ids. Structure:

- `x_embedder` (packed latents -> D), `context_embedder` (T5 tokens -> D),
  `time_text_embed` (sinusoid(1000 sigma) [+ sinusoid(1000 guidance)] + pooled CLIP -> temb);
- `num_layers` double-stream blocks: separate image/text weights, one joint attention over
  [text; image] (text first, unlike SD3), per-head RMS qk-norm, 3-axis RoPE;
- `num_single_layers` single-stream blocks over the concatenated sequence: attention and a
  GELU(tanh) MLP computed in parallel from one adaLN-Zero-modulated input, fused by `proj_out`;
- `norm_out` (AdaLayerNormContinuous) and `proj_out` on the image tokens.

Parameter paths mirror the diffusers state dict (`transformer_blocks_3/attn/to_out_0/kernel` <->
`transformer_blocks.3.attn.to_out.0.weight`); with `scan_blocks` each stack is one scanned module
(`transformer_blocks/...`, `single_transformer_blocks/...`) whose parameters carry a leading layer
axis. `ng_jax.models.weights.flux` holds the key map and the loader; `ng_jax.models.velocity` the
velocity-model contract (NHWC latents in and out, packed here).

Conventions (docs/ALGORITHMS.md sec 1): FLUX is fed `timestep = sigma` and multiplies it by 1000
itself; the guidance-distilled dev model also gets `guidance = guidance_scale` (x1000 inside).
FLUX attends to every text token: diffusers' pipeline passes no attention mask, so `cond.mask` is
not used (padding tokens are part of the conditioning, as in the reference).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets.layers import (AdaLayerNormContinuous, AdaLayerNormZero, FeedForward, MLPEmbedder, RMSNorm,
                                      attention, layer_norm, modulate, timestep_embedding)
from ng_jax.sharding import constrain

TOKENS = ("batch", "seq", "embed")  # logical names of the streams (ng_jax.sharding)

Dtype = Any

ROPE_THETA = 10000.0
PACK = 2  # FluxPipeline packs 2x2 latent patches into channels (in_channels = 4 * latent channels)

# LoRA targets, after X-GenGroup/Flow-Factory `Flux1Adapter.default_target_modules` (PEFT suffix
# matching of "attn.to_q/k/v", "attn.to_out.0", "attn.add_{q,k,v}_proj", "attn.to_add_out",
# "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"): attention q/k/v/out of
# both streams of the double blocks and their feed-forwards (image and text); "attn.to_q/k/v" also
# matches the single blocks' q/k/v under PEFT's suffix rule, so those are included. Not adapted:
# embedders, adaLN linears, the single blocks' proj_mlp/proj_out, norm_out, proj_out.
# Regexes over "/"-joined Flax paths without the trailing "kernel" (ng_jax.models.nets.lora).
FLUX_LORA_TARGETS = (
    r"(^|/)attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    r"(^|/)(ff|ff_context)/(net_0/proj|net_2)$",
)


# ----------------------------------------------------------------------------------------------
# Positions: ids and rotary tables


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """[height * width, 3] ids (0, row, col) of the packed latent grid, rows first
    (diffusers `FluxPipeline._prepare_latent_image_ids`)."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def text_ids(length: int) -> np.ndarray:
    """[length, 3] zeros: every text token sits at position 0 on all three axes."""
    return np.zeros((length, 3), np.float32)


def rope_tables(ids, axes_dims: Sequence[int], theta: float = ROPE_THETA):
    """(cos, sin) [S, sum(axes_dims)] for ids [S, n_axes] (diffusers `FluxPosEmbed`).

    Per axis i: frequencies `theta ** (-arange(0, d_i, 2) / d_i)`, angles `pos_i * freq`, each
    cos/sin repeated twice in place (interleaved pairs), axes concatenated. Numpy ids are computed
    in float64 like diffusers (then cast to float32); traced ids in float32."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    ftype = np.float64 if xp is np else jnp.float32
    pos = xp.asarray(ids).astype(np.float32).astype(ftype)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        if d % 2:
            raise ValueError(f"axes_dims_rope entries must be even, got {tuple(axes_dims)}")
        freqs = 1.0 / (theta ** (xp.arange(0, d, 2, dtype=ftype) / d))
        ang = pos[:, i, None] * freqs[None]
        cos.append(xp.repeat(xp.cos(ang), 2, axis=1))
        sin.append(xp.repeat(xp.sin(ang), 2, axis=1))
    return (xp.concatenate(cos, axis=1).astype(np.float32), xp.concatenate(sin, axis=1).astype(np.float32))


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs of x [B, S, H, D] by the tables [S, D] (diffusers `apply_rotary_emb`,
    `use_real_unbind_dim=-1`), in float32."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(x.shape[:-1] + (-1, 2))
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Blocks


def _heads(t, heads):
    return t.reshape(t.shape[:2] + (heads, -1))


class _Width(nn.Module):
    """The fields every FLUX block and attention shares: model width, heads, compute dtype, attention."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # layers.ATTENTION (model.attention)


class FluxTransformerBlock(_Width):
    """Double-stream block; `__call__((c, x), temb, cos, sin) -> ((c, x), None)` (scan-shaped)."""

    @nn.compact
    def __call__(self, carry, temb, cos, sin):
        c, x = carry
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(self.dim, self.dtype, name="norm1")(x, temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
            self.dim, self.dtype, name="norm1_context")(c, temb)

        # Joint attention (diffusers `FluxAttention` + `FluxAttnProcessor`), text tokens first.
        attn = _DoubleAttention(self.dim, self.heads, self.dtype, self.attention, name="attn")
        attn_x, attn_c = attn(nx, nc, cos, sin)

        x = x + gate_msa[:, None] * attn_x
        h = modulate(layer_norm(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.dim, 4 * self.dim, self.dtype, name="ff")(h)

        c = c + c_gate_msa[:, None] * attn_c
        h = modulate(layer_norm(c), c_shift_mlp, c_scale_mlp)
        c = c + c_gate_mlp[:, None] * FeedForward(self.dim, 4 * self.dim, self.dtype, name="ff_context")(h)
        return (constrain(c, TOKENS), constrain(x, TOKENS)), None


class _DoubleAttention(_Width):
    @nn.compact
    def __call__(self, x, c, cos, sin):
        m = c.shape[1]
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (_heads(dense(nm)(x), self.heads) for nm in ("to_q", "to_k", "to_v"))
        q, k = RMSNorm(name="norm_q")(q), RMSNorm(name="norm_k")(k)
        cq, ck, cv = (_heads(dense(nm)(c), self.heads) for nm in ("add_q_proj", "add_k_proj", "add_v_proj"))
        cq, ck = RMSNorm(name="norm_added_q")(cq), RMSNorm(name="norm_added_k")(ck)
        q = apply_rope(jnp.concatenate([cq, q], axis=1), cos, sin)
        k = apply_rope(jnp.concatenate([ck, k], axis=1), cos, sin)
        out = attention(q, k, jnp.concatenate([cv, v], axis=1), implementation=self.attention)
        out = out.reshape(out.shape[:2] + (self.dim,))
        return dense("to_out_0")(out[:, m:]), dense("to_add_out")(out[:, :m])


class FluxSingleTransformerBlock(_Width):
    """Single-stream block over h = [text; image]; `__call__(h, temb, cos, sin) -> (h, None)`."""

    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, h, temb, cos, sin):
        shift, scale, gate = jnp.split(_AdaLinear(3 * self.dim, self.dtype, name="norm")(temb), 3, axis=-1)
        nh = modulate(layer_norm(h), shift, scale)
        mlp = nn.gelu(nn.Dense(int(self.dim * self.mlp_ratio), dtype=self.dtype, name="proj_mlp")(nh),
                      approximate=True)
        attn = _SingleAttention(self.dim, self.heads, self.dtype, self.attention, name="attn")(nh, cos, sin)
        mlp = constrain(mlp, ("batch", "seq", "mlp"))
        out = nn.Dense(self.dim, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return constrain(h + gate[:, None] * out, TOKENS), None


class _AdaLinear(nn.Module):
    """SiLU -> `linear` (diffusers `AdaLayerNormZeroSingle.linear`), zero-initialised."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        return nn.Dense(self.features, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear")(nn.silu(emb))


class _SingleAttention(_Width):
    """q/k/v + qk-norm + RoPE + attention, no output projection (diffusers `pre_only=True`)."""

    @nn.compact
    def __call__(self, h, cos, sin):
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (_heads(dense(nm)(h), self.heads) for nm in ("to_q", "to_k", "to_v"))
        q = apply_rope(RMSNorm(name="norm_q")(q), cos, sin)
        k = apply_rope(RMSNorm(name="norm_k")(k), cos, sin)
        out = attention(q, k, v, implementation=self.attention)
        return out.reshape(out.shape[:2] + (self.dim,))


class TimeTextEmbed(nn.Module):
    """diffusers `CombinedTimestepTextProjEmbeddings`, or with `guidance_embeds`
    `CombinedTimestepGuidanceTextProjEmbeddings`: MLP(sinusoid(t)) [+ MLP(sinusoid(g))] + MLP(pooled).

    The sinusoid of 1000 * guidance (up to ~5000) is the least reproducible part across frameworks:
    torch's (CPU) and XLA's float32 `exp` differ by an ulp on a few frequencies, which moves those
    angles by ~1e-4; on the tiny test models this dominates the dev-vs-diffusers error (~2e-5 vs ~4e-6
    without guidance)."""

    dim: int
    guidance_embeds: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, pooled, guidance=None):
        emb = MLPEmbedder(self.dim, self.dtype, name="timestep_embedder")(timestep_embedding(t, 256).astype(self.dtype))
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model has guidance_embeds=True and needs a guidance value")
            emb = emb + MLPEmbedder(self.dim, self.dtype, name="guidance_embedder")(
                timestep_embedding(guidance, 256).astype(self.dtype))
        return emb + MLPEmbedder(self.dim, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


class FluxTransformer(nn.Module):
    """diffusers `FluxTransformer2DModel.forward` on packed latents.

    `__call__(hidden_states [B, N, in_channels], encoder_hidden_states [B, L, joint_attention_dim],
    pooled_projections [B, pooled_projection_dim], timestep [B] (= sigma), img_ids [N, 3],
    txt_ids [L, 3], guidance [B] | None) -> [B, N, out_channels]` (float32). Like diffusers, the
    timestep and guidance are multiplied by 1000 here.
    """

    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_blocks: bool = False
    attention: str = "auto"  # layers.ATTENTION: the implementation of every attention call (model.attention)

    def _stack(self, block_cls, n: int, name: str, carry, temb, cos, sin, **kw):
        if n == 0:
            return carry
        if self.remat:
            block_cls = nn.remat(block_cls, prevent_cse=not self.scan_blocks)
        if self.scan_blocks:
            scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n)
            carry, _ = scanned(name=name, **kw)(carry, temb, cos, sin)
            return carry
        for i in range(n):
            carry, _ = block_cls(name=f"{name}_{i}", **kw)(carry, temb, cos, sin)
        return carry

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        d = self.num_attention_heads * self.attention_head_dim
        out_ch = self.out_channels or self.in_channels
        x = nn.Dense(d, dtype=self.dtype, name="x_embedder")(hidden_states.astype(self.dtype))
        t = jnp.asarray(timestep, jnp.float32) * 1000.0
        g = None if guidance is None else jnp.asarray(guidance, jnp.float32) * 1000.0
        temb = TimeTextEmbed(d, self.guidance_embeds, self.dtype, name="time_text_embed")(t, pooled_projections, g)
        c = nn.Dense(d, dtype=self.dtype, name="context_embedder")(encoder_hidden_states.astype(self.dtype))
        x, c = constrain(x, TOKENS), constrain(c, TOKENS)
        cat = np if isinstance(txt_ids, np.ndarray) and isinstance(img_ids, np.ndarray) else jnp
        cos, sin = rope_tables(cat.concatenate([txt_ids, img_ids], axis=0), self.axes_dims_rope)

        kw = dict(dim=d, heads=self.num_attention_heads, dtype=self.dtype, attention=self.attention)
        c, x = self._stack(FluxTransformerBlock, self.num_layers, "transformer_blocks", (c, x), temb, cos, sin, **kw)
        m = c.shape[1]
        h = self._stack(FluxSingleTransformerBlock, self.num_single_layers, "single_transformer_blocks",
                        jnp.concatenate([c, x], axis=1), temb, cos, sin, **kw)
        x = AdaLayerNormContinuous(d, self.dtype, name="norm_out")(h[:, m:], temb)
        x = nn.Dense(out_ch, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(x)
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# 2x2 latent packing (the velocity-model contract, ng_jax.models.velocity, works on NHWC latents)


def pack_latents(x):
    """NHWC latents [B, H, W, C] -> [B, (H/2)(W/2), 4C], channel index c*4 + dy*2 + dx
    (`FluxPipeline._pack_latents` on the NCHW tensor)."""
    b, hgt, wid, ch = x.shape
    x = x.reshape(b, hgt // PACK, PACK, wid // PACK, PACK, ch).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (hgt // PACK) * (wid // PACK), ch * PACK * PACK)


def unpack_latents(x, height: int, width: int):
    """Inverse of `pack_latents`: [B, (H/2)(W/2), 4C] -> [B, H, W, C]."""
    b, _, packed = x.shape
    ch = packed // (PACK * PACK)
    x = x.reshape(b, height // PACK, width // PACK, ch, PACK, PACK).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, ch)
