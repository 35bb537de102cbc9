"""SD3-style MMDiT velocity network in Flax linen.

Joint attention over image and text tokens (image first, as diffusers' `JointAttnProcessor2_0`),
adaLN-Zero modulation from timestep + pooled text, patchify by a strided convolution, fixed 2D
sin-cos positions, and a context-pre-only last block. Parameter names mirror diffusers'
`SD3Transformer2DModel` (`pos_embed/proj`, `time_text_embed/timestep_embedder/linear_1`,
`context_embedder`, `transformer_blocks_{i}/attn/to_q`, `.../ff/net_0/proj`, `norm_out/linear`,
`proj_out`) so diffusers weights map onto it by renaming.

Input and output images are NHWC; the network is fed `t = 1000 * sigma` (SD3's convention).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ng_jax.models.layers import (AdaLayerNormContinuous, AdaLayerNormZero, FeedForward, MLPEmbedder, RMSNorm,
                                  attention, layer_norm, sincos_2d_pos_embed, timestep_embedding)

Dtype = Any


class JointAttention(nn.Module):
    """Attention over [image tokens; text tokens] with separate projections per stream."""

    dim: int
    heads: int
    context_pre_only: bool = False
    qk_norm: str | None = None  # None or "rms_norm" (SD3.5)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, c_mask=None):
        b, n, _ = x.shape
        m = c.shape[1]
        hd = self.dim // self.heads
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)  # noqa: E731

        def heads(t, length):
            return t.reshape(b, length, self.heads, hd)

        q, k, v = (heads(dense(nm)(x), n) for nm in ("to_q", "to_k", "to_v"))
        cq, ck, cv = (heads(dense(nm)(c), m) for nm in ("add_q_proj", "add_k_proj", "add_v_proj"))
        if self.qk_norm == "rms_norm":
            q, k = RMSNorm(name="norm_q")(q), RMSNorm(name="norm_k")(k)
            cq, ck = RMSNorm(name="norm_added_q")(cq), RMSNorm(name="norm_added_k")(ck)
        elif self.qk_norm is not None:
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        key_mask = None
        if c_mask is not None:
            key_mask = jnp.concatenate([jnp.ones((b, n), bool), c_mask.astype(bool)], axis=1)
        out = attention(jnp.concatenate([q, cq], 1), jnp.concatenate([k, ck], 1), jnp.concatenate([v, cv], 1),
                        key_mask).reshape(b, n + m, self.dim)
        x_out = dense("to_out_0")(out[:, :n])
        c_out = None if self.context_pre_only else dense("to_add_out")(out[:, n:])
        return x_out, c_out


class JointTransformerBlock(nn.Module):
    dim: int
    heads: int
    mlp_ratio: float = 4.0
    context_pre_only: bool = False
    qk_norm: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, temb, c_mask=None):
        hidden = int(self.dim * self.mlp_ratio)
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(self.dim, self.dtype, name="norm1")(x, temb)
        if self.context_pre_only:
            nc = AdaLayerNormContinuous(self.dim, self.dtype, name="norm1_context")(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
                self.dim, self.dtype, name="norm1_context")(c, temb)
        attn_x, attn_c = JointAttention(self.dim, self.heads, self.context_pre_only, self.qk_norm, self.dtype,
                                        name="attn")(nx, nc, c_mask)
        x = x + gate_msa[:, None] * attn_x
        h = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * FeedForward(self.dim, hidden, self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * attn_c
        h = layer_norm(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * FeedForward(self.dim, hidden, self.dtype, name="ff_context")(h)
        return x, c


class PatchEmbed(nn.Module):
    """Strided-conv patchify plus a fixed sin-cos table, centre-cropped from pos_embed_max_size."""

    dim: int
    patch_size: int
    pos_embed_max_size: int | None = None
    base_size: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(x)
        b, h, w, d = x.shape
        size = self.pos_embed_max_size or max(h, w)
        table = sincos_2d_pos_embed(d, size, base_size=self.base_size or size).reshape(size, size, d)
        top, left = (size - h) // 2, (size - w) // 2
        pos = jnp.asarray(table[top:top + h, left:left + w].reshape(1, h * w, d), x.dtype)
        return x.reshape(b, h * w, d) + pos


class CombinedTimestepTextEmbed(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, pooled):
        temb = MLPEmbedder(self.dim, self.dtype, name="timestep_embedder")(timestep_embedding(t, 256).astype(self.dtype))
        return temb + MLPEmbedder(self.dim, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


class MMDiT(nn.Module):
    """`__call__(x [B,H,W,C], t [B], tokens [B,L,Dc], pooled [B,Dp], mask [B,L] | None) -> [B,H,W,C_out]`."""

    patch_size: int = 2
    in_channels: int = 3
    out_channels: int | None = None
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: str | None = None
    pos_embed_max_size: int | None = None
    base_size: int | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, t, tokens, pooled, mask=None):
        b, hgt, wid, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        out_ch = self.out_channels or self.in_channels
        h = PatchEmbed(d, p, self.pos_embed_max_size, self.base_size, self.dtype, name="pos_embed")(x.astype(self.dtype))
        temb = CombinedTimestepTextEmbed(d, self.dtype, name="time_text_embed")(t, pooled)
        c = nn.Dense(d, dtype=self.dtype, name="context_embedder")(tokens.astype(self.dtype))
        block_cls = nn.remat(JointTransformerBlock, static_argnums=()) if self.remat else JointTransformerBlock
        for i in range(self.depth):
            h, c = block_cls(d, self.num_heads, self.mlp_ratio, context_pre_only=i == self.depth - 1,
                             qk_norm=self.qk_norm, dtype=self.dtype, name=f"transformer_blocks_{i}")(h, c, temb, mask)
        h = AdaLayerNormContinuous(d, self.dtype, name="norm_out")(h, temb)
        h = nn.Dense(p * p * out_ch, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        gh, gw = hgt // p, wid // p
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, hgt, wid, out_ch).astype(jnp.float32)
