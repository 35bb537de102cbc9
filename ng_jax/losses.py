"""The paper's maths: group-relative advantages, the NFT / AWM / Flow-DPO losses and NormGuard.

Plain `jax.numpy` functions of arrays, batch first; every per-sample reduction (MSE, L2 norm) runs
over all non-batch dimensions. Nothing here knows about parameters, models, meshes or configs, so
the functions can be jitted, vmapped and tested with arrays alone. Section numbers refer to
docs/ALGORITHMS.md.

Conventions (ALGORITHMS.md sec 1): `x_t = (1 - sigma) x0 + sigma eps`, target velocity
`u = eps - x0`, clean estimate `x0_hat = x_t - sigma v`. `sigma` is a scalar or one value per
sample ([B]); it is broadcast over the non-batch dimensions.

Every loss returns `(loss, aux)`: a scalar loss and a dict of scalar diagnostics (documented per
loss). Tensors that must carry no gradient (old / EMA / reference velocities) are wrapped in
`jax.lax.stop_gradient` inside, so callers need not remember to.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ng_jax.flow import NORM_EPS, norm_ratio, per_sample_norm, per_sample_sq_norm  # noqa: F401 (re-exported)

# DiffusionNFT's lower bound on the adaptive x0-space weight mean(|e|).
NFT_WEIGHT_FLOOR = 1e-5
# AWM's generalised-Huber offset inside (mse + delta) ** p.
AWM_HUBER_DELTA = 1e-10


# ----------------------------------------------------------------------------------------------
# Shape helpers and per-sample reductions


def _compute_dtype(x: jax.Array):
    """float32 at least: norms and means of bf16 / fp16 velocities lose too much precision."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _check_same_shape(what: str, **arrays) -> tuple[int, ...]:
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    first_name, first = next(iter(shapes.items()))
    if len(first) < 1:
        raise ValueError(f"{what}: {first_name} must be batch-first with at least 1 dimension, got shape {first}")
    for name, shape in shapes.items():
        if shape != first:
            raise ValueError(f"{what}: {name} has shape {shape} but {first_name} has shape {first}; "
                             "expected identical [B, ...] shapes")
    return first


