"""Adjoint sensitivity of the reward to per-step velocity scales (ALGORITHMS.md sec 6).

The sampler multiplies step k's velocity by alpha_k (`step_scales`, all ones = the plain
sampler). With a differentiable reward R (the verifier's `soft_alignment` on the clipped image),
`J[b, k] = dR_b / d alpha_k` at alpha = 1 is one reverse pass per sample through the whole
sampling scan (`jax.jacrev`). Per step the analysis reports

- `mean`: the batch mean of J[:, k] (what a global per-step rescaling would gain),
- `spread`: the per-sample standard deviation,
- `sign_agreement`: the fraction of samples whose derivative has the sign of the mean,
- `coherence`: |mean| / spread. A coherent step (>> 1) would be fixable by one global scale;
  an incoherent one (<< 1) needs a per-sample, content-dependent correction, which is why
  inference-time renormalisation cannot undo norm inflation.
- its significance: `p_holm`, per step the two-sided p-value of the t test that the mean derivative is 0
  (t = coherence * sqrt(B - 1) with the population spread), Holm-corrected across the steps, and
  `significant_steps`, how many steps have p_holm < 0.05. A coherence that is not significant at this
  many samples is indistinguishable from none.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scipy import stats as st

from ng_jax.eval.stats import holm
from ng_jax.rewards.verifier import encode_prompts, soft_alignment

_TINY = 1e-12


def reward_jacobian(sample_fn: Callable, reward_fn: Callable, params, noise, cond, uncond, num_steps: int,
                    rng=None) -> jax.Array:
    """`J [B, num_steps]`: d reward_fn(x0)_b / d alpha_k at alpha = 1.

    `sample_fn` is a `make_sampler(...)` function; `reward_fn(x0 [B, ...]) -> [B]` differentiable.
    Forward mode: `num_steps` tangents ride along one sampling pass and nothing is stored for a backward
    one. (Reverse mode pulls back each of the B rewards through the whole stored trajectory: at the grid's 64
    samples it needed more than 24 GB.)
    """
    def rewards(alpha):
        return reward_fn(sample_fn(params, noise, cond, uncond, rng, step_scales=alpha).x0)

    return jax.jacfwd(rewards)(jnp.ones((num_steps,), jnp.float32))


def verifier_reward_fn(verifier_params, prompts) -> Callable:
    """The differentiable verifier on images in [-1, 1] (clipped, as the judged uint8 image is)."""
    targets = encode_prompts(list(prompts))
    return lambda x0: soft_alignment(verifier_params, jnp.clip(x0, -1.0, 1.0), targets)


def summarize(jac: np.ndarray, sigmas: np.ndarray) -> dict:
    """Per-step statistics of a jacobian [B, S] on the grid's step-start sigmas [S]."""
    jac = np.asarray(jac, np.float64)
    mean = jac.mean(0)
    spread = jac.std(0)
    sign = np.sign(mean)
    agree = np.where(sign == 0, 0.0, (np.sign(jac) == sign[None]).mean(0))
    coherence = np.abs(mean) / np.maximum(spread, _TINY)
    n = jac.shape[0]
    if n > 1:
        p = 2.0 * st.t.sf(coherence * np.sqrt(n - 1), n - 1)  # spread is the ddof=0 std
        p_holm = holm(p.tolist())
    else:
        p_holm = [1.0] * jac.shape[1]
    return {"sigma": [float(s) for s in sigmas], "mean": mean.tolist(), "spread": spread.tolist(),
            "sign_agreement": agree.tolist(), "coherence": coherence.tolist(),
            "mean_coherence": float(coherence.mean()), "samples": int(n), "p_holm": list(p_holm),
            "significant_steps": int(sum(q < 0.05 for q in p_holm))}
