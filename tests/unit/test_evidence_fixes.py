"""Fixes that decide whether the evidence can be trusted: DPO pairs that never silently vanish, one
norm for training and evaluation, CFG-rescale refused where it would be a no-op."""

from __future__ import annotations

import dataclasses

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


def test_eval_norms_mode_is_checked_in_the_block_and_in_each_variant():
    c = rl_config("awm")
    c.eval.norms = "sometimes"
    with pytest.raises(ValueError, match=r"^eval.norms='sometimes': expected \"always\" or \"final\" or \"never\"$"):
        check_config(c)
    c.eval.norms = "final"
    c.eval.variants = mlc.ConfigDict({"steps4": {"num_steps": 4, "norms": "nope"}})
    with pytest.raises(ValueError, match=r"^eval.variants.steps4.norms='nope': expected"):
        check_config(c)
    c.eval.variants.steps4.norms = "never"
    check_config(c)


@pytest.mark.parametrize("method", ["awm", "dpo"])
def test_term_gradients_add_up_to_the_step_gradient_and_match_hand_computed_v_gradients(method):
    """With term_grads the step's gradient is unchanged (base + lam * hinge pulled back through one forward),
    and the logged norms at v equal those of the two terms' gradients computed directly."""
    import optax

    from ng_jax.rl.step import StepSpec, make_micro_grad

    d = 6
    w0 = jax.random.normal(jax.random.key(0), (d, d)) * 0.3
    apply_fn = lambda p, x, s, c: (x @ p["w"]) * (1.0 + s[:, None])  # noqa: E731 - a linear "model"
    params, ref = {"w": w0 * 1.5}, {"w": w0}
    n = 4
    x0 = jax.random.normal(jax.random.key(1), (n, d))
    mb_kw = dict(x0=x0, cond=jnp.zeros((n, 1)), advantages=jnp.linspace(-1.0, 1.0, n))
    from ng_jax.rl.step import TrainBatch
    mb = TrainBatch(**mb_kw, x0_l=(x0[::-1] if method == "dpo" else None))
    sigma, keys = jnp.full((n,), 0.6), jax.random.split(jax.random.key(2), n)
    loss_kwargs = dict(beta=100.0) if method == "dpo" else dict(beta=1e-4, ema_beta=1.0, p=0.25, clip_range=1.0,
                                                                 adv_clip=5.0)
    spec = StepSpec(method=method, micro_batch=n, num_timesteps=1, grid=(1.0, 0.5), grid_fraction=1.0,
                    loss_kwargs=loss_kwargs, lam=0.7)
    plain = make_micro_grad(apply_fn, spec, lambda p, r: p)
    split = make_micro_grad(apply_fn, dataclasses.replace(spec, term_grads=True), lambda p, r: p)
    loss_a, g_a, aux_a = plain(params, ref, params, mb, sigma, keys)
    loss_b, g_b, aux_b = split(params, ref, params, mb, sigma, keys)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    np.testing.assert_allclose(g_a["w"], g_b["w"], rtol=1e-4, atol=1e-6)
    # The hinge's parameter gradient per unit lam: the step's gradient minus the base-only gradient, / lam.
    base_only = make_micro_grad(apply_fn, dataclasses.replace(spec, lam=0.0), lambda p, r: p)
    _, g_base, _ = base_only(params, ref, params, mb, sigma, keys)
    np.testing.assert_allclose(aux_b["grad_param_base"], optax.global_norm(g_base), rtol=1e-4)
    np.testing.assert_allclose(aux_b["grad_param_hinge"], optax.global_norm((g_a["w"] - g_base["w"]) / 0.7),
                               rtol=1e-3)
    assert float(aux_b["grad_v_hinge"]) > 0 and float(aux_b["grad_v_base"]) > 0  # the policy is inflated (1.5x)


def test_renders_keep_the_data_range_and_leave_headroom_past_it():
    from ng_jax.data.render import HEADROOM_GAIN, KNEE, render_fn, soft_saturate

    x = jnp.linspace(-3.0, 3.0, 601)
    np.testing.assert_array_equal(render_fn("clip")(x), x)  # clip happens at quantisation
    soft = np.asarray(soft_saturate(x))
    inside = np.abs(np.asarray(x)) <= KNEE
    np.testing.assert_allclose(soft[inside], np.asarray(x)[inside])        # identity inside the knee
    assert np.all(np.abs(soft) <= 1.0) and np.all(np.diff(soft) >= 0)  # bounded, monotone ...
    near = np.abs(np.asarray(x[:-1])) < 1.5
    assert np.all(np.diff(soft)[near] > 0)  # ... and strictly increasing where float32 can tell
    head = np.asarray(render_fn("headroom")(x))
    np.testing.assert_allclose(head[np.abs(np.asarray(x)) <= 1.0], HEADROOM_GAIN * np.asarray(x)[np.abs(np.asarray(x)) <= 1.0],
                               rtol=1e-6)  # the data range fills 70% of the display
    assert float(render_fn("headroom")(jnp.asarray(1.4))) > 0.9  # overshoot renders past any data value
    with pytest.raises(ValueError, match="render='vivid'"):
        render_fn("vivid")
