"""Rollouts: K samples per prompt from the policy (or its old/EMA copy), decoded to images and scored
by the host rewards inside the same jit, in calls of `rl.rollout.batch_size` samples.

    rollout_fn = make_rollout_fn(config, stack, mesh, rules, state_sh, weighted, prompt_table, policy_params)
    x0, rewards, parts = rollouts(rollout_fn, chunk, batch_sh, state, ref, ...)

The rewards are host callbacks inside `jax.shard_map` (`ng_jax.rewards.host.make_reward_fn`): each
device hands its own shard to its own host process; `prompt_table` is refilled with the epoch's
prompts before the call, and the jitted side passes integer prompt ids into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ng_jax import flow, sharding
from ng_jax.rewards.host import make_reward_fn
from ng_jax.sampling import make_sampler


def optional_float(cfg, key: str) -> float | None:
    """An optional float knob (absent or None -> None): rollout/eval `mu` (FLUX) and `s_min` (SD3)."""
    value = cfg.get(key)
    return None if value is None else float(value)


def sampler_sigmas(ro):
    """The rollout's sigma grid (`rl.rollout`): the grid the train step draws its timesteps from."""
    return flow.sigma_grid(int(ro.num_steps), shift=float(ro.shift), mu=optional_float(ro, "mu"),
                           s_min=optional_float(ro, "s_min"))


def make_rollout_fn(config, stack, mesh, rules, state_sh, weighted, prompt_table, policy_params):
    """The jitted `(trainable, ema, ref, decoder, noise, cond, uncond, prompt_ids, rng) -> (x0, total, parts)`,
    traced under the run's activation rules; samples and rewards come back batch-sharded."""
    ro = config.rl.rollout
    sampler = make_sampler(stack.model.apply, num_steps=int(ro.num_steps), shift=float(ro.shift),
                           mu=optional_float(ro, "mu"), s_min=optional_float(ro, "s_min"),
                           cfg_scale=float(ro.cfg_scale), sde_noise=float(ro.sde_noise),
                           sde_window=tuple(ro.sde_window))
    reward_fn = make_reward_fn(weighted, prompt_table, mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))

    def rollout(trainable, ema, ref_params, decoder_params, noise, cond, uncond, prompt_ids, rng, device_inputs):
        source = ema if ro.policy == "old" else trainable
        out = sampler(policy_params(source, ref_params), noise, cond, uncond, rng)
        # Samples -> images on device (toy: the identity; real: VAE decode), then the rewards: host callbacks,
        # and the rewards placed on the devices (`rewards.placement`), fed their text features
        total, parts = reward_fn(stack.decode_fn(decoder_params, out.x0), prompt_ids,
                                 device_inputs if weighted.on_device else None)
        return out.x0, total, parts

    batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(sharding.with_rules(rollout, mesh, rules),
                   in_shardings=(state_sh.params, state_sh.ema, stack.ref_shardings, stack.decoder_shardings,
                                 batch_sh, batch_sh, batch_sh, batch_sh, replicated, replicated),
                   out_shardings=(batch_sh, batch_sh, batch_sh))


def rollouts(rollout_fn, chunk: int, batch_sh, state, ref, dec_params, noise, cond, uncond, prompt_ids, r_sde,
             device_inputs=None):
    """The epoch's rollouts in calls of `chunk` samples (one call when chunk is the whole epoch, the toy
    configs' setting; the SDE key is then the epoch's, as before chunking existed)."""
    n = noise.shape[0]
    outs = []
    for i, s in enumerate(range(0, n, chunk)):
        part = slice(s, s + chunk)
        key = r_sde if chunk == n else jax.random.fold_in(r_sde, i)
        c = cond if chunk == n else jax.device_put(jax.tree.map(lambda x: x[part], cond), batch_sh)
        outs.append(rollout_fn(state.params, state.ema, ref, dec_params, jax.device_put(noise[part], batch_sh), c,
                               uncond, jax.device_put(prompt_ids[part], batch_sh), key, device_inputs or {}))
    if len(outs) == 1:
        return outs[0]
    return tuple(jnp.concatenate(xs, axis=0) for xs in zip(*outs))
