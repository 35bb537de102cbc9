"""Fixes that decide whether the evidence can be trusted: DPO pairs that never silently vanish, one
norm for training and evaluation, CFG-rescale refused where it would be a no-op."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from ng_jax import flow, losses
from ng_jax.config.checks import check_config
from ng_jax.config.methods import rl_config
from ng_jax.rl.advantages import dpo_batch_order, dpo_pairs, train_batches


def _dpo_config(train_batch=8, seed=0):
    c = mlc.ConfigDict({"seed": seed, "rl": {"method": "dpo", "train_batch": train_batch, "inner_epochs": 1}})
    return c


def test_dpo_trains_every_pair_when_one_group_ties():
    # 8 groups of 4; group 3's rewards all tie -> 7 usable pairs, fewer than one batch of 8. Before the fix
    # this epoch took no optimizer step at all ((7 // 8) * 8 = 0 usable pairs).
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(8, 4)).astype(np.float32)
    rewards[3] = 0.5
    rewards = rewards.reshape(-1)
    x0 = np.arange(32, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # sample index in every entry
    cond = np.arange(32)
    batches = list(train_batches(_dpo_config(), x0, cond, None, rewards, 4, epoch=0))
    assert len(batches) == 1
    winners = set(np.asarray(batches[0].x0[:, 0]).astype(int))
    w, l, valid = dpo_pairs(rewards, 4)
    assert winners == set(w[valid].tolist())  # all 7 winners, one of them twice to fill the batch of 8
    assert not (set(range(12, 16)) & winners)  # the tied group gives no pair
    np.testing.assert_array_equal(np.asarray(batches[0].cond), np.asarray(batches[0].x0[:, 0]).astype(int))


def test_dpo_batch_order_covers_every_pair_and_keeps_the_batch_shape():
    rng = np.random.default_rng(1)
    for n, size in ((7, 8), (8, 8), (9, 8), (1, 4), (17, 5)):
        order = dpo_batch_order(rng, n, size)
        assert len(order) % size == 0 and len(order) == -(-n // size) * size
        assert set(order.tolist()) == set(range(n))
        counts = np.bincount(order, minlength=n)
        assert counts.max() - counts.min() <= 1  # the top-up repeats pairs at most once more than others
    assert len(dpo_batch_order(rng, 0, 8)) == 0


def test_norm_is_one_function_for_training_and_evaluation():
    assert losses.per_sample_norm is flow.per_sample_norm
    x = np.zeros((3, 2, 2), np.float32)
    x[0] = 3.0 / 2  # ||x0|| = sqrt(4 * 2.25) = 3
    x[1, 0, 0] = -4.0
    np.testing.assert_allclose(flow.per_sample_norm(x), [3.0, 4.0, 0.0])
    g = jax.grad(lambda a: flow.per_sample_norm(a).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g[2]).sum()) == 0.0  # zero-safe at x == 0
    np.testing.assert_allclose(flow.norm_ratio(jnp.asarray([3.0, 1.0]), jnp.asarray([2.0, 0.0])),
                               [1.5, 1.0 / flow.NORM_EPS], rtol=1e-6)


def test_cfg_rescale_without_guidance_is_a_one_line_error():
    c = rl_config("awm")
    c.eval.cfg_rescale = 0.7
    with pytest.raises(ValueError, match=r"eval.cfg_rescale=0.7 acts only on a guided velocity.*cfg_scale=1"):
        check_config(c)
    c.eval.cfg_scale = 4.5
    check_config(c)  # guided: fine
