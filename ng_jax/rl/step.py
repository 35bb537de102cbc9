"""The fused RL train step: base loss (NFT, AWM or Flow-DPO) + NormGuard hinge, one `jax.jit`.

Per optimizer step the step receives a `TrainBatch` of samples (clean rollout results `x0`, their
text conditioning and advantages; DPO: winner/loser pairs). Inside one jitted function it

1. draws each method's training timesteps (ALGORITHMS.md secs 3-5; NFT: a random order of the
   rollout grid per sample; AWM: stratified slots over the grid, shared by a micro-batch; DPO:
   logit-normal, shared by a pair) and one noise key per sample and timestep. Everything except
   AWM's per-micro-batch slots is drawn for the whole batch, so the micro-batch size is a memory
   knob only: accumulating micro-batches gives the gradient of the whole batch;
2. scans over micro-batches x timesteps: fresh noise, `x_t`, then ONE reference forward and
   (NFT/AWM) ONE old/EMA forward, both outside the differentiated function (no gradient, no saved
   activations), and ONE policy forward inside `jax.value_and_grad`. The base loss's KL terms and
   the NormGuard hinge read these same velocities, so NormGuard costs no extra forward. With
   `lam == 0` the hinge is not traced at all (the step is the base method's, op for op);
3. averages the gradients, and applies the optax update (clipping is part of the optimizer chain,
   `ng_jax.state.make_optimizer`) only if the loss and every gradient entry are finite; otherwise
   the whole state comes back unchanged and `metrics["finite"]` is False, so the loop can stop;
4. reports the base loss's parts, NormGuard's penalty and hinge-active fraction (when on), the mean
   norm ratio `||v|| / ||v_ref||` and its mean per sigma bucket, and the pre-clip gradient norm.

The caller jits `step` with the mesh shardings and donates the state (ng_jax.rl.loop):

    jax.jit(make_train_step(model.apply, optimizer, spec, lora_cfg),
            in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, replicated),
            donate_argnums=(0,))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ng_jax import flow, losses, sharding
from ng_jax.models.nets.lora import lora_merge
from ng_jax.models.stack import trainable_init
from ng_jax.state import TrainState, ema_update, tree_all_finite

METHODS = ("nft", "awm", "dpo")
NUM_SIGMA_BUCKETS = 5
# NormGuard diagnostics that exist only when the hinge is on (lam > 0).
NORMGUARD_METRICS = ("normguard_penalty", "normguard_active_frac")


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
    lam: float = 0.0                 # NormGuard weight (0: off, the hinge is not even computed)
    margin: float = 0.0
    power: int = 1
    relative: bool = True
    dpo_logit_mean: float = 0.0
    dpo_logit_std: float = 1.0
    dpo_shift: float = 1.0
    # Log the gradient norms of the base loss and of the hinge separately, at v and at the parameters
    # (TERM_GRAD_METRICS; for calibrating lam): one more backward pass per micro-step.
    term_grads: bool = False


# Per-term gradient norms (with StepSpec.term_grads): of the base loss and of the mean hinge penalty per unit
# lam, w.r.t. the policy velocity v (over the micro-batch) and w.r.t. the trainable parameters; means over
# the step's micro-steps. lam * grad_*_hinge / grad_*_base is the hinge's pull relative to the base loss.
TERM_GRAD_METRICS = ("grad_v_base", "grad_v_hinge", "grad_param_base", "grad_param_hinge")


def _check_spec(spec: StepSpec) -> None:
    """Clear errors at build time for what would otherwise fail deep inside tracing (or silently)."""
    if spec.method not in METHODS:
        raise ValueError(f"StepSpec.method must be one of {METHODS}, got {spec.method!r}")
    if spec.micro_batch < 1 or spec.num_timesteps < 1:
        raise ValueError(f"StepSpec: micro_batch ({spec.micro_batch}) and num_timesteps ({spec.num_timesteps}) "
                         "must be >= 1")
    if not spec.lam >= 0:
        raise ValueError(f"StepSpec.lam (NormGuard weight) must be >= 0, got {spec.lam!r}")
    if spec.method == "nft":
        # flow.permuted_grid_timesteps draws from the first K grid values; more timesteps than K
        # would silently train on fewer (or, before this check, break the scan's shapes).
        n = len(spec.grid)
        k = min(n, max(1, int(math.floor(spec.grid_fraction * n + 1e-9))))
        if spec.num_timesteps > k:
            raise ValueError(f"NFT: num_timesteps={spec.num_timesteps} exceeds the {k} grid timesteps available "
                             f"(grid of {n} with grid_fraction={spec.grid_fraction})")
    elif spec.method == "awm" and spec.num_timesteps > len(spec.grid):
        raise ValueError(f"AWM: num_timesteps={spec.num_timesteps} stratified slots exceed the grid length "
                         f"{len(spec.grid)}")


def policy_params_fn(lora_cfg) -> Callable[[Any, Any], Any]:
    """(trainable, reference) -> full velocity-model params. LoRA: base + deltas; else trainable."""
    if lora_cfg is None or not lora_cfg.get("rank", 0):
        return lambda trainable, ref: trainable

    rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
    return lambda trainable, ref: lora_merge(ref, trainable, alpha=alpha, rank=rank)


def _sigmas(spec: StepSpec, rng, n: int) -> jax.Array:
    """Training sigmas [num_micro, T, micro_batch] following each method's scheme.

    NFT and DPO draw per sample over the whole batch (independent of the micro-batch size); AWM
    draws one set of stratified slots per micro-batch (the reference shares them by micro-batch).
    """
    t, mb = spec.num_timesteps, spec.micro_batch
    m = n // mb
    grid = jnp.asarray(spec.grid, jnp.float32)
    if spec.method == "awm":
        slots = jax.vmap(lambda r: flow.stratified_slot_timesteps(r, grid, num_slots=t, fraction=spec.grid_fraction))(
            jax.random.split(rng, m))                                           # [M, T]
        return jnp.broadcast_to(slots[:, :, None], (m, t, mb))
    if spec.method == "nft":  # each sample its own random order of the grid prefix
        per_sample = flow.permuted_grid_timesteps(rng, grid, n, fraction=spec.grid_fraction)[:t]   # [T, n]
    else:                     # DPO: one sigma per pair (winner and loser share it)
        per_sample = flow.sample_logit_normal(rng, (t, n), mean=spec.dpo_logit_mean, std=spec.dpo_logit_std,
                                              shift=spec.dpo_shift)
    return micro_split(per_sample.T, m).transpose(0, 2, 1)


def micro_split(x, num_micro: int):
    """[n, ...] -> [num_micro, n / num_micro, ...] with sample i in micro-batch i % num_micro.

    Interleaved, not contiguous: the batch arrives split over the devices in contiguous blocks, and
    block d then holds the same rows d * mb / D ... of EVERY micro-batch, so each micro-batch is
    evenly sharded without moving data. Contiguous micro-batches (`x.reshape(M, mb, ...)`) put each
    on a few devices and made XLA gather the batch: ~80% of the per-device memory of the SD3.5-M /
    FLUX.1-dev steps at 64-256 chips (ng_jax.plan, docs/SCALING.md)."""
    return x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)


def _bucket_stats(sigma, ratio):
    """Per-sigma-bucket (sum of ratios, count) over NUM_SIGMA_BUCKETS equal-width buckets of [0, 1]."""
    idx = jnp.clip((sigma * NUM_SIGMA_BUCKETS).astype(jnp.int32), 0, NUM_SIGMA_BUCKETS - 1)
    one_hot = jax.nn.one_hot(idx, NUM_SIGMA_BUCKETS)
    return jnp.sum(one_hot * ratio[:, None], 0), jnp.sum(one_hot, 0)


def _norm_ratio(v, v_ref):
    """Per-sample `||v|| / ||v_ref||` (diagnostic; the same guard as losses.with_normguard)."""
    v, v_ref = jax.lax.stop_gradient(v), jax.lax.stop_gradient(v_ref)
    return flow.norm_ratio(flow.per_sample_norm(v), flow.per_sample_norm(v_ref))


def make_micro_grad(apply_fn, spec: StepSpec, policy_params: Callable):
    """`(trainable, ref, ema, mb_batch, sigma [mb], keys [mb]) -> (loss, grads, aux)` for one micro-batch
    at one timestep. aux holds the loss parts plus `_ratio` / `_sigma` per sample (for the buckets)."""
    ng = dict(lam=spec.lam, margin=spec.margin, power=spec.power, relative=spec.relative)

    def add_normguard(base, v_list, v_ref_list):
        if spec.lam == 0:  # off: trace nothing of the hinge, so the step is exactly the base method's
            return base, {}
        total, ng_aux = losses.with_normguard(base, v_list, v_ref_list, **ng)
        return total, {k: ng_aux[k] for k in NORMGUARD_METRICS}

    def noise_like(x0, keys):  # one key per sample: the noise does not depend on the micro-batching
        return jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(keys)

    def value_and_grads(trainable, forward, base_of_v, pairs):
        """`(total, aux, v, grads)` of `total = base_of_v(v) + hinge` with `v = forward(trainable)`;
        `pairs(v) -> (v_list, v_ref_list)` says what the hinge compares."""
        if not spec.term_grads:
            def loss_fn(tr):
                v = forward(tr)
                base, aux = base_of_v(v)
                total, ng_aux = add_normguard(base, *pairs(v))
                return total, ({**aux, **ng_aux, "base_loss": base}, v)

            (total, (aux, v)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            return total, aux, v, grads
        # The same gradient, split: d(base)/dv and d(hinge)/dv (the mean penalty, per unit lam, so that a base
        # run tells which lam would balance the two) pulled back through one forward.
        v, pull_back = jax.vjp(forward, trainable)
        (base, aux), g_base = jax.value_and_grad(base_of_v, has_aux=True)(v)
        unit = dict(ng, lam=1.0)
        hinge_of_v = lambda u: losses.with_normguard(jnp.zeros((), jnp.float32), *pairs(u), **unit)  # noqa: E731
        (penalty, ng_aux), g_hinge = jax.value_and_grad(hinge_of_v, has_aux=True)(v)
        (p_base,), (p_hinge,) = pull_back(g_base), pull_back(g_hinge)
        terms = {"grad_v_base": optax.global_norm(g_base), "grad_v_hinge": optax.global_norm(g_hinge),
                 "grad_param_base": optax.global_norm(p_base), "grad_param_hinge": optax.global_norm(p_hinge)}
        if spec.lam == 0:
            return base, {**aux, **terms, "base_loss": base}, v, p_base
        grads = jax.tree.map(lambda b, h: b + spec.lam * h, p_base, p_hinge)
        ng_aux = {k: ng_aux[k] for k in NORMGUARD_METRICS}
        return base + spec.lam * penalty, {**aux, **ng_aux, **terms, "base_loss": base}, v, grads

    def nft_awm(trainable, ref, ema, mb: TrainBatch, sigma, keys):
        noise = noise_like(mb.x0, keys)
        x_t = flow.interpolate(mb.x0, noise, sigma)
        # No-gradient forwards, once each, shared by the base loss and the hinge.
        v_ref = jax.lax.stop_gradient(apply_fn(ref, x_t, sigma, mb.cond))
        v_old = jax.lax.stop_gradient(apply_fn(policy_params(ema, ref), x_t, sigma, mb.cond))
        target = flow.velocity_target(mb.x0, noise)

        def base_of_v(v):
            if spec.method == "nft":
                return losses.nft_loss(v, v_old, v_ref, x_t, mb.x0, sigma, mb.advantages, **spec.loss_kwargs)
            return losses.awm_loss(v, v_ref, v_old, target, sigma, mb.advantages, **spec.loss_kwargs)

        forward = lambda tr: apply_fn(policy_params(tr, ref), x_t, sigma, mb.cond)  # noqa: E731
        # NormGuard on v_theta (NFT: not on its implicit v_pos / v_neg)
        loss, aux, v, grads = value_and_grads(trainable, forward, base_of_v, lambda v: ([v], [v_ref]))
        return loss, grads, {**aux, "_ratio": _norm_ratio(v, v_ref), "_sigma": sigma}

    def dpo(trainable, ref, ema, mb: TrainBatch, sigma, keys):
        del ema
        noise = noise_like(mb.x0, keys)  # shared by the pair, as the sigma
        n = mb.x0.shape[0]
        x = jnp.concatenate([flow.interpolate(mb.x0, noise, sigma), flow.interpolate(mb.x0_l, noise, sigma)])
        s2 = jnp.concatenate([sigma, sigma])
        c2 = jax.tree.map(lambda c: jnp.concatenate([c, c]), mb.cond)
        v_ref = jax.lax.stop_gradient(apply_fn(ref, x, s2, c2))   # winners and losers in one forward
        target_w, target_l = flow.velocity_target(mb.x0, noise), flow.velocity_target(mb.x0_l, noise)

        def base_of_v(v):
            return losses.dpo_loss(v[:n], v[n:], v_ref[:n], v_ref[n:], target_w, target_l, **spec.loss_kwargs)

        forward = lambda tr: apply_fn(policy_params(tr, ref), x, s2, c2)  # noqa: E731
        pairs = lambda v: ([v[:n], v[n:]], [v_ref[:n], v_ref[n:]])  # noqa: E731  (winners and losers)
        loss, aux, v, grads = value_and_grads(trainable, forward, base_of_v, pairs)
        return loss, grads, {**aux, "_ratio": _norm_ratio(v, v_ref), "_sigma": s2}

    return dpo if spec.method == "dpo" else nft_awm


def make_train_step(apply_fn, optimizer: optax.GradientTransformation, spec: StepSpec, lora_cfg=None):
    """`step(state, ref_params, batch) -> (state, metrics)`; pure, to be jitted by the caller.

    `state.params` / `state.ema` are the trainable tree (LoRA: adapters only) and `ref_params` the
    frozen reference (LoRA: also the base the adapters apply to); `ref_params` is never written.
    """
    _check_spec(spec)
    policy_params = policy_params_fn(lora_cfg)
    micro_grad = make_micro_grad(apply_fn, spec, policy_params)
    t = spec.num_timesteps

    def step(state: TrainState, ref, batch: TrainBatch):
        n = batch.advantages.shape[0]
        if n % spec.micro_batch:
            raise ValueError(f"train batch {n} is not a multiple of micro_batch {spec.micro_batch}")
        num_micro = n // spec.micro_batch
        rng, r_sigma, r_noise = jax.random.split(state.rng, 3)
        sigmas = _sigmas(spec, r_sigma, n)                                        # [M, T, mb]
        to_micro = lambda x: micro_split(x, num_micro)  # noqa: E731
        micro = jax.tree.map(to_micro, batch)
        noise_keys = to_micro(jax.random.split(r_noise, (n, t))).transpose(0, 2, 1)  # [M, T, mb], per sample

        def one(g_acc, inputs):  # one micro-batch at one timestep: gradients add up in the carry
            mb, sigma, keys = inputs
            loss, g, aux = micro_grad(state.params, ref, state.ema, mb, sigma, keys)
            bsum, bcnt = _bucket_stats(aux.pop("_sigma"), aux.pop("_ratio"))
            per_step = {**aux, "loss": loss, "norm_ratio": bsum.sum() / bcnt.sum(), "_bucket_sum": bsum,
                        "_bucket_cnt": bcnt}
            return jax.tree.map(jnp.add, g_acc, g), per_step

        def body(g_acc, inputs):  # one micro-batch, scanning its timesteps
            mb, sig, keys = inputs
            return jax.lax.scan(lambda c, st: one(c, (mb, *st)), g_acc, (sig, keys))

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, per_step = jax.lax.scan(body, zeros, (micro, sigmas, noise_keys))  # per_step: [M, T, ...]

        count = num_micro * t   # every micro-step's loss is a mean over equal-sized micro-batches
        grads = jax.tree.map(lambda g: g / count, grads)
        metrics = {k: jnp.mean(v) for k, v in per_step.items() if not k.startswith("_")}
        bucket_sum = per_step["_bucket_sum"].sum((0, 1))
        bucket_cnt = per_step["_bucket_cnt"].sum((0, 1))
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & tree_all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updated = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state, rng=rng)
        # A non-finite loss or gradient: nothing of the state moves (not even the rng or step).
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        metrics.update(grad_norm=grad_norm, finite=finite,
                       norm_ratio_by_bucket=bucket_sum / jnp.maximum(bucket_cnt, 1), bucket_count=bucket_cnt)
        return new_state, metrics

    return step


def make_ema_update():
    """(state, decay) -> state with `ema <- decay * ema + (1 - decay) * params` (old/EMA policy)."""
    def update(state: TrainState, decay):
        return state.replace(ema=ema_update(state.ema, state.params, decay))
    return update


def bucket_centres() -> np.ndarray:
    return (np.arange(NUM_SIGMA_BUCKETS) + 0.5) / NUM_SIGMA_BUCKETS


# --- the run's step, built from its config -------------------------------------------------------------

def make_step_spec(config, grid: np.ndarray) -> StepSpec:
    """The StepSpec of a run: method, batch split, timestep scheme on the rollout grid, base-loss and
    NormGuard settings."""
    rl, ng = config.rl, config.normguard
    return StepSpec(
        method=rl.method, micro_batch=int(rl.micro_batch), num_timesteps=int(rl.num_timesteps),
        grid=tuple(float(s) for s in grid[:-1]), grid_fraction=float(rl.grid_fraction),
        loss_kwargs=dict(config.loss.to_dict()), lam=float(ng.lam), margin=float(ng.margin),
        power=int(ng.power), relative=bool(ng.relative), dpo_logit_mean=float(rl.dpo_logit_mean),
        dpo_logit_std=float(rl.dpo_logit_std), dpo_shift=float(rl.dpo_shift), term_grads=bool(ng.log_term_grads))


def make_init_state(config, optimizer, lora_cfg):
    """`init_state(ref) -> TrainState` at step 0 (pure; jitted with the state's out_shardings)."""
    def init_state(ref):
        trainable = trainable_init(ref, lora_cfg, jax.random.key(config.seed + 1))
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema=jax.tree.map(jnp.copy, trainable),
                          opt_state=optimizer.init(trainable), rng=jax.random.key(config.seed))
    return init_state


def jit_train_step(config, apply_fn, optimizer, lora_cfg, grid, mesh, state_sh, ref_sh):
    """The run's jitted, sharded train step `(state, ref, batch) -> (state, metrics)`, state donated, with
    the activation rules of `mesh.logical_rules` active while it traces. `ng_jax.plan` lowers this same
    function ahead of time against abstract shapes."""
    spec = make_step_spec(config, grid)
    step = sharding.with_rules(make_train_step(apply_fn, optimizer, spec, lora_cfg), mesh,
                               sharding.layouts(config.mesh)[0].logical_rules)
    return jax.jit(step, in_shardings=(state_sh, ref_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def ema_decay(config, step: int) -> float:
    """Old/EMA decay after an epoch: min(rate * optimizer_step, max) (DiffusionNFT / AWM schedules)."""
    return float(min(config.rl.ema.rate * step, config.rl.ema.max))
