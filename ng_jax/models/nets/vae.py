"""The SD3/SD3.5/FLUX image autoencoder (diffusers `AutoencoderKL`) in Flax linen, NHWC.

    vae = make_vae(VAEConfig(...))                  # or ng_jax.models.weights.vae.load_vae(WEIGHTS_DIR)
    params = vae.init(rng)
    dist = vae.encode(params, images)               # images [B, H, W, 3] in [-1, 1] -> LatentDist
    z = vae.to_model_latents(dist.mode())           # what the velocity model sees (SD3/FLUX pipelines)
    images = vae.decode(params, vae.from_model_latents(z))

Architecture as diffusers 0.39 builds it (`Encoder`/`Decoder` in models/autoencoders/vae.py):
conv_in -> DownEncoderBlock2D x n (ResnetBlock2D x layers_per_block, then a stride-2 3x3 conv on a
bottom/right zero pad except in the last block) -> mid block (resnet, single-head attention with its
own GroupNorm and a residual, resnet) -> GroupNorm + SiLU -> conv_out to 2 * latent channels (mean,
logvar); the decoder mirrors it with layers_per_block + 1 resnets per up block and nearest x2
upsampling followed by a 3x3 conv. Every GroupNorm has eps 1e-6. SD3 and FLUX have no
quant_conv/post_quant_conv (`use_quant_conv=False`); the SD1/SDXL layout with them is supported too.

Submodule names mirror diffusers' state-dict keys (`encoder/down_blocks_0/resnets_1/conv2`,
`decoder/mid_block/attentions_0/to_out_0`, ...), so vae_weights.vae_keymap is a mechanical renaming.
Normalisation statistics and attention logits are computed in float32 whatever the compute dtype.
Not ported: tiled/sliced encoding (diffusers' `enable_tiling`), `latents_mean`/`latents_std`
(unused by SD3/FLUX), and `force_upcast` (choose the compute dtype instead).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ng_jax.models.nets.layers import attention

Dtype = Any
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers `AutoencoderKL` config fields that shape the network (defaults: SD3's VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class LatentDist:
    """diffusers' `DiagonalGaussianDistribution` (NHWC): logvar clamped to [-30, 20] as there."""

    mean: jax.Array
    logvar: jax.Array

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng) -> jax.Array:
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None, stride: int = 1, padding=None):
    pad = kernel // 2 if padding is None else padding
    pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def _group_norm(groups: int, dtype: Dtype, name: str):
    # use_fast_variance=False: E[(x - mean)^2] like torch, not E[x^2] - mean^2 (cancellation on large activations).
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus a 1x1 conv shortcut when
    the channel count changes (diffusers `ResnetBlock2D` with temb=None, output_scale_factor=1)."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Zero-pad one row at the bottom and one column on the right, then a stride-2 3x3 conv
    (diffusers `Downsample2D(padding=0)`: F.pad(x, (0, 1, 0, 1)))."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (F.interpolate(mode="nearest")) then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention (diffusers `Attention(..., norm_num_groups, residual_connection=True,
    _from_deprecated_attn_block=True)`): GroupNorm, one head of width C over the H*W positions,
    to_out_0, residual; rescale_output_factor is 1 in the VAE."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, hgt * wid, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attention(q, k, v).reshape(b, hgt * wid, c))
        return x + out.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D(num_layers=1): resnet -> [attention] -> resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        resnet = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        attn = nn.remat(SpatialSelfAttention) if self.remat else SpatialSelfAttention
        x = resnet(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = attn(self.groups, self.dtype, name="attentions_0")(x)
        return resnet(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class ResnetStack2D(nn.Module):
    """diffusers' DownEncoderBlock2D (resample "down": then `downsamplers_0`) and UpDecoderBlock2D
    (resample "up": then `upsamplers_0`): `layers` ResnetBlock2D, then the optional resampler."""

    channels: int
    groups: int
    layers: int
    resample: str = ""  # "", "down" or "up"
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        resnet = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        for j in range(self.layers):
            x = resnet(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class _Coder(nn.Module):
    """What the encoder and the decoder are built from."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False


class Encoder(_Coder):
    """images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (mean, logvar)."""

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.dtype
        g = cfg.norm_num_groups
        x = _conv(cfg.block_out_channels[0], 3, dt, "conv_in")(x.astype(dt))
        last = len(cfg.block_out_channels) - 1
        for i, ch in enumerate(cfg.block_out_channels):
            x = ResnetStack2D(ch, g, cfg.layers_per_block, "down" if i != last else "", dt, self.remat,
                              name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.block_out_channels[-1], g, cfg.mid_block_add_attention, dt, self.remat, name="mid_block")(x)
        x = nn.silu(_group_norm(g, dt, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, dt, "conv_out")(x)


class Decoder(_Coder):
    """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.cfg, self.dtype
        g = cfg.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = _conv(chans[0], 3, dt, "conv_in")(z.astype(dt))
        x = MidBlock(chans[0], g, cfg.mid_block_add_attention, dt, self.remat, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = ResnetStack2D(ch, g, cfg.layers_per_block + 1, "up" if i != len(chans) - 1 else "", dt, self.remat,
                              name=f"up_blocks_{i}")(x)
        x = nn.silu(_group_norm(g, dt, "conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """Parameters {encoder, decoder[, quant_conv][, post_quant_conv]} as diffusers names them."""

    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.dtype, self.remat)
        self.decoder = Decoder(cfg, self.dtype, self.remat)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, None)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, None)

    def encode(self, x):
        moments = self.encoder(x)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x, z):
        """Both halves (so `init` creates every parameter)."""
        return self.encode(x), self.decode(z)


@dataclasses.dataclass(frozen=True)
class VAE:
    """A pure functional face for the module: `encode`/`decode` take the parameter pytree."""

    module: AutoencoderKL

    @property
    def cfg(self) -> VAEConfig:
        return self.module.cfg

    def init(self, rng, image_size: int | None = None):
        size = image_size or 2 * self.cfg.downsample_factor
        f = self.cfg.downsample_factor
        x = jnp.zeros((1, size, size, self.cfg.in_channels), jnp.float32)
        z = jnp.zeros((1, size // f, size // f, self.cfg.latent_channels), jnp.float32)
        return self.module.init(rng, x, z)["params"]

    def encode(self, params, images) -> LatentDist:
        """images [B, H, W, C] in [-1, 1] (H, W multiples of the downsample factor) -> LatentDist (float32)."""
        mean, logvar = self.module.apply({"params": params}, images, method=AutoencoderKL.encode)
        return LatentDist(mean, logvar)

    def decode(self, params, latents) -> jax.Array:
        """VAE-space latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C] (float32, about [-1, 1])."""
        return self.module.apply({"params": params}, latents, method=AutoencoderKL.decode)

    def to_model_latents(self, z):
        return to_model_latents(z, self.cfg)

    def from_model_latents(self, z):
        return from_model_latents(z, self.cfg)


def to_model_latents(z, cfg: VAEConfig):
    """VAE latents -> the diffusion model's latent space: (z - shift_factor) * scaling_factor (SD3/FLUX)."""
    return (z - cfg.shift_factor) * cfg.scaling_factor


def from_model_latents(z, cfg: VAEConfig):
    """Inverse of to_model_latents, applied before `decode`: z / scaling_factor + shift_factor."""
    return z / cfg.scaling_factor + cfg.shift_factor


def make_vae(cfg: VAEConfig, dtype: Dtype = jnp.float32, remat: bool = False) -> VAE:
    return VAE(AutoencoderKL(cfg, dtype, remat))
