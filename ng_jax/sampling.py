"""Samplers for the velocity-model contract `apply_fn(params, x_t, sigma[B], cond) -> v`.

`make_sampler` closes over the static sampling configuration and returns a pure function that
runs the whole trajectory as one `lax.scan`, so it can be jitted, sharded and differentiated.
It covers what the rollouts and the paper's analyses need (docs/ALGORITHMS.md sec 1 and 6):

- the Euler ODE on the (shifted) sigma grid, with classifier-free guidance in one batched call
  and optional CFG-rescale (sec 6, item 7);
- the flow SDE of Flow-GRPO / AWM on a sigma window, with per-step Gaussian log-probabilities;
- per-step velocity scales `alpha_k` (`x_{k+1} = x_k + dsigma_k * alpha_k * v_k`): the gradient of
  a reward of x0 with respect to them is the adjoint sensitivity (sec 6, item 3);
- the inference-time renormalisation baseline `v <- v * ||v_ref|| / ||v||` (sec 6, item 2) and
  the per-step norms of policy and reference velocities (sec 6, item 1).

The final x0 is returned unclipped; callers clip (or use `to_uint8`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import flow

RECORD_OPTIONS = ("x0", "trajectory", "velocities", "norms", "log_probs")
# Denominator of the SDE noise scale s_i = a * sqrt(sigma / (1 - sigma)) is kept below 1 by this.
SDE_SIGMA_CAP = 1.0 - 1e-3
# Guards divisions by a (numerically) zero norm or std.
_TINY = 1e-12


# ----------------------------------------------------------------------------------------------
# Guidance and image conversion


def cfg_combine(v_u: jax.Array, v_c: jax.Array, w) -> jax.Array:
    """Classifier-free guidance `v_u + w * (v_c - v_u)`."""
    return v_u + w * (v_c - v_u)


def _per_sample_std(x: jax.Array) -> jax.Array:
    axes = tuple(range(1, x.ndim))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.std(x, axis=axes, keepdims=True)


def cfg_rescale(v_cfg: jax.Array, v_c: jax.Array, phi) -> jax.Array:
    """CFG-rescale (Lin et al. 2023): `phi * v_cfg * std(v_c) / std(v_cfg) + (1 - phi) * v_cfg`.

    Standard deviations are per sample over every non-batch dimension.
    """
    ratio = _per_sample_std(v_c) / jnp.maximum(_per_sample_std(v_cfg), _TINY)
    return (phi * ratio + (1.0 - phi)) * v_cfg


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats to uint8 [0, 255] (clipped, rounded)."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def from_uint8(u: jax.Array) -> jax.Array:
    """uint8 [0, 255] to float32 [-1, 1] (`u / 127.5 - 1`)."""
    return jnp.asarray(u).astype(jnp.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# The sampler


@flax.struct.dataclass
class SampleOutput:
    """What a sampler returns; fields that were not recorded are None.

    x0 [B, ...]; sigmas [S + 1] (the grid); trajectory [S + 1, B, ...] (from the initial noise);
    velocities [S, B, ...] (after guidance and renormalisation, before the step scales);
    norms_policy / norms_ref [S, B]; log_probs [S, B] (zero on ODE steps).
    """

    x0: jax.Array
    sigmas: jax.Array
    trajectory: Optional[jax.Array] = None
    velocities: Optional[jax.Array] = None
    norms_policy: Optional[jax.Array] = None
    norms_ref: Optional[jax.Array] = None
    log_probs: Optional[jax.Array] = None


def _concat_batch(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def make_sampler(apply_fn: Callable, *, num_steps: int, shift: float = 1.0, mu: Optional[float] = None,
                 s_min: Optional[float] = None,
                 cfg_scale: float = 1.0, cfg_rescale_phi: float = 0.0, sde_noise: float = 0.0,
                 sde_window: Sequence[float] = (0.0, 1.0), renorm_to_ref: bool = False,
                 record: Sequence[str] = ("x0",)) -> Callable:
    """Builds `sample_fn(params, noise, cond, uncond=None, rng=None, *, ref_params=None,
    step_scales=None) -> SampleOutput`.

    - Grid: `flow.sigma_grid(num_steps, shift, mu, s_min)`. Step i moves sigma_i -> sigma_{i+1}.
      `s_min=None` ends the unshifted linspace at 1/N; diffusers' FlowMatchEulerDiscreteScheduler
      `set_timesteps(N)` (the SD3 pipeline's default) ends it at `flow.shift_sigmas(1/1000, shift)`.
    - Guidance: with `cfg_scale != 1` the conditional and unconditional velocities come from one
      call on the batch `[x; x]` with `[cond; uncond]` (any pytree with a leading batch dim), then
      `cfg_combine` and, with `cfg_rescale_phi > 0`, `cfg_rescale`. `uncond` is required then.
    - Flow SDE (ALGORITHMS sec 1) with noise level `a = sde_noise > 0` on the steps whose sigma_i
      lies in `sde_window = (lo, hi)` (inclusive), except the last step which is always the ODE:
      `x' = x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dsigma + s sqrt(|dsigma|) z`,
      `s = a sqrt(sigma / (1 - sigma_c))`. As in Flow-GRPO's SD3 SDE step, `sigma_c` is sigma with
      sigma = 1 replaced by the grid's next value; it is also capped at SDE_SIGMA_CAP. Needs `rng`.
    - `step_scales` [num_steps] (default ones) multiply the velocity of each step (ODE and SDE):
      `jax.grad` of a function of x0 with respect to them is the adjoint sensitivity.
    - `renorm_to_ref`: each step's guided policy velocity is rescaled per sample to the norm of
      the reference velocity (same guidance, `ref_params`), which is then required.
    - `record`: any of RECORD_OPTIONS. "norms" records the policy norm before renormalisation
      and, when `ref_params` is given, the reference norm (else norms_ref is None).
      "log_probs" is the Gaussian log-density of each SDE step's sample given its mean, summed
      over the non-batch dimensions (Flow-GRPO averages instead); zero on ODE steps.
    """
    num_steps = int(num_steps)
    record = tuple(record)
    unknown = set(record) - set(RECORD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown record options {sorted(unknown)}; choose from {RECORD_OPTIONS}")
    lo, hi = (float(w) for w in sde_window)
    guided = float(cfg_scale) != 1.0
    use_sde = float(sde_noise) > 0.0

    grid = np.asarray(jax.device_get(flow.sigma_grid(num_steps, shift=shift, mu=mu, s_min=s_min)), np.float32)
    sig, sig_next = grid[:-1], grid[1:]
    sde_active = (sig >= lo) & (sig <= hi) & (sig_next > 0.0) if use_sde else np.zeros(num_steps, bool)
    # sigma = 1 uses the grid's next value in the SDE denominator (Flow-GRPO); capped below 1.
    sig_c = np.minimum(np.where(sig >= 1.0, grid[1] if num_steps > 1 else SDE_SIGMA_CAP, sig), SDE_SIGMA_CAP)
    s_noise = np.where(sde_active, float(sde_noise) * np.sqrt(sig / (1.0 - sig_c)), 0.0).astype(np.float32)

    want_traj = "trajectory" in record
    want_vel = "velocities" in record
    want_norms = "norms" in record
    want_lp = "log_probs" in record

    def velocity(params, x, sigma, cond, uncond):
        b = x.shape[0]
        s = jnp.full((b,), sigma, jnp.float32)
        if not guided:
            return apply_fn(params, x, s, cond)
        v = apply_fn(params, jnp.concatenate([x, x], 0), jnp.concatenate([s, s], 0), _concat_batch(cond, uncond))
        v_c, v_u = v[:b], v[b:]
        out = cfg_combine(v_u, v_c, cfg_scale)
        if cfg_rescale_phi > 0.0:
            out = cfg_rescale(out, v_c, cfg_rescale_phi)
        return out

    def sample_fn(params, noise, cond, uncond=None, rng=None, *, ref_params=None, step_scales=None) -> SampleOutput:
        if guided and uncond is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional embedding `uncond`")
        if use_sde and rng is None:
            raise ValueError(f"sde_noise={sde_noise} needs an `rng` key")
        if renorm_to_ref and ref_params is None:
            raise ValueError("renorm_to_ref=True needs `ref_params`")
        need_ref = ref_params is not None and (renorm_to_ref or want_norms)
        if step_scales is None:
            step_scales = jnp.ones((num_steps,), jnp.float32)
        step_scales = jnp.asarray(step_scales)
        if step_scales.shape != (num_steps,):
            raise ValueError(f"step_scales must have shape ({num_steps},), got {step_scales.shape}")
        keys = jax.random.split(rng, num_steps) if use_sde else jnp.zeros((num_steps,), jnp.uint32)
        xs = (jnp.asarray(sig), jnp.asarray(sig_next), step_scales, jnp.asarray(s_noise),
              jnp.asarray(sde_active), keys)

        def step(x, inp):
            sigma, sigma_next, alpha, s_i, active, key = inp
            v_pol = velocity(params, x, sigma, cond, uncond)
            v_ref = velocity(ref_params, x, sigma, cond, uncond) if need_ref else None
            v = v_pol
            if renorm_to_ref:
                ratio = flow.per_sample_norm(v_ref) / jnp.maximum(flow.per_sample_norm(v_pol), _TINY)
                v = v_pol * ratio.reshape((-1,) + (1,) * (v_pol.ndim - 1)).astype(v_pol.dtype)
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            va = alpha * v.astype(xf.dtype)
            dsigma = sigma_next - sigma
            ys = {}
            if use_sde:  # s_i = 0 on ODE steps, where this is the Euler step
                mean, std = flow.sde_step(xf, va, sigma, dsigma, s_i)
                z = jax.random.normal(key, x.shape, xf.dtype)
                x_next = jnp.where(active, mean + std * z, mean)
                if want_lp:
                    lp = flow.gaussian_log_prob(jax.lax.stop_gradient(x_next), mean, jnp.where(active, std, 1.0))
                    ys["log_probs"] = jnp.where(active, lp, 0.0)
            else:
                x_next = xf + va * dsigma
                if want_lp:
                    ys["log_probs"] = jnp.zeros((x.shape[0],), jnp.float32)
            x_next = x_next.astype(x.dtype)
            if want_traj:
                ys["trajectory"] = x_next
            if want_vel:
                ys["velocities"] = v
            if want_norms:
                ys["norms_policy"] = flow.per_sample_norm(v_pol)
                if need_ref:
                    ys["norms_ref"] = flow.per_sample_norm(v_ref)
            return x_next, ys

        x0, ys = jax.lax.scan(step, noise, xs)
        traj = ys.get("trajectory")
        if traj is not None:
            traj = jnp.concatenate([noise[None], traj], axis=0)
        return SampleOutput(x0=x0, sigmas=jnp.asarray(grid), trajectory=traj, velocities=ys.get("velocities"),
                            norms_policy=ys.get("norms_policy"), norms_ref=ys.get("norms_ref"),
                            log_probs=ys.get("log_probs"))

    return sample_fn


def euler_sample(apply_fn: Callable, params, noise: jax.Array, cond, num_steps: int, shift: float = 1.0) -> jax.Array:
    """Unguided Euler ODE sample from `noise`; returns x0 (unclipped)."""
    return make_sampler(apply_fn, num_steps=num_steps, shift=shift)(params, noise, cond).x0
