"""From an epoch's rewards to what the optimizer steps train on: group-relative advantages (NFT,
AWM), winner/loser pairs (Flow-DPO), and the shuffled optimizer-step batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import losses
from ng_jax.rl.step import TrainBatch


def make_advantage_fn(config):
    """Jitted `(rewards [N], group ids [N]) -> advantages [N]` (ng_jax.losses.group_advantages)."""
    return jax.jit(lambda r, g: losses.group_advantages(r, g, global_std=bool(config.rl.global_std)))


def dpo_pairs(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (winner index, loser index, valid) with valid False when all rewards tie."""
    r = rewards.reshape(-1, group_size)
    base = np.arange(r.shape[0]) * group_size
    return base + r.argmax(1), base + r.argmin(1), r.max(1) > r.min(1)


def train_batches(config, x0, cond, advantages, rewards, k, epoch):
    """Split one epoch's rollout into optimizer-step batches (shuffled; DPO: winner/loser pairs)."""
    rl = config.rl
    rng = np.random.default_rng([config.seed, epoch])
    size = int(rl.train_batch)
    for _ in range(int(rl.inner_epochs)):
        if rl.method == "dpo":
            w, l, valid = dpo_pairs(rewards, k)
            w, l = w[valid], l[valid]
            order = rng.permutation(len(w))
            usable = (len(order) // size) * size
            for s in range(0, usable, size):
                idx_w, idx_l = w[order[s:s + size]], l[order[s:s + size]]
                yield TrainBatch(x0=x0[idx_w], cond=jax.tree.map(lambda c: c[idx_w], cond),
                                 advantages=jnp.ones(size), x0_l=x0[idx_l])
        else:
            order = rng.permutation(advantages.shape[0])
            for s in range(0, (len(order) // size) * size, size):
                idx = order[s:s + size]
                yield TrainBatch(x0=x0[idx], cond=jax.tree.map(lambda c: c[idx], cond),
                                 advantages=jnp.asarray(advantages[idx]))
