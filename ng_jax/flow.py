"""Rectified-flow maths: interpolation, velocity targets, sigma grids and shifts, timestep sampling.

Conventions (docs/ALGORITHMS.md sec 1): `sigma` in [0, 1] with `sigma = 1` pure noise,
`x_t = (1 - sigma) x0 + sigma eps`, target velocity `u = eps - x0`, clean estimate
`x0_hat = x_t - sigma v`, and sampling integrates sigma from 1 down to 0.

Plain `jax.numpy`, batch first. `sigma` is a scalar or one value per sample ([B]) and is broadcast
over the trailing dimensions. Sizes (`num_steps`, `batch`, `num_slots`, a grid's length) are
static Python ints, so every function here can be jitted. Imports nothing of the project.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Added before flooring `fraction * n`, so that e.g. 0.29 * 100 = 28.999999999999996 keeps 29.
_FLOOR_EPS = 1e-9


# ----------------------------------------------------------------------------------------------
# Interpolation and per-sample reductions


def _per_sample(sigma, x: jax.Array) -> jax.Array:
    """`sigma` (scalar or [B]) reshaped to broadcast against `x` [B, ...]."""
    sigma = jnp.asarray(sigma)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or (x.ndim and sigma.shape[0] != x.shape[0]):
        raise ValueError(f"sigma must be a scalar or have shape [B]={x.shape[:1]}, got {sigma.shape}")
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))


def interpolate(x0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """`x_t = (1 - sigma) * x0 + sigma * noise`."""
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The rectified-flow target `u = noise - x0`."""
    return noise - x0


def x0_from_velocity(x_t: jax.Array, sigma, v: jax.Array) -> jax.Array:
    """Clean estimate `x0_hat = x_t - sigma * v`."""
    return x_t - _per_sample(sigma, x_t) * v


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# Guards the division by ||v_ref|| in the norm ratio and the relative NormGuard penalty when a
# reference velocity is (numerically) zero.
NORM_EPS = 1e-8


def per_sample_sq_norm(x: jax.Array) -> jax.Array:
    """Squared L2 norm over every non-batch dimension, [B] (float32 at least)."""
    x = _at_least_f32(jnp.asarray(x))
    return jnp.sum(jnp.square(x), axis=_reduce_axes(x))


def per_sample_norm(x: jax.Array) -> jax.Array:
    """Zero-safe L2 norm over every non-batch dimension: [B, ...] -> [B] (float32 at least).

    The ONE norm of the project: training (the NormGuard hinge, the train-time norm ratio) and
    evaluation (the norm ratio along sampling trajectories) both use it. `sqrt` has an infinite
    derivative at 0, so `grad ||x||` at `x == 0` would be NaN; here the square root only ever sees
    positive inputs and the gradient at `x == 0` is exactly 0.
    """
    sq = per_sample_sq_norm(x)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def norm_ratio(norm, norm_ref):
    """`||v|| / max(||v_ref||, NORM_EPS)` from per-sample norms (the paper's headline measurement)."""
    return norm / jnp.maximum(norm_ref, NORM_EPS)


def per_sample_mean(x: jax.Array) -> jax.Array:
    """Mean over every non-batch dimension, [B] (float32 at least)."""
    x = _at_least_f32(jnp.asarray(x))
    return jnp.mean(x, axis=_reduce_axes(x))


# ----------------------------------------------------------------------------------------------
# Shifts and the sampling grid


def shift_sigmas(s, shift):
    """SD3's resolution shift `shift * s / (1 + (shift - 1) * s)` (identity at shift = 1)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flux_mu(num_tokens, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
            max_tokens: int = 4096):
    """FLUX's shift `mu`, linear in the image token count (base_shift at base_tokens)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens - base_tokens)


def time_shift_exp(mu, s):
    """FLUX's exponential shift `exp(mu) / (exp(mu) + (1 / s - 1))`."""
    e = jnp.exp(jnp.asarray(mu, jnp.float32))
    return e / (e + (1.0 / s - 1.0))