def _per_sample_vector(what: str, name: str, x, batch: int) -> jax.Array:
    """A scalar or [B] array -> [B] (broadcast); anything else is a clear error."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (batch,))
    if x.shape != (batch,):
        raise ValueError(f"{what}: {name} must be a scalar or shape ({batch},) (one per sample), got {x.shape}")
    return x


def _expand_to(x: jax.Array, ndim: int) -> jax.Array:
    """[B] -> [B, 1, ..., 1] with `ndim` dimensions, for broadcasting against [B, ...] tensors."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def per_sample_mean(x: jax.Array) -> jax.Array:
    """Mean over every non-batch dimension: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------
# Sec 2: group-relative advantages


def group_advantages(rewards: jax.Array, group_ids: jax.Array, *, global_std: bool = False,
                     eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages `(r - mean_group(r)) / (std + eps)` (ALGORITHMS.md sec 2).

    Args:
      rewards: float [N], one (weighted total) reward per sample.
      group_ids: int [N], the prompt group of each sample. Any integer values, in any order
        (they need not be sorted, contiguous or below N).
      global_std: False: `std` is the sample's own group's population std (ddof=0);
        True: the population std over all N rewards passed.
      eps: added to the std; a single-member (or constant) group gets advantage exactly 0.

    Returns float [N] advantages (float32 or wider). Jit-able: groups are found with a
    fixed-size `jnp.unique(..., size=N)` and reduced with `segment_sum(num_segments=N)`.
    """
    rewards = jnp.asarray(rewards)
    group_ids = jnp.asarray(group_ids)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must have shape [N], got {rewards.shape}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: group_ids has shape {group_ids.shape} but rewards has shape "
                         f"{rewards.shape}; expected one group id per reward")
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(f"group_advantages: group_ids must be integers, got dtype {group_ids.dtype}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("group_advantages: got an empty reward batch; expected at least one reward")
    r = rewards.astype(_compute_dtype(rewards))
    _, segment = jnp.unique(group_ids, return_inverse=True, size=n)
    segment = segment.reshape(n)
    count = jax.ops.segment_sum(jnp.ones_like(r), segment, num_segments=n)[segment]
    mean = jax.ops.segment_sum(r, segment, num_segments=n)[segment] / count
    centred = r - mean
    if global_std:
        std = jnp.sqrt(jnp.mean(jnp.square(r - jnp.mean(r))))
    else:  # two-pass population variance of the sample's own group
        std = jnp.sqrt(jax.ops.segment_sum(jnp.square(centred), segment, num_segments=n)[segment] / count)
    return centred / (std + eps)


# ----------------------------------------------------------------------------------------------
# Sec 6: NormGuard


def normguard_penalty(v: jax.Array, v_ref: jax.Array, *, margin: float = 0.0, power: int = 1,
                      relative: bool = True) -> jax.Array:
    """Per-sample NormGuard hinge (ALGORITHMS.md sec 6): [B, ...] x 2 -> [B].

    `relu(||v|| - (1 + margin) ||v_ref||) ** power`, divided by `||v_ref|| ** power` when
    `relative` (a scale-free "fraction of the reference norm" form). Norms are per-sample L2 over
    all non-batch dimensions; `v_ref` is stop-gradiented.

    Properties the tests check: the penalty is exactly 0 (with exactly 0 gradient) while
    `||v|| <= (1 + margin) ||v_ref||`; otherwise its gradient is a positive multiple of `v`, so a
    gradient step only shrinks `||v||` and never changes the direction of `v`. The norm is
    zero-safe, so the gradient at `v == 0` is finite. The relative form divides by
    `max(||v_ref||, NORM_EPS) ** power`.
    """
    _check_same_shape("normguard_penalty", v=v, v_ref=v_ref)
    if isinstance(power, bool) or power not in (1, 2):
        raise ValueError(f"normguard_penalty: power must be 1 or 2, got {power!r}")
    if isinstance(margin, (int, float)) and not margin > -1.0:
        raise ValueError(f"normguard_penalty: margin must be > -1 (the bound is (1 + margin) * ||v_ref||), "
                         f"got {margin!r}")
    norm = per_sample_norm(v)
    norm_ref = per_sample_norm(jax.lax.stop_gradient(v_ref))
    hinge = jax.nn.relu(norm - (1.0 + margin) * norm_ref)
    penalty = hinge if power == 1 else jnp.square(hinge)
    if relative:
        penalty = penalty / jnp.maximum(norm_ref, NORM_EPS) ** power
    return penalty


def with_normguard(loss: jax.Array, v_list: Sequence[jax.Array], v_ref_list: Sequence[jax.Array], *,
                   lam: float, margin: float, power: int, relative: bool) -> tuple[jax.Array, dict]:
    """`loss + lam * mean(normguard_penalty(...))` over every sample of every pair (sec 6).

    NormGuard composes by addition on the same forward pass: pass `[v_theta]`, `[v_ref]` for NFT
    and AWM (the policy velocity, not NFT's implicit v_pos / v_neg), and `[v_w, v_l]`,
    `[v_ref_w, v_ref_l]` for DPO (the mean runs over winners and losers together). With a Python
    `lam == 0` the loss is returned untouched (exactly nothing is added); the diagnostics are
    reported either way.

    Returns `(total, aux)` with aux:
      normguard_penalty: mean per-sample penalty (before `lam`);
      normguard_active_frac: fraction of samples whose hinge is > 0;
      norm_ratio: mean per-sample `||v|| / ||v_ref||`.
    """
    if len(v_list) != len(v_ref_list) or not v_list:
        raise ValueError(f"with_normguard: got {len(v_list)} policy and {len(v_ref_list)} reference velocity "
                         "arrays; expected the same non-zero number (one reference per policy velocity)")
    if isinstance(lam, (int, float)) and not lam >= 0:
        raise ValueError(f"with_normguard: lam must be >= 0, got {lam!r}")
    penalties, active, ratios = [], [], []
    for v, v_ref in zip(v_list, v_ref_list):
        penalties.append(normguard_penalty(v, v_ref, margin=margin, power=power, relative=relative))
        norm = per_sample_norm(v)
        norm_ref = per_sample_norm(jax.lax.stop_gradient(v_ref))
        active.append(norm > (1.0 + margin) * norm_ref)
        ratios.append(norm_ratio(norm, norm_ref))
    penalty = jnp.mean(jnp.concatenate(penalties))
    aux = {
        "normguard_penalty": penalty,
        "normguard_active_frac": jnp.mean(jnp.concatenate(active).astype(jnp.float32)),
        "norm_ratio": jnp.mean(jax.lax.stop_gradient(jnp.concatenate(ratios))),
    }
    if isinstance(lam, (int, float)) and lam == 0:
        return loss, aux
    return loss + lam * penalty, aux


# ----------------------------------------------------------------------------------------------
# Sec 3: DiffusionNFT


def nft_loss(v, v_old, v_ref, x_t, x0, sigma, advantages, *, beta: float = 1.0, kl_beta: float = 1e-4,
             adv_clip: float = 5.0) -> tuple[jax.Array, dict]:
    """DiffusionNFT loss (ALGORITHMS.md sec 3), following NVlabs/DiffusionNFT `train_nft_sd3.py`.

    Args:
      v: policy velocity [B, ...] (with gradient).
      v_old: old / EMA policy velocity at the same (x_t, sigma, cond); stop-gradiented.
      v_ref: reference velocity; stop-gradiented (used by the KL term only).
      x_t, x0: the noisy input and the clean rollout sample, [B, ...].
      sigma: noise level, scalar or [B].
      advantages: [B] group-relative advantages.
      beta: implicit-policy step (v_pos = beta v + (1-beta) v_old, v_neg = (1+beta) v_old - beta v).
      kl_beta: weight of `mean((v - v_ref)^2)`.
      adv_clip: c; advantages are clipped to [-c, c] and mapped to r = clip(A/(2c) + 0.5, 0, 1).

    The x0-space errors `e_s = x_t - sigma v_s - x0` are weighted by the stop-gradiented
    adaptive factor `1 / max(mean|e_s|, 1e-5)`. Loss:
    `mean_b[(r l_pos + (1 - r) l_neg) / beta] * c + kl_beta * mean((v - v_ref)^2)`.

    aux: policy_loss, kl (mean squared difference to the reference, unweighted), loss_pos and
    loss_neg (batch means of l_pos / l_neg), optimality_prob (mean r).
    """
    shape = _check_same_shape("nft_loss", v=v, v_old=v_old, v_ref=v_ref, x_t=x_t, x0=x0)
    batch, ndim = shape[0], len(shape)
    sigma = _expand_to(_per_sample_vector("nft_loss", "sigma", sigma, batch), ndim)
    advantages = _per_sample_vector("nft_loss", "advantages", advantages, batch)
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"nft_loss: beta must be > 0 (the loss divides by it), got {beta!r}")
    if isinstance(adv_clip, (int, float)) and not adv_clip > 0:
        raise ValueError(f"nft_loss: adv_clip must be > 0, got {adv_clip!r}")
    v_old = jax.lax.stop_gradient(v_old)
    v_ref = jax.lax.stop_gradient(v_ref)

    a_clipped = jnp.clip(advantages, -adv_clip, adv_clip)
    r = jnp.clip(a_clipped / (2.0 * adv_clip) + 0.5, 0.0, 1.0)
    v_pos = beta * v + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v

    def weighted_x0_error(v_s):
        err = x_t - sigma * v_s - x0
        weight = jax.lax.stop_gradient(jnp.maximum(per_sample_mean(jnp.abs(err)), NFT_WEIGHT_FLOOR))
        return per_sample_mean(jnp.square(err)) / weight

    loss_pos, loss_neg = weighted_x0_error(v_pos), weighted_x0_error(v_neg)
    policy = jnp.mean((r * loss_pos + (1.0 - r) * loss_neg) / beta) * adv_clip
    kl = jnp.mean(per_sample_mean(jnp.square(v - v_ref)))
    loss = policy + kl_beta * kl
    aux = {"policy_loss": policy, "kl": kl, "loss_pos": jnp.mean(loss_pos), "loss_neg": jnp.mean(loss_neg),
           "optimality_prob": jnp.mean(r)}
    return loss, aux


