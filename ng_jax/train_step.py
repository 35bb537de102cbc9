"""The fused RL train step: base loss (NFT, AWM or Flow-DPO) + NormGuard hinge, one `jax.jit`.

Per optimizer step the step receives a `TrainBatch` of samples (clean rollout results `x0`, their
text conditioning and advantages; DPO: winner/loser pairs). Inside one jitted function it

1. draws each method's training timesteps (NFT: a random permutation of the rollout grid per sample;
   AWM: stratified slots over the grid, shared by a micro-batch; DPO: logit-normal, shared by a pair);
2. scans over micro-batches x timesteps: fresh noise, `x_t`, then ONE policy forward (with gradient),
   one reference forward and (NFT/AWM) one old/EMA forward (without). The base loss's KL terms and the
   NormGuard hinge read these same velocities, so NormGuard costs no extra forward;
3. accumulates gradients, clips (optax), applies the update only if the loss and gradient are finite;
4. reports loss parts, hinge-active fraction, mean norm ratio, per-sigma-bucket norm ratios, grad norm.

The state is donated; in/out shardings come from the caller (ng_jax.train).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ng_jax import flow, losses
from ng_jax.state import TrainState

NUM_SIGMA_BUCKETS = 5


@flax.struct.dataclass
class TrainBatch:
    """One optimizer step's samples, batch first. For DPO `x0` are winners, `x0_l` losers."""
    x0: jax.Array
    cond: Any            # TextCond, per sample
    advantages: jax.Array
    x0_l: Any = None     # DPO only


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of the step (closed over by the jitted function)."""
    method: str                      # "nft" | "awm" | "dpo"
    micro_batch: int
    num_timesteps: int               # training timesteps per sample (per pair for DPO)
    grid: tuple[float, ...]          # rollout sigma grid without the final 0 (NFT/AWM schemes)
    grid_fraction: float             # NFT 0.99 / AWM 0.9 of the grid is used
    loss_kwargs: dict                # keyword arguments of the base loss
    lam: float = 0.0                 # NormGuard weight (0: off)
    margin: float = 0.0
    power: int = 1
    relative: bool = True
    dpo_logit_mean: float = 0.0
    dpo_logit_std: float = 1.0
    dpo_shift: float = 1.0


def policy_params_fn(lora_cfg) -> Callable[[Any, Any], Any]:
    """(trainable, reference) -> full velocity-model params. LoRA: base + deltas; else trainable."""
    if lora_cfg is None or not lora_cfg.get("rank", 0):
        return lambda trainable, ref: trainable
    from ng_jax.models.lora import lora_merge

    rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
    return lambda trainable, ref: lora_merge(ref, trainable, alpha=alpha, rank=rank)


def _sigmas(spec: StepSpec, rng, num_micro: int) -> jax.Array:
    """Training sigmas [num_micro, T, micro_batch] following each method's scheme."""
    t, mb = spec.num_timesteps, spec.micro_batch
    grid = jnp.asarray(spec.grid, jnp.float32)
    rngs = jax.random.split(rng, num_micro)
    if spec.method == "nft":
        def one(r):  # [T, mb]: each sample its own random order of the grid prefix
            return flow.permuted_grid_timesteps(r, grid, mb, fraction=spec.grid_fraction)[:t]
    elif spec.method == "awm":
        def one(r):  # [T] shared by the micro-batch, stratified over the grid prefix
            s = flow.stratified_slot_timesteps(r, grid, num_slots=t, fraction=spec.grid_fraction)
            return jnp.broadcast_to(s[:, None], (t, mb))
    else:
        def one(r):
            return flow.sample_logit_normal(r, (t, mb), mean=spec.dpo_logit_mean, std=spec.dpo_logit_std,
                                            shift=spec.dpo_shift)
    return jax.vmap(one)(rngs)


def _bucket_stats(sigma, ratio):
    """Per-sigma-bucket (sum of ratios, count) over NUM_SIGMA_BUCKETS equal-width buckets of [0, 1]."""
    idx = jnp.clip((sigma * NUM_SIGMA_BUCKETS).astype(jnp.int32), 0, NUM_SIGMA_BUCKETS - 1)
    one_hot = jax.nn.one_hot(idx, NUM_SIGMA_BUCKETS)
    return jnp.sum(one_hot * ratio[:, None], 0), jnp.sum(one_hot, 0)


