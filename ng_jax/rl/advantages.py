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


def dpo_batch_order(rng: np.random.Generator, n_pairs: int, size: int) -> np.ndarray:
    """Indices of `n_pairs` usable pairs in batches of `size`: a random permutation, the last batch completed
    with pairs drawn again (cycling the permutation), so every usable pair trains and the step keeps its
    static shape; no pair is dropped because the count is not a multiple of the batch. Empty when there
    are no usable pairs."""
    if n_pairs == 0:
        return np.zeros((0,), np.int64)
    order = rng.permutation(n_pairs)
    total = -(-n_pairs // size) * size
    return np.resize(order, total)  # np.resize repeats the array cyclically


def train_batches(config, x0, cond, advantages, rewards, k, epoch):
    """Split one epoch's rollout into optimizer-step batches (shuffled; DPO: winner/loser pairs of every
    group with a reward spread, see `dpo_batch_order`)."""
    rl = config.rl
    rng = np.random.default_rng([config.seed, epoch])
    size = int(rl.train_batch)
    for _ in range(int(rl.inner_epochs)):
        if rl.method == "dpo":
            w, l, valid = dpo_pairs(rewards, k)
            w, l = w[valid], l[valid]
            order = dpo_batch_order(rng, len(w), size)
            for s in range(0, len(order), size):
                idx_w, idx_l = w[order[s:s + size]], l[order[s:s + size]]
                yield TrainBatch(x0=x0[idx_w], cond=jax.tree.map(lambda c: c[idx_w], cond),
                                 advantages=jnp.ones(size), x0_l=x0[idx_l])
        else:
            order = rng.permutation(advantages.shape[0])
            for s in range(0, (len(order) // size) * size, size):
                idx = order[s:s + size]
                yield TrainBatch(x0=x0[idx], cond=jax.tree.map(lambda c: c[idx], cond),
                                 advantages=jnp.asarray(advantages[idx]))