# ----------------------------------------------------------------------------------------------
# Sec 4: Advantage Weighted Matching


def awm_log_prob(v, target, sigma, *, p: float = 0.25) -> jax.Array:
    """AWM's per-sample flow-matching log-likelihood surrogate (generalised Huber), [B].

    `lp = -(sigma / p) * ((mse + 1e-10) ** p - 1e-10 ** p)`, `mse = mean((v - target)^2)`.
    """
    shape = _check_same_shape("awm_log_prob", v=v, target=target)
    sigma = _per_sample_vector("awm_log_prob", "sigma", sigma, shape[0])
    if isinstance(p, (int, float)) and not p > 0:
        raise ValueError(f"awm_log_prob: p must be > 0, got {p!r}")
    mse = per_sample_mean(jnp.square(v - target))
    return -(sigma / p) * ((mse + AWM_HUBER_DELTA) ** p - AWM_HUBER_DELTA ** p)


def awm_loss(v, v_ref, v_ema, target, sigma, advantages, *, beta: float = 1e-4, ema_beta: float = 1.0,
             p: float = 0.25, clip_range: float = 1.0, adv_clip: float = 5.0) -> tuple[jax.Array, dict]:
    """Advantage Weighted Matching loss (ALGORITHMS.md sec 4), following
    scxue/advantage_weighted_matching `train_sd3_awm.py`.

    Args:
      v: policy velocity [B, ...] (with gradient).
      v_ref: reference velocity (stop-gradiented); v_ema: EMA-policy velocity (stop-gradiented).
      target: flow-matching target `u = eps - x0`, [B, ...].
      sigma: noise level, scalar or [B]; advantages: [B].
      beta, ema_beta: weights of `mean((v - v_ref)^2)` and `mean((v - v_ema)^2)`.
      p: generalised-Huber exponent of the log-likelihood surrogate (see `awm_log_prob`).
      clip_range: PPO ratio clip c. adv_clip: advantages are clipped to [-adv_clip, adv_clip]
        and divided by adv_clip.

    `ratio = exp(lp - stop_grad(lp))` is exactly 1 (one update per rollout sample), so the PPO
    surrogate `mean(max(-A_c ratio, -A_c clip(ratio, 1-c, 1+c)))` has the value `-mean(A_c)` and
    the gradient `-mean(A_c grad lp)`: advantage-weighted flow matching.

    aux: policy_loss, kl_ref, kl_ema (unweighted mean squared differences), ratio_mean,
    clip_frac (fraction of samples whose ratio left [1-c, 1+c]), log_prob (mean lp), mse.
    """
    shape = _check_same_shape("awm_loss", v=v, v_ref=v_ref, v_ema=v_ema, target=target)
    batch = shape[0]
    sigma = _per_sample_vector("awm_loss", "sigma", sigma, batch)
    advantages = _per_sample_vector("awm_loss", "advantages", advantages, batch)
    if isinstance(clip_range, (int, float)) and not clip_range > 0:
        raise ValueError(f"awm_loss: clip_range must be > 0, got {clip_range!r}")
    if isinstance(adv_clip, (int, float)) and not adv_clip > 0:
        raise ValueError(f"awm_loss: adv_clip must be > 0, got {adv_clip!r}")
    v_ref = jax.lax.stop_gradient(v_ref)
    v_ema = jax.lax.stop_gradient(v_ema)

    lp = awm_log_prob(v, target, sigma, p=p)
    a_c = jnp.clip(advantages, -adv_clip, adv_clip) / adv_clip
    ratio = jnp.exp(lp - jax.lax.stop_gradient(lp))
    unclipped = -a_c * ratio
    clipped = -a_c * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy = jnp.mean(jnp.maximum(unclipped, clipped))
    kl_ref = jnp.mean(per_sample_mean(jnp.square(v - v_ref)))
    kl_ema = jnp.mean(per_sample_mean(jnp.square(v - v_ema)))
    loss = policy + beta * kl_ref + ema_beta * kl_ema
    aux = {"policy_loss": policy, "kl_ref": kl_ref, "kl_ema": kl_ema, "ratio_mean": jnp.mean(ratio),
           "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
           "log_prob": jnp.mean(lp), "mse": jnp.mean(per_sample_mean(jnp.square(v - target)))}
    return loss, aux


