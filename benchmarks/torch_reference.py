"""The PyTorch-eager baseline of benchmarks/run.py: the losses, the RL train step and the Euler rollout
written the way the reference implementations write them with diffusers' `SD3Transformer2DModel`.

- Losses: the maths of `ng_jax.losses` (docs/ALGORITHMS.md secs 3-6) in torch, op for op
  (tests/unit/test_benchmarks.py checks they equal ng_jax.losses on random inputs).
- Train step (`TorchTrainStep`): NVlabs/DiffusionNFT `train_nft_sd3.py`, scxue/advantage_weighted_matching
  `train_sd3_awm.py`, yifan123/flow_grpo `train_sd3_dpo.py` with full fine-tuning: for each micro-batch
  and training timestep, fresh noise, the reference (and NFT/AWM old/EMA) forward under
  `torch.no_grad()`, one policy forward with autograd, `(loss / accumulation_steps).backward()`; after
  the last micro-step `clip_grad_norm_` and `AdamW.step()`. NormGuard reads the same velocities.
- Rollout (`torch_euler_sample`): the pipelines' loop, one transformer call per step (the batch
  doubled for classifier-free guidance), `x <- x + (sigma_next - sigma) * v`.

Tensors are NCHW as diffusers wants them; the per-sample reductions run over every non-batch
dimension, so they do not depend on the layout. Only the benchmark and its tests import this file:
torch stays a test/benchmark dependency.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
import torch

NORM_EPS = 1e-8
NFT_WEIGHT_FLOOR = 1e-5
AWM_HUBER_DELTA = 1e-10


# ----------------------------------------------------------------------------------------------
# Losses (ng_jax.losses in torch)


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=_dims(x))


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm; zero-safe gradient at x == 0 (as ng_jax.losses.per_sample_norm)."""
    sq = x.float().square().sum(dim=_dims(x))
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _expand(s: torch.Tensor, ndim: int, batch: int) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    return s.reshape((batch,) + (1,) * (ndim - 1))


def normguard_penalty(v, v_ref, *, margin: float = 0.0, power: int = 1, relative: bool = True) -> torch.Tensor:
    """`relu(||v|| - (1 + margin) ||v_ref||) ** power [/ max(||v_ref||, eps) ** power]`, per sample."""
    norm = per_sample_norm(v)
    norm_ref = per_sample_norm(v_ref.detach())
    hinge = torch.relu(norm - (1.0 + margin) * norm_ref)
    penalty = hinge if power == 1 else hinge.square()
    if relative:
        penalty = penalty / norm_ref.clamp(min=NORM_EPS) ** power
    return penalty


def with_normguard(loss, v_list: Sequence[torch.Tensor], v_ref_list: Sequence[torch.Tensor], *, lam: float,
                   margin: float = 0.0, power: int = 1, relative: bool = True):
    """`loss + lam * mean(normguard_penalty)` over every sample of every pair; (total, aux)."""
    penalties, active, ratios = [], [], []
    for v, v_ref in zip(v_list, v_ref_list):
        penalties.append(normguard_penalty(v, v_ref, margin=margin, power=power, relative=relative))
        with torch.no_grad():
            norm, norm_ref = per_sample_norm(v), per_sample_norm(v_ref)
            active.append(norm > (1.0 + margin) * norm_ref)
            ratios.append(norm / norm_ref.clamp(min=NORM_EPS))
    penalty = torch.cat(penalties).mean()
    aux = {"normguard_penalty": penalty, "normguard_active_frac": torch.cat(active).float().mean(),
           "norm_ratio": torch.cat(ratios).mean()}
    return (loss if lam == 0 else loss + lam * penalty), aux


def nft_loss(v, v_old, v_ref, x_t, x0, sigma, advantages, *, beta: float = 1.0, kl_beta: float = 1e-4,
             adv_clip: float = 5.0):
    """DiffusionNFT (ALGORITHMS.md sec 3), as ng_jax.losses.nft_loss."""
    sigma = _expand(sigma, v.ndim, v.shape[0]).to(v.dtype)
    v_old, v_ref = v_old.detach(), v_ref.detach()
    r = (advantages.clamp(-adv_clip, adv_clip) / (2.0 * adv_clip) + 0.5).clamp(0.0, 1.0)
    v_pos = beta * v + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v

    def weighted_x0_error(v_s):
        err = x_t - sigma * v_s - x0
        weight = per_sample_mean(err.abs()).clamp(min=NFT_WEIGHT_FLOOR).detach()
        return per_sample_mean(err.square()) / weight

    loss_pos, loss_neg = weighted_x0_error(v_pos), weighted_x0_error(v_neg)
    policy = ((r * loss_pos + (1.0 - r) * loss_neg) / beta).mean() * adv_clip
    kl = per_sample_mean((v - v_ref).square()).mean()
    aux = {"policy_loss": policy, "kl": kl, "loss_pos": loss_pos.mean(), "loss_neg": loss_neg.mean(),
           "optimality_prob": r.mean()}
    return policy + kl_beta * kl, aux