def sigma_grid(num_steps: int, shift=1.0, mu=None, s_min=None) -> jax.Array:
    """The sampling grid, float32 [num_steps + 1], from 1 down to a final 0.

    `s = linspace(1, s_min, num_steps)` with `s_min = 1 / num_steps` by default (the FLUX pipelines'
    grid), then `time_shift_exp(mu, s)` when `mu` is given (and `shift` is ignored, as in
    diffusers' dynamic shifting), else `shift_sigmas(s, shift)`; a final 0 is appended.

    diffusers' FlowMatchEulerDiscreteScheduler `set_timesteps(N)` without explicit sigmas (what
    the SD3 pipeline and Flow-GRPO's SD3 rollout use) ends the linspace at the scheduler's
    smallest training sigma instead: pass `s_min=shift_sigmas(1 / 1000, shift)` to reproduce it.
    """
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    end = 1.0 / num_steps if s_min is None else s_min
    s = jnp.linspace(1.0, end, num_steps, dtype=jnp.float32)
    sig = time_shift_exp(mu, s) if mu is not None else shift_sigmas(s, shift)
    return jnp.concatenate([sig.astype(jnp.float32), jnp.zeros((1,), jnp.float32)])


# ----------------------------------------------------------------------------------------------
# Training-timestep sampling


def sample_logit_normal(rng: jax.Array, shape, mean=0.0, std=1.0, shift=1.0) -> jax.Array:
    """`sigmoid(mean + std * N(0, 1))`, then `shift_sigmas(., shift)` (identity at shift = 1)."""
    z = jax.random.normal(rng, tuple(shape), jnp.float32)
    return shift_sigmas(jax.nn.sigmoid(mean + std * z), shift)


def _prefix_len(fraction: float, n: int) -> int:
    return int(math.floor(float(fraction) * n + _FLOOR_EPS))


def permuted_grid_timesteps(rng: jax.Array, grid: jax.Array, batch: int, fraction: float) -> jax.Array:
    """DiffusionNFT's training timesteps: [K, batch], each column its own random order of grid[:K].

    `grid` is the rollout grid without its final 0 (length N), `K = max(1, int(fraction * N))`
    (as DiffusionNFT's `int(num_steps * timestep_fraction)`). Callers slice the first T rows.
    """
    grid = jnp.asarray(grid)
    n = grid.shape[0]
    k = min(n, max(1, _prefix_len(fraction, n)))
    keys = jax.random.split(rng, int(batch))
    order = jax.vmap(lambda key: jax.random.permutation(key, k))(keys)  # [batch, K]
    return grid[:k][order].T


def stratified_slot_timesteps(rng: jax.Array, grid: jax.Array, num_slots: int, fraction: float) -> jax.Array:
    """AWM's training timesteps: [num_slots] grid values, one drawn uniformly per stratum.

    The prefix grid[:K], `K = min(N, max(num_slots, round(fraction * N)))`, is split into
    `num_slots` contiguous strata of indices (sizes as `np.array_split`); one index is drawn
    uniformly inside each stratum.
    """
    grid = jnp.asarray(grid)
    n, num_slots = grid.shape[0], int(num_slots)
    if not 1 <= num_slots <= n:
        raise ValueError(f"num_slots must be in [1, {n}] (the grid length), got {num_slots}")
    k = min(n, max(num_slots, int(round(float(fraction) * n))))
    sizes = np.full(num_slots, k // num_slots, np.int32)
    sizes[: k % num_slots] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    u = jax.random.uniform(rng, (num_slots,), jnp.float32)
    offset = jnp.minimum(jnp.floor(u * sizes).astype(jnp.int32), sizes - 1)
    return grid[starts + offset]


# ----------------------------------------------------------------------------------------------
# The Flow-SDE step (docs/ALGORITHMS.md sec 1; flow_grpo's SDE sampler)


def sde_step(x: jax.Array, v: jax.Array, sigma, dsigma, s):
    """Mean and std of one Flow-SDE step from sigma to sigma + dsigma (dsigma < 0) with noise level s:
    `mean = x + (v + s^2 / (2 sigma) (x + (1 - sigma) v)) dsigma`, `std = s sqrt(|dsigma|)`; with s = 0
    the mean is the Euler step and the std 0."""
    mean = x + (v + (s ** 2 / (2.0 * sigma)) * (x + (1.0 - sigma) * v)) * dsigma
    std = s * jnp.sqrt(jnp.abs(dsigma))
    return mean, std


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std) -> jax.Array:
    """Per-sample log density of `x` under N(mean, std^2 I) (std a scalar or per sample), summed over every
    non-batch dimension: [B]."""
    r = (x - mean) / std
    dim = np.prod(x.shape[1:])
    return (-0.5 * jnp.sum(jnp.square(r), axis=_reduce_axes(x)) - dim * (jnp.log(std) + 0.5 * np.log(2.0 * np.pi)))
