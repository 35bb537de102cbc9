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
from jax.sharding import PartitionSpec as P

from ng_jax import sharding
from ng_jax.sharding import constrain, logical_to_spec

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


# ------------------------------------------------------------------------------------------ attention

# `model.attention`: which implementation the models' one attention call runs (see `attention`).
ATTENTION = ("auto", "xla", "cudnn", "splash", "reference")
# ng_jax.plan only: the memory stand-in for a fused kernel when the plan compiles on CPU (`_plan_standin`).
PLAN_STANDIN = "plan_standin"
_SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried, largest first (multiples of the 128 lanes)


def resolve_attention(choice: str, backend: str | None = None, dtype=None, head_dim: int | None = None) -> str:
    """The implementation `choice` runs as on `backend` (default: JAX's default backend): "auto" is
    cuDNN flash attention on GPU (when cuDNN takes the inputs: bf16/fp16, head dim a multiple of 8 up
    to 128; else "reference"), splash attention on TPU, "reference" elsewhere. A name outside
    `ATTENTION`, and a fused kernel the backend lacks, are one-line ValueErrors."""
    if choice not in ATTENTION and choice != PLAN_STANDIN:
        raise ValueError(f"model.attention={choice!r}: expected one of {', '.join(ATTENTION)}")
    backend = backend or jax.default_backend()
    if choice == "auto":
        if backend == "tpu":
            return "splash"
        cudnn_ok = (dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)) and (
            head_dim is None or (head_dim % 8 == 0 and head_dim <= 128))
        return "cudnn" if backend == "gpu" and cudnn_ok else "reference"
    if choice == "splash" and backend != "tpu":
        raise ValueError(f"model.attention='splash' is the Pallas TPU kernel and needs a TPU; this backend is "
                         f"{backend!r} (use 'auto', 'xla' or 'reference')")
    if choice == "cudnn" and backend != "gpu":
        raise ValueError(f"model.attention='cudnn' is cuDNN flash attention and needs an NVIDIA GPU; this backend is "
                         f"{backend!r} (use 'auto', 'xla' or 'reference')")
    if choice == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention='cudnn' needs bfloat16 / float16 activations (model.dtype), got "
                         f"{jnp.dtype(dtype).name} (use 'auto', 'xla' or 'reference')")
    return choice


def attention(q, k, v, key_mask=None, implementation: str = "reference"):
    """Scaled dot-product attention. q [B, Lq, H, D], k/v [B, Lk, H, D], key_mask bool [B, Lk] or None.

    `implementation` (config `model.attention`, resolved by `resolve_attention`):
    - "reference": the einsum path below, the parity oracle. Logits and softmax run in float32 whatever
      the compute dtype (bf16 softmax loses the tail). Heads are moved next to the batch
      ([B, H, L, D]) so both products are plain batched matmuls, and q is scaled before the product
      (a [B, L, H, D] multiply instead of a [B, H, Lq, Lk] one): together 3-9% off an SD3 forward /
      train step on XLA:CPU (benchmarks/run.py, docs/PERFORMANCE.md). It materialises the
      [B, H, Lq, Lk] float32 logits (and their softmax) per call.
    - "xla" / "cudnn": `jax.nn.dot_product_attention(..., implementation=...)`; "xla" also materialises
      the logits, "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16 inputs) and does not.
    - "splash": the Pallas TPU splash-attention kernel (fused, blockwise; TPU only).
    - "auto": cudnn on GPU, splash on TPU, reference on CPU (bit-identical to "reference" there).
    The VAE and the text encoders keep the default, "reference"; the velocity models pass their config.
    """
    q, k, v = (constrain(t, HEADS) for t in (q, k, v))
    impl = resolve_attention(implementation, dtype=q.dtype, head_dim=q.shape[-1])
    if impl in ("xla", "cudnn"):
        mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    if impl == "splash":
        return _splash_attention(q, k, v, key_mask)
    if impl == PLAN_STANDIN:
        return _plan_standin(q, k, v)
    scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * scale, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


def _plan_standin(q, k, v):
    """NOT attention: what `ng_jax.plan` lowers on CPU in place of a fused kernel (cuDNN / splash), whose
    memory it stands in for. Same inputs and output, float32 accumulation, no [B, H, Lq, Lk] buffer (a
    [B, H, D, D] contraction instead), so XLA:CPU's memory analysis sees the fused kernel's footprint:
    q, k, v, the output and their gradients. Never used to run a model."""
    kv = jnp.einsum("bkhd,bkhe->bhde", k, v, preferred_element_type=jnp.float32)
    return jnp.einsum("bqhd,bhde->bqhe", q, kv.astype(q.dtype))


def _block(length: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_attention(q, k, v, key_mask, interpret: bool = False):
    """Splash attention (Pallas TPU kernel) on [B, L, H, D] inputs: sequences padded to multiples of 128
    (padded and masked keys get segment id 0, every query id 1, so no query attends to them), the
    kernel vmapped over the batch. Under the activation rules of `ng_jax.sharding`, it runs per shard
    (`jax.shard_map`: batch over the batch axes, heads over the heads axes, sequences whole).
    `interpret=True` runs the kernel in Pallas' interpreter (CPU tests)."""
    # Deferred: the Pallas TPU kernels are imported only where splash runs (a TPU, or a CPU test).
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, lq, h, d = q.shape
    lk = k.shape[1]
    lq_p, lk_p = -(-lq // 128) * 128, -(-lk // 128) * 128
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # the kernel does not scale
    valid = jnp.ones((b, lk), bool) if key_mask is None else key_mask.astype(bool)
    kv_ids = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, lk_p - lk)))
    q, k, v = (jnp.pad(t, ((0, 0), (0, n - t.shape[1]), (0, 0), (0, 0)))
               for t, n in ((q, lq_p), (k, lk_p), (v, lk_p)))

    def per_shard(q, k, v, kv_ids):
        bq, bkv = _block(lq_p), _block(lk_p)
        sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                  block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
        heads = q.shape[2]
        kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((lq_p, lk_p))] * heads),
                                        head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
        ids = splash.SegmentIds(q=jnp.ones(kv_ids.shape[:1] + (lq_p,), jnp.int32), kv=kv_ids)
        out = jax.vmap(kernel)(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)), ids)
        return out.transpose(0, 2, 1, 3)

    ctx = _rules_context()
    if ctx is None:
        out = per_shard(q, k, v, kv_ids)
    else:
        mesh, spec = ctx[0], logical_to_spec(HEADS, q.shape, *ctx, where="splash attention")
        qkv = P(spec[0], None, spec[2], None)  # sequences whole on every shard
        out = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, P(spec[0], None)), out_specs=qkv,
                            check_vma=False)(q, k, v, kv_ids)
    return out[:, :lq]


def _rules_context():
    """(mesh, rules) of the activation rules `ng_jax.sharding.constrain` uses, or None outside them."""
    return getattr(sharding._CONTEXT, "value", None)  # the context `sharding.axis_rules` sets (no public getter)


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