def make_micro_loss(apply_fn, spec: StepSpec, policy_params: Callable):
    """loss(trainable, ref, ema, mb_batch, sigma [mb], rng) -> (loss, aux) for one micro-batch and timestep."""
    ng = dict(lam=spec.lam, margin=spec.margin, power=spec.power, relative=spec.relative)

    def nft_awm(trainable, ref, ema, mb: TrainBatch, sigma, rng):
        noise = jax.random.normal(rng, mb.x0.shape, mb.x0.dtype)
        x_t = flow.interpolate(mb.x0, noise, sigma)
        v = apply_fn(policy_params(trainable, ref), x_t, sigma, mb.cond)
        v_ref = jax.lax.stop_gradient(apply_fn(ref, x_t, sigma, mb.cond))
        v_old = jax.lax.stop_gradient(apply_fn(policy_params(ema, ref), x_t, sigma, mb.cond))
        if spec.method == "nft":
            base, aux = losses.nft_loss(v, v_old, v_ref, x_t, mb.x0, sigma, mb.advantages, **spec.loss_kwargs)
        else:
            target = flow.velocity_target(mb.x0, noise)
            base, aux = losses.awm_loss(v, v_ref, v_old, target, sigma, mb.advantages, **spec.loss_kwargs)
        total, ng_aux = losses.with_normguard(base, [v], [v_ref], **ng)
        ratio = flow.per_sample_norm(v) / (flow.per_sample_norm(v_ref) + 1e-12)
        return total, {**aux, **ng_aux, "base_loss": base, "_ratio": ratio, "_sigma": sigma}

    def dpo(trainable, ref, ema, mb: TrainBatch, sigma, rng):
        noise = jax.random.normal(rng, mb.x0.shape, mb.x0.dtype)  # shared by the pair
        x_w, x_l = flow.interpolate(mb.x0, noise, sigma), flow.interpolate(mb.x0_l, noise, sigma)
        x = jnp.concatenate([x_w, x_l])
        s2 = jnp.concatenate([sigma, sigma])
        c2 = jax.tree.map(lambda c: jnp.concatenate([c, c]), mb.cond)
        v = apply_fn(policy_params(trainable, ref), x, s2, c2)
        v_ref = jax.lax.stop_gradient(apply_fn(ref, x, s2, c2))
        n = mb.x0.shape[0]
        base, aux = losses.dpo_loss(v[:n], v[n:], v_ref[:n], v_ref[n:], flow.velocity_target(mb.x0, noise),
                                    flow.velocity_target(mb.x0_l, noise), **spec.loss_kwargs)
        total, ng_aux = losses.with_normguard(base, [v[:n], v[n:]], [v_ref[:n], v_ref[n:]], **ng)
        ratio = flow.per_sample_norm(v) / (flow.per_sample_norm(v_ref) + 1e-12)
        return total, {**aux, **ng_aux, "base_loss": base, "_ratio": ratio, "_sigma": s2}

    return dpo if spec.method == "dpo" else nft_awm


def make_train_step(apply_fn, optimizer: optax.GradientTransformation, spec: StepSpec, lora_cfg=None):
    """`step(state, ref_params, batch) -> (state, metrics)`; pure, to be jitted by the caller."""
    policy_params = policy_params_fn(lora_cfg)
    micro_loss = make_micro_loss(apply_fn, spec, policy_params)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, ref, batch: TrainBatch):
        n = batch.advantages.shape[0]
        if n % spec.micro_batch:
            raise ValueError(f"train batch {n} is not a multiple of micro_batch {spec.micro_batch}")
        num_micro = n // spec.micro_batch
        rng, r_sigma, r_noise = jax.random.split(state.rng, 3)
        sigmas = _sigmas(spec, r_sigma, num_micro)                      # [M, T, mb]
        micro = jax.tree.map(lambda x: x.reshape((num_micro, spec.micro_batch) + x.shape[1:]), batch)
        noise_keys = jax.random.split(r_noise, num_micro * spec.num_timesteps).reshape(
            num_micro, spec.num_timesteps)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(carry, inputs):
            grads, sums = carry
            mb, sig, keys = inputs

            def inner(carry_t, inp_t):
                g_acc, s_acc = carry_t
                sigma, key = inp_t
                (loss, aux), g = grad_fn(state.params, ref, state.ema, mb, sigma, key)
                bsum, bcnt = _bucket_stats(aux.pop("_sigma"), aux.pop("_ratio"))
                s_new = {k: s_acc[k] + v for k, v in {**aux, "loss": loss}.items()}
                s_new["_bucket_sum"] = s_acc["_bucket_sum"] + bsum
                s_new["_bucket_cnt"] = s_acc["_bucket_cnt"] + bcnt
                return (jax.tree.map(jnp.add, g_acc, g), s_new), None

            (grads, sums), _ = jax.lax.scan(inner, (grads, sums), (sig, keys))
            return (grads, sums), None

        # Shapes of the metric sums, from an abstract evaluation of one micro-step.
        mb0 = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(lambda: micro_loss(state.params, ref, state.ema, mb0, sigmas[0, 0],
                                                      noise_keys[0, 0])[1])
        sums0 = {k: jnp.zeros((), jnp.float32) for k in aux_shape if not k.startswith("_")}
        sums0.update(loss=jnp.zeros(()), _bucket_sum=jnp.zeros(NUM_SIGMA_BUCKETS),
                     _bucket_cnt=jnp.zeros(NUM_SIGMA_BUCKETS))
        (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), (micro, sigmas, noise_keys))
        count = num_micro * spec.num_timesteps
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        metrics = {k: v / count for k, v in sums.items() if not k.startswith("_")}
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + jnp.where(finite, 1, 0), params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state), rng=rng)
        metrics.update(grad_norm=grad_norm, finite=finite,
                       norm_ratio_by_bucket=sums["_bucket_sum"] / jnp.maximum(sums["_bucket_cnt"], 1),
                       bucket_count=sums["_bucket_cnt"])
        return new_state, metrics

    return step


def make_ema_update():
    """(state, decay) -> state with `ema <- decay * ema + (1 - decay) * params` (old/EMA policy)."""
    def update(state: TrainState, decay):
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, state.params)
        return state.replace(ema=ema)
    return update


def bucket_centres() -> np.ndarray:
    return (np.arange(NUM_SIGMA_BUCKETS) + 0.5) / NUM_SIGMA_BUCKETS