def awm_log_prob(v, target, sigma, *, p: float = 0.25):
    sigma = _expand(sigma, 1, v.shape[0]).to(v.dtype)
    mse = per_sample_mean((v - target).square())
    return -(sigma / p) * ((mse + AWM_HUBER_DELTA) ** p - AWM_HUBER_DELTA ** p)


def awm_loss(v, v_ref, v_ema, target, sigma, advantages, *, beta: float = 1e-4, ema_beta: float = 1.0,
             p: float = 0.25, clip_range: float = 1.0, adv_clip: float = 5.0):
    """Advantage Weighted Matching (ALGORITHMS.md sec 4), as ng_jax.losses.awm_loss."""
    v_ref, v_ema = v_ref.detach(), v_ema.detach()
    lp = awm_log_prob(v, target, sigma, p=p)
    a_c = advantages.clamp(-adv_clip, adv_clip) / adv_clip
    ratio = torch.exp(lp - lp.detach())
    unclipped = -a_c * ratio
    clipped = -a_c * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl_ref = per_sample_mean((v - v_ref).square()).mean()
    kl_ema = per_sample_mean((v - v_ema).square()).mean()
    aux = {"policy_loss": policy, "kl_ref": kl_ref, "kl_ema": kl_ema, "ratio_mean": ratio.mean(),
           "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(), "log_prob": lp.mean(),
           "mse": per_sample_mean((v - target).square()).mean()}
    return policy + beta * kl_ref + ema_beta * kl_ema, aux


def dpo_loss(v_w, v_l, v_ref_w, v_ref_l, target_w, target_l, *, beta: float = 100.0):
    """Flow-DPO (ALGORITHMS.md sec 5), as ng_jax.losses.dpo_loss."""
    v_ref_w, v_ref_l = v_ref_w.detach(), v_ref_l.detach()
    err_w = per_sample_mean((v_w - target_w).square())
    err_l = per_sample_mean((v_l - target_l).square())
    err_ref_w = per_sample_mean((v_ref_w - target_w).square())
    err_ref_l = per_sample_mean((v_ref_l - target_l).square())
    model_diff, ref_diff = err_w - err_l, err_ref_w - err_ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = (-torch.nn.functional.logsigmoid(inside)).mean()
    aux = {"implicit_acc": (inside > 0).float().mean(), "model_diff": model_diff.mean(),
           "ref_diff": ref_diff.mean(), "inside_mean": inside.mean()}
    return loss, aux


# ----------------------------------------------------------------------------------------------
# Training timesteps (host-side numpy, the same schemes as ng_jax.flow / ng_jax.rl.step._sigmas)


def training_sigmas(method: str, rng: np.random.Generator, n: int, micro_batch: int, num_timesteps: int,
                    grid: Sequence[float], grid_fraction: float, logit_mean: float = 0.0,
                    logit_std: float = 1.0) -> np.ndarray:
    """[num_micro, T, micro_batch] training sigmas: NFT a random order of the grid prefix per sample,
    AWM stratified slots shared by a micro-batch, DPO logit-normal per pair."""
    grid = np.asarray(grid, np.float32)
    m, t = n // micro_batch, num_timesteps
    if method == "nft":
        k = min(len(grid), max(1, int(math.floor(grid_fraction * len(grid) + 1e-9))))
        per_sample = np.stack([grid[:k][rng.permutation(k)[:t]] for _ in range(n)], 1)   # [T, n]
    elif method == "awm":
        k = min(len(grid), max(t, int(round(grid_fraction * len(grid)))))
        strata = np.array_split(np.arange(k), t)
        slots = np.array([[grid[rng.choice(s)] for s in strata] for _ in range(m)], np.float32)  # [M, T]
        return np.broadcast_to(slots[:, :, None], (m, t, micro_batch)).copy()
    else:
        per_sample = 1.0 / (1.0 + np.exp(-(logit_mean + logit_std * rng.standard_normal((t, n)))))
    return per_sample.astype(np.float32).reshape(t, m, micro_batch).transpose(1, 0, 2)


# ----------------------------------------------------------------------------------------------
# The train step


@dataclasses.dataclass(frozen=True)
class TorchStepSpec:
    method: str
    micro_batch: int
    num_timesteps: int
    grid: tuple
    grid_fraction: float
    loss_kwargs: dict
    lam: float = 0.0
    margin: float = 0.0
    power: int = 1
    relative: bool = True
    lr: float = 1e-4
    grad_clip: float = 1.0


