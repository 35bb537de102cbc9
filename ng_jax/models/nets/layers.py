"""Building blocks shared by the text encoder and the MMDiT (Flax linen).

Submodule names follow diffusers' PyTorch modules (`linear_1`, `net_0/proj`, `norm1/linear`, ...)
so that a diffusers state dict maps onto these parameters by a mechanical renaming: PyTorch
`a.b.0.weight` -> `a/b_0/kernel` (transposed for linear layers).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.sharding import constrain

Dtype = Any
# Logical names of activations (ng_jax.sharding; constraints are no-ops outside a rules context).
TOKENS = ("batch", "seq", "embed")
HEADS = ("batch", "seq", "heads", "kv")


class Dense(nn.Module):
    """`flax.linen.Dense` (same `kernel` [in, out] and `bias` [out], same initialisers, dtype promotion
    and maths) computed as ONE 2-D matmul over the flattened leading dimensions.

    Why not `nn.Dense`: on [B, L, D] activations its kernel gradient is a dot contracting two
    dimensions, which XLA:CPU lowers with a transposing copy of the cotangent, and it fuses the whole
    elementwise residual-stream gradient (every later block's adds and gates) into each such copy,
    recomputing it once per weight matrix. That was ~40% of an SD3-MMDiT train step on CPU; flattening
    first makes the kernel gradient a plain `x2d^T @ g2d` and halved the backward (benchmarks/run.py,
    docs/PERFORMANCE.md). Parameters and results are those of `nn.Dense`.
    """

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())))
        return y.reshape(x.shape[:-1] + (self.features,)) + bias


def attention(q, k, v, key_mask=None):
    """Scaled dot-product attention. q [B, Lq, H, D], k/v [B, Lk, H, D], key_mask bool [B, Lk] or None.

    Logits and softmax run in float32 whatever the compute dtype (bf16 softmax loses the tail).
    Heads are moved next to the batch ([B, H, L, D]) so both products are plain batched matmuls, and
    q is scaled before the product (a [B, L, H, D] multiply instead of a [B, H, Lq, Lk] one): together
    3-9% off an SD3 forward / train step on XLA:CPU (benchmarks/run.py, docs/PERFORMANCE.md)."""
    q, k, v = (constrain(t, HEADS) for t in (q, k, v))
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * scale, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


class MultiHeadAttention(nn.Module):
    """Self-attention with a key-padding mask (the text encoder's; CLIP-style names)."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, _ = x.shape
        hd = self.width // self.heads
        dense = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(name)(x).reshape(b, n, self.heads, hd) for name in ("q_proj", "k_proj", "v_proj"))
        return dense("out_proj")(attention(q, k, v, mask).reshape(b, n, self.width))


class TransformerMLP(nn.Module):
    width: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=True)
        return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)


class RMSNorm(nn.Module):
    """RMS norm with a learned scale named `weight` (diffusers `RMSNorm`, SD3.5 qk-norm)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * w).astype(x.dtype)


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters (diffusers `elementwise_affine=False`), in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """SiLU -> linear(6D) -> (shift, scale, gate) for attention and MLP; weights zero-initialised so
    every block starts as the identity (adaLN-Zero)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        mod = Dense(6 * self.dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear")(nn.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        return modulate(layer_norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """SiLU -> linear(2D) -> (scale, shift) (diffusers' order) on an affine-free LayerNorm."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        mod = Dense(2 * self.dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear")(nn.silu(emb))
        scale, shift = jnp.split(mod, 2, axis=-1)
        return modulate(layer_norm(x), shift, scale)


class _GeluProj(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.gelu(Dense(self.hidden, dtype=self.dtype, name="proj")(x), approximate=True)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0.proj -> GELU(tanh) -> net.2."""

    dim: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = constrain(_GeluProj(self.hidden, self.dtype, name="net_0")(x), ("batch", "seq", "mlp"))
        return Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`, `PixArtAlphaTextProjection`)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(Dense(self.dim, dtype=self.dtype, name="linear_1")(x))
        return Dense(self.dim, dtype=self.dtype, name="linear_2")(x)


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal embedding of t [B] as diffusers `Timesteps(dim, flip_sin_to_cos=True, shift=0)`:
    [cos, sin] halves with frequencies exp(-log(max_period) * i / half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[pos.size, dim] float64 sin-cos features of positions `pos` (sines then cosines, frequencies
    1 / 10000^(2i / dim)): one axis of a 2D sin-cos table."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_pos_embed(dim: int, grid_size: int, base_size: int | None = None,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """Fixed 2D sin-cos position table [grid_size**2, dim] (rows then columns), as SD3's PatchEmbed."""
    base_size = base_size or grid_size
    pos = np.arange(grid_size, dtype=np.float64) / (grid_size / base_size) / interpolation_scale
    grid_w, grid_h = np.meshgrid(pos, pos)  # [h, w]: first varies along columns
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1).astype(np.float32)