# ----------------------------------------------------------------------------------------------
# Sec 5: Flow-DPO


def dpo_loss(v_w, v_l, v_ref_w, v_ref_l, target_w, target_l, *, beta: float = 100.0) -> tuple[jax.Array, dict]:
    """Flow-DPO loss (ALGORITHMS.md sec 5), following yifan123/flow_grpo `train_sd3_dpo.py`.

    Winner (w) and loser (l) are noised with the same eps and sigma; `target_*` are their
    flow-matching targets. With per-sample errors `err_m,s = mean((v_m,s - target_s)^2)`:
    `inside = -(beta / 2) * [(err_theta,w - err_ref,w) - (err_theta,l - err_ref,l)]`,
    `loss = mean(-log sigmoid(inside))`. The reference velocities are stop-gradiented.
    When the policy equals the reference, `inside == 0` and the loss is log 2.

    aux: implicit_acc (fraction of pairs with inside > 0, i.e. the policy prefers the winner more
    than the reference does), model_diff (mean err_theta,w - err_theta,l), ref_diff (mean
    err_ref,w - err_ref,l), inside_mean (mean of `inside`).
    """
    _check_same_shape("dpo_loss", v_w=v_w, v_l=v_l, v_ref_w=v_ref_w, v_ref_l=v_ref_l, target_w=target_w,
                      target_l=target_l)
    v_ref_w = jax.lax.stop_gradient(v_ref_w)
    v_ref_l = jax.lax.stop_gradient(v_ref_l)
    err_w = per_sample_mean(jnp.square(v_w - target_w))
    err_l = per_sample_mean(jnp.square(v_l - target_l))
    err_ref_w = per_sample_mean(jnp.square(v_ref_w - target_w))
    err_ref_l = per_sample_mean(jnp.square(v_ref_l - target_l))
    model_diff = err_w - err_l
    ref_diff = err_ref_w - err_ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = jnp.mean(-jax.nn.log_sigmoid(inside))
    aux = {"implicit_acc": jnp.mean((inside > 0).astype(jnp.float32)), "model_diff": jnp.mean(model_diff),
           "ref_diff": jnp.mean(ref_diff), "inside_mean": jnp.mean(inside)}
    return loss, aux