def velocity(model, x, sigma, tokens, pooled):
    """diffusers' SD3 call as the references make it: timestep = 1000 * sigma, `[0]` of the tuple."""
    return model(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                 timestep=1000.0 * sigma, return_dict=False)[0]


class TorchTrainStep:
    """`step(x0, tokens, pooled, advantages, x0_l=None) -> loss`: one optimizer step, eager PyTorch.

    `policy` is trained (AdamW, global-norm clipping); `old` (NFT old / AWM EMA) and `ref` are frozen
    copies evaluated under no_grad. Inputs are NCHW float32 tensors (DPO: `x0` winners, `x0_l` losers).
    """

    def __init__(self, policy, old, ref, spec: TorchStepSpec, seed: int = 0):
        self.policy, self.old, self.ref, self.spec = policy.train(), old.eval(), ref.eval(), spec
        for m in (old, ref):
            m.requires_grad_(False)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _ng(self, base, v_list, v_ref_list):
        s = self.spec
        if s.lam == 0:
            return base
        return with_normguard(base, v_list, v_ref_list, lam=s.lam, margin=s.margin, power=s.power,
                              relative=s.relative)[0]

    def __call__(self, x0, tokens, pooled, advantages, x0_l=None):
        s = self.spec
        n = x0.shape[0]
        sigmas = torch.from_numpy(training_sigmas(s.method, self.rng, n, s.micro_batch, s.num_timesteps, s.grid,
                                                  s.grid_fraction))
        count = sigmas.shape[0] * sigmas.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(sigmas.shape[0]):
            sl = slice(m * s.micro_batch, (m + 1) * s.micro_batch)
            x0_m, tok, pool, adv = x0[sl], tokens[sl], pooled[sl], advantages[sl]
            for t in range(sigmas.shape[1]):
                sigma = sigmas[m, t]
                sig4 = sigma.view(-1, 1, 1, 1)
                noise = torch.randn(x0_m.shape, generator=self.gen)
                if s.method == "dpo":
                    x0_lm = x0_l[sl]
                    x = torch.cat([(1 - sig4) * x0_m + sig4 * noise, (1 - sig4) * x0_lm + sig4 * noise])
                    s2, tok2, pool2 = torch.cat([sigma, sigma]), torch.cat([tok, tok]), torch.cat([pool, pool])
                    with torch.no_grad():
                        v_ref = velocity(self.ref, x, s2, tok2, pool2)
                    v = velocity(self.policy, x, s2, tok2, pool2)
                    b = x0_m.shape[0]
                    base, _ = dpo_loss(v[:b], v[b:], v_ref[:b], v_ref[b:], noise - x0_m, noise - x0_lm,
                                       **s.loss_kwargs)
                    loss = self._ng(base, [v[:b], v[b:]], [v_ref[:b], v_ref[b:]])
                else:
                    x_t = (1 - sig4) * x0_m + sig4 * noise
                    with torch.no_grad():
                        v_ref = velocity(self.ref, x_t, sigma, tok, pool)
                        v_old = velocity(self.old, x_t, sigma, tok, pool)
                    v = velocity(self.policy, x_t, sigma, tok, pool)
                    if s.method == "nft":
                        base, _ = nft_loss(v, v_old, v_ref, x_t, x0_m, sigma, adv, **s.loss_kwargs)
                    else:
                        base, _ = awm_loss(v, v_ref, v_old, noise - x0_m, sigma, adv, **s.loss_kwargs)
                    loss = self._ng(base, [v], [v_ref])
                (loss / count).backward()
                total += float(loss.detach())
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.optimizer.step()
        return total / count


# ----------------------------------------------------------------------------------------------
# The rollout


@torch.no_grad()
def torch_euler_sample(model, noise, tokens, pooled, sigmas: Sequence[float], cfg_scale: float = 1.0,
                       uncond_tokens: Optional[torch.Tensor] = None, uncond_pooled: Optional[torch.Tensor] = None):
    """Euler ODE on `sigmas` (with the final 0) from NCHW `noise`; CFG doubles the batch as the pipelines do."""
    x = noise
    b = x.shape[0]
    guided = cfg_scale != 1.0
    if guided:
        tok2, pool2 = torch.cat([tokens, uncond_tokens]), torch.cat([pooled, uncond_pooled])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if guided:
            v = velocity(model, torch.cat([x, x]), torch.full((2 * b,), float(sigma)), tok2, pool2)
            v_c, v_u = v[:b], v[b:]
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            v = velocity(model, x, torch.full((b,), float(sigma)), tokens, pooled)
        x = x + (float(sigma_next) - float(sigma)) * v
    return x
