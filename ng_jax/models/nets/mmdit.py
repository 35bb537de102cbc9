"""SD3 / SD3.5 MMDiT velocity network in Flax linen, weight-compatible with diffusers'
`SD3Transformer2DModel` (diffusers 0.39: `models/transformers/transformer_sd3.py`,
`models/attention.py::JointTransformerBlock`, `models/normalization.py`).

Joint attention over image and text tokens (image first, as diffusers' `JointAttnProcessor2_0`),
adaLN-Zero modulation from timestep + pooled text, patchify by a strided convolution, fixed 2D
sin-cos positions (centre-cropped from a `pos_embed_max_size` table, as SD3's `PatchEmbed`), and
a context-pre-only last block. SD3.5 adds RMS qk-norm (`qk_norm="rms_norm"`) and MMDiT-X blocks
(`dual_attention_layers`): an extra image-only self-attention `attn2` whose modulation comes from
the same `norm1` (`SD35AdaLayerNormZeroX`, 9 outputs instead of 6).

Parameter names mirror diffusers (`pos_embed/proj`, `time_text_embed/timestep_embedder/linear_1`,
`context_embedder`, `transformer_blocks_{i}/attn/to_q`, `.../ff/net_0/proj`, `norm_out/linear`,
`proj_out`); `ng_jax.models.weights.sd3` maps a diffusers checkpoint onto them. With
`scan_blocks`, each run of two or more structurally identical consecutive blocks (same dual
attention, not the context-pre-only last block) is one `nn.scan` named
`transformer_blocks_{first}_to_{last}/block/...` whose parameters carry a leading layer axis: one
compiled block body per run instead of one per layer.

Input and output images are NHWC; the network is fed `t = 1000 * sigma` (SD3's convention).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets.layers import (TOKENS, AdaLayerNormContinuous, AdaLayerNormZero, Dense, FeedForward,
                                      MLPEmbedder, RMSNorm, attention, layer_norm, modulate, sincos_1d,
                                      sincos_2d_pos_embed, timestep_embedding)
from ng_jax.sharding import constrain

Dtype = Any


class JointAttention(nn.Module):
    """Attention over [image tokens; text tokens] with separate projections per stream.

    With `c=None` it is plain self-attention over the image tokens (SD3.5's `attn2`: `to_q/k/v`,
    `norm_q/k`, `to_out_0` only). Returns `(x_out, c_out)`; `c_out` is None when `c` is None or
    the block is context-pre-only.
    """

    dim: int
    heads: int
    context_pre_only: bool = False
    qk_norm: str | None = None  # None or "rms_norm" (SD3.5)
    dtype: Dtype = jnp.float32
    attention: str = "auto"     # layers.ATTENTION (model.attention)

    @nn.compact
    def __call__(self, x, c=None, c_mask=None):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        b, n, _ = x.shape
        hd = self.dim // self.heads
        dense = lambda name: Dense(self.dim, dtype=self.dtype, name=name)  # noqa: E731

        def heads(t, length):
            return t.reshape(b, length, self.heads, hd)

        q, k, v = (heads(dense(nm)(x), n) for nm in ("to_q", "to_k", "to_v"))
        if self.qk_norm == "rms_norm":
            q, k = RMSNorm(name="norm_q")(q), RMSNorm(name="norm_k")(k)
        if c is None:
            return dense("to_out_0")(attention(q, k, v, implementation=self.attention).reshape(b, n, self.dim)), None
        m = c.shape[1]
        cq, ck, cv = (heads(dense(nm)(c), m) for nm in ("add_q_proj", "add_k_proj", "add_v_proj"))
        if self.qk_norm == "rms_norm":
            cq, ck = RMSNorm(name="norm_added_q")(cq), RMSNorm(name="norm_added_k")(ck)
        key_mask = None
        if c_mask is not None:
            key_mask = jnp.concatenate([jnp.ones((b, n), bool), c_mask.astype(bool)], axis=1)
        out = attention(jnp.concatenate([q, cq], 1), jnp.concatenate([k, ck], 1), jnp.concatenate([v, cv], 1),
                        key_mask, self.attention).reshape(b, n + m, self.dim)
        x_out = dense("to_out_0")(out[:, :n])
        c_out = None if self.context_pre_only else dense("to_add_out")(out[:, n:])
        return x_out, c_out


class AdaLayerNormZeroX(nn.Module):
    """diffusers `SD35AdaLayerNormZeroX`: SiLU -> linear(9D) -> the six adaLN-Zero outputs plus a
    second (shift, scale, gate) for `attn2`, both modulating the same affine-free LayerNorm."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        mod = Dense(9 * self.dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear")(nn.silu(emb))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = jnp.split(mod, 9, axis=-1)
        nx = layer_norm(x)
        return (modulate(nx, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(nx, shift_msa2, scale_msa2), gate_msa2)


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock` (MMDiT; MMDiT-X with `use_dual_attention`)."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    context_pre_only: bool = False
    qk_norm: str | None = None
    dtype: Dtype = jnp.float32
    use_dual_attention: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, c, temb, c_mask=None):
        hidden = int(self.dim * self.mlp_ratio)
        if self.use_dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = AdaLayerNormZeroX(
                self.dim, self.dtype, name="norm1")(x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(self.dim, self.dtype, name="norm1")(x, temb)
        if self.context_pre_only:
            nc = AdaLayerNormContinuous(self.dim, self.dtype, name="norm1_context")(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
                self.dim, self.dtype, name="norm1_context")(c, temb)
        attn_x, attn_c = JointAttention(self.dim, self.heads, self.context_pre_only, self.qk_norm, self.dtype,
                                        self.attention, name="attn")(nx, nc, c_mask)
        x = x + gate_msa[:, None] * attn_x
        if self.use_dual_attention:
            attn_x2, _ = JointAttention(self.dim, self.heads, qk_norm=self.qk_norm, dtype=self.dtype,
                                        attention=self.attention, name="attn2")(nx2)
            x = x + gate_msa2[:, None] * attn_x2
        h = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * FeedForward(self.dim, hidden, self.dtype, name="ff")(h)
        x = constrain(x, TOKENS)  # block boundary (ng_jax.sharding)
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * attn_c
        h = layer_norm(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * FeedForward(self.dim, hidden, self.dtype, name="ff_context")(h)
        return x, constrain(c, TOKENS)


def sincos_pos_table(dim: int, grid_h: int, grid_w: int, base_size: int, rows=None, cols=None) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed(dim, (grid_h, grid_w), base_size)` (interpolation 1):
    [grid_h * grid_w, dim], rows then columns; each axis' positions are `arange(n) / (n / base_size)`;
    the first half of the channels encodes the column, the second half the row.

    `rows` / `cols` (integer indices into the grid) give only that sub-grid, e.g. a centre crop,
    without building the whole table (SD3.5-M's is 384 x 384 x 1536)."""
    rows = np.arange(grid_h) if rows is None else np.asarray(rows)
    cols = np.arange(grid_w) if cols is None else np.asarray(cols)
    pos_h = rows.astype(np.float64) / (grid_h / base_size)
    pos_w = cols.astype(np.float64) / (grid_w / base_size)
    gw, gh = np.meshgrid(pos_w, pos_h)  # [h, w]
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Strided-conv patchify plus a fixed sin-cos table (diffusers `PatchEmbed`).

    With `pos_embed_max_size` the table is built once for a `max x max` grid with
    `base_size = sample_size // patch_size` and centre-cropped to the latent's grid (SD3's
    `cropped_pos_embed`: top = (max - h) // 2, left = (max - w) // 2; larger grids are an error).
    Without it, the table is built for the (h, w) grid itself with `base_size` (diffusers'
    interpolated table). `base_size=None` keeps the toy model's convention (base = the grid size).
    """

    dim: int
    patch_size: int
    pos_embed_max_size: int | None = None
    base_size: int | None = None
    dtype: Dtype = jnp.float32

    def table(self, h: int, w: int) -> np.ndarray:
        """The [h * w, dim] position table added to an (h, w) grid of patches."""
        mx = self.pos_embed_max_size
        if mx is not None:
            if h > mx or w > mx:
                raise ValueError(f"patch grid {h}x{w} is larger than pos_embed_max_size={mx}")
            top, left = (mx - h) // 2, (mx - w) // 2
            return sincos_pos_table(self.dim, mx, mx, self.base_size or mx, rows=np.arange(top, top + h),
                                    cols=np.arange(left, left + w))
        if self.base_size is None:  # the toy model's table (square grids)
            size = max(h, w)
            table = sincos_2d_pos_embed(self.dim, size).reshape(size, size, self.dim)
            top, left = (size - h) // 2, (size - w) // 2
            return table[top:top + h, left:left + w].reshape(h * w, self.dim)
        return sincos_pos_table(self.dim, h, w, self.base_size)

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(x)
        b, h, w, d = x.shape
        pos = jnp.asarray(self.table(h, w)[None], x.dtype)
        return x.reshape(b, h * w, d) + pos


class CombinedTimestepTextEmbed(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, pooled):
        temb = MLPEmbedder(self.dim, self.dtype, name="timestep_embedder")(timestep_embedding(t, 256).astype(self.dtype))
        return temb + MLPEmbedder(self.dim, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


def block_runs(depth: int, dual_attention_layers: Sequence[int] = (), scan_blocks: bool = False
               ) -> list[tuple[int, int, bool, bool]]:
    """How the `depth` blocks are laid out: `[(start, stop, use_dual_attention, context_pre_only)]`.

    Unscanned, every block is its own run. Scanned, consecutive blocks with the same structure are
    one run (the context-pre-only last block is always alone). A run of length >= 2 is a scan.
    """
    dual = set(int(i) for i in dual_attention_layers)
    flags = [(i in dual, i == depth - 1) for i in range(depth)]
    runs: list[tuple[int, int, bool, bool]] = []
    for i, f in enumerate(flags):
        if scan_blocks and runs and (runs[-1][2], runs[-1][3]) == f and not f[1]:
            runs[-1] = (runs[-1][0], i + 1) + f
        else:
            runs.append((i, i + 1) + f)
    return runs


def block_name(start: int, stop: int) -> str:
    """Parameter-tree name of a run of blocks: `transformer_blocks_{i}` or `transformer_blocks_{a}_to_{b}`."""
    return f"transformer_blocks_{start}" if stop - start == 1 else f"transformer_blocks_{start}_to_{stop - 1}"


class _ScanBody(nn.Module):
    """One block as an `nn.scan` body: carry (image, text), broadcast (temb, mask)."""

    block_kwargs: Any  # a tuple of (name, value) pairs for JointTransformerBlock
    remat: bool = False

    @nn.compact
    def __call__(self, carry, temb, mask):
        cls = nn.remat(JointTransformerBlock, prevent_cse=False) if self.remat else JointTransformerBlock
        x, c = cls(**dict(self.block_kwargs), name="block")(carry[0], carry[1], temb, mask)
        return (x, c), None


class MMDiT(nn.Module):
    """`__call__(x [B,H,W,C], t [B], tokens [B,L,Dc], pooled [B,Dp], mask [B,L] | None) -> [B,H,W,C_out]`.

    `use_text_mask=False` ignores `mask` (diffusers' SD3 attends to every text token, padding
    included); the toy model masks padded tokens out.
    """

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
    dual_attention_layers: tuple[int, ...] = ()
    scan_blocks: bool = False
    use_text_mask: bool = True
    attention: str = "auto"     # layers.ATTENTION: the implementation of every attention call (model.attention)

    @nn.compact
    def __call__(self, x, t, tokens, pooled, mask=None):
        b, hgt, wid, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        out_ch = self.out_channels or self.in_channels
        if hgt % p or wid % p:
            raise ValueError(f"image {hgt}x{wid} is not divisible by patch_size={p}")
        mask = mask if self.use_text_mask else None
        h = PatchEmbed(d, p, self.pos_embed_max_size, self.base_size, self.dtype, name="pos_embed")(x.astype(self.dtype))
        temb = CombinedTimestepTextEmbed(d, self.dtype, name="time_text_embed")(t, pooled)
        c = Dense(d, dtype=self.dtype, name="context_embedder")(tokens.astype(self.dtype))
        h, c = constrain(h, TOKENS), constrain(c, TOKENS)
        block_cls = nn.remat(JointTransformerBlock, static_argnums=()) if self.remat else JointTransformerBlock
        for start, stop, dual, pre_only in block_runs(self.depth, self.dual_attention_layers, self.scan_blocks):
            kwargs = dict(dim=d, heads=self.num_heads, mlp_ratio=self.mlp_ratio, context_pre_only=pre_only,
                          qk_norm=self.qk_norm, dtype=self.dtype, use_dual_attention=dual, attention=self.attention)
            if stop - start == 1:
                h, c = block_cls(**kwargs, name=block_name(start, stop))(h, c, temb, mask)
            else:
                scan = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                               in_axes=(nn.broadcast, nn.broadcast), length=stop - start)
                (h, c), _ = scan(tuple(sorted(kwargs.items())), self.remat, name=block_name(start, stop))(
                    (h, c), temb, mask)
        h = AdaLayerNormContinuous(d, self.dtype, name="norm_out")(h, temb)
        h = Dense(p * p * out_ch, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        gh, gw = hgt // p, wid // p
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, hgt, wid, out_ch).astype(jnp.float32)
