"""ng_jax.losses against independent float64 NumPy implementations written from ALGORITHMS.md."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import losses

SHAPE = (4, 3, 2, 3)  # [B, H, W, C]: tiny, every non-batch dimension is reduced over
AXES = tuple(range(1, len(SHAPE)))
D = int(np.prod(SHAPE[1:]))


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _b(x):  # [B] -> [B, 1, 1, 1]
    return np.asarray(x).reshape((-1,) + (1,) * (len(SHAPE) - 1))


# ------------------------------------------------------------------ NumPy references (float64)


def np_group_advantages(rewards, ids, global_std=False, eps=1e-4):
    rewards = np.asarray(rewards, np.float64)
    out = np.empty_like(rewards)
    all_std = rewards.std()
    for gid in set(ids.tolist()):
        members = ids == gid
        group = rewards[members]
        std = all_std if global_std else group.std()
        out[members] = (group - group.mean()) / (std + eps)
    return out


def np_normguard(v, v_ref, margin, power, relative):
    n = np.sqrt((v.astype(np.float64) ** 2).sum(AXES))
    n_ref = np.sqrt((v_ref.astype(np.float64) ** 2).sum(AXES))
    pen = np.maximum(n - (1 + margin) * n_ref, 0.0) ** power
    if relative:
        pen = pen / np.maximum(n_ref, losses.NORM_EPS) ** power
    return pen


def np_nft(v, v_old, v_ref, x_t, x0, sigma, adv, beta, kl_beta, c):
    """Value and analytic gradient w.r.t. v (the adaptive weights are constants)."""
    s = _b(sigma)
    r = np.clip(np.clip(adv, -c, c) / (2 * c) + 0.5, 0, 1)
    b = v.shape[0]
    terms, grads = {}, {}
    for name, v_s, dv_s in (("pos", beta * v + (1 - beta) * v_old, beta),
                            ("neg", (1 + beta) * v_old - beta * v, -beta)):
        e = x_t - s * v_s - x0
        w = np.maximum(np.abs(e).mean(AXES), 1e-5)
        terms[name] = (e ** 2).mean(AXES) / w
        grads[name] = 2 * e * (-s) * dv_s / (D * _b(w))
    policy = np.mean((r * terms["pos"] + (1 - r) * terms["neg"]) / beta) * c
    kl = np.mean(((v - v_ref) ** 2).mean(AXES))
    grad = c / (b * beta) * (_b(r) * grads["pos"] + _b(1 - r) * grads["neg"]) + kl_beta * 2 * (v - v_ref) / (b * D)
    return policy + kl_beta * kl, grad, {"policy_loss": policy, "kl": kl, "optimality_prob": r.mean()}


def np_awm(v, v_ref, v_ema, target, sigma, adv, beta, ema_beta, p, clip_range, adv_clip):
    """On-policy value and analytic gradient w.r.t. v (ratio == 1)."""
    b = v.shape[0]
    mse = ((v - target) ** 2).mean(AXES)
    a_c = np.clip(adv, -adv_clip, adv_clip) / adv_clip
    ratio = np.ones(b)
    policy = np.mean(np.maximum(-a_c * ratio, -a_c * np.clip(ratio, 1 - clip_range, 1 + clip_range)))
    kl_ref = np.mean(((v - v_ref) ** 2).mean(AXES))
    kl_ema = np.mean(((v - v_ema) ** 2).mean(AXES))
    dlp = -_b(sigma * (mse + 1e-10) ** (p - 1)) * 2 * (v - target) / D
    grad = -_b(a_c) * dlp / b + beta * 2 * (v - v_ref) / (b * D) + ema_beta * 2 * (v - v_ema) / (b * D)
    lp = -(sigma / p) * ((mse + 1e-10) ** p - 1e-10 ** p)
    return policy + beta * kl_ref + ema_beta * kl_ema, grad, {"policy_loss": policy, "kl_ref": kl_ref,
                                                              "kl_ema": kl_ema, "log_prob": lp.mean()}


def np_dpo(v_w, v_l, v_ref_w, v_ref_l, t_w, t_l, beta):
    err = lambda a, t: ((a - t) ** 2).mean(AXES)  # noqa: E731
    inside = -0.5 * beta * ((err(v_w, t_w) - err(v_ref_w, t_w)) - (err(v_l, t_l) - err(v_ref_l, t_l)))
    return np.mean(np.logaddexp(0.0, -inside)), np.mean(inside > 0)


def _rand(rng, *extra, scale=1.0):
    return [rng.normal(size=SHAPE) * scale for _ in extra]


# ------------------------------------------------------------------ group advantages


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_unsorted_noncontiguous_ids(global_std):
    rng = np.random.default_rng(1)
    ids = rng.choice(np.array([1000, -3, 42, 7]), size=24).astype(np.int32)
    rewards = rng.normal(size=24) * 3 + 1
    want = np_group_advantages(rewards, ids, global_std)
    got = losses.group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids), global_std=global_std)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda r, g: losses.group_advantages(r, g, global_std=global_std))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(rewards, jnp.float32), jnp.asarray(ids))), want,
                               rtol=1e-5, atol=1e-5)


def test_group_advantages_single_member_and_constant_groups():
    rewards = jnp.asarray([3.0, 1.0, 2.0, 2.0, 5.0, -7.0])
    ids = jnp.asarray([9, 4, 4, 4, 11, 4])  # 9 and 11 have one member each
    got = np.asarray(losses.group_advantages(rewards, ids))
    assert np.all(np.isfinite(got))
    assert got[0] == 0.0 and got[4] == 0.0
    np.testing.assert_allclose(got, np_group_advantages(np.asarray(rewards), np.asarray(ids)), rtol=1e-5)
    same = losses.group_advantages(jnp.full((4,), 2.5), jnp.asarray([0, 0, 1, 1]))
    np.testing.assert_array_equal(np.asarray(same), 0.0)


def test_group_advantages_global_std_uses_all_rewards():
    rewards = np.asarray([0.0, 2.0, 10.0, 30.0])
    ids = np.asarray([0, 0, 1, 1])
    got = np.asarray(losses.group_advantages(jnp.asarray(rewards), jnp.asarray(ids), global_std=True))
    np.testing.assert_allclose(got, (rewards - np.asarray([1, 1, 20, 20])) / (rewards.std() + 1e-4), rtol=1e-5)


@pytest.mark.parametrize("rewards, ids, match", [
    (np.zeros((4, 1)), np.zeros(4, np.int32), "shape \\[N\\]"),
    (np.zeros(4), np.zeros(3, np.int32), "one group id per reward"),
    (np.zeros(4), np.zeros(4, np.float32), "integers"),
])
def test_group_advantages_bad_inputs(rewards, ids, match):
    with pytest.raises(ValueError, match=match):
        losses.group_advantages(jnp.asarray(rewards), jnp.asarray(ids))


# ------------------------------------------------------------------ NormGuard hinge


def _scaled_to_ratio(rng, v_ref, ratios):
    """Random directions with per-sample ||v|| = ratios * ||v_ref||."""
    direction = rng.normal(size=v_ref.shape)
    direction /= np.sqrt((direction ** 2).sum(AXES, keepdims=True))
    return direction * _b(ratios * np.sqrt((v_ref ** 2).sum(AXES)))


def _penalty_and_grads(v, v_ref, margin, power, relative):
    def total(v, v_ref):
        return jnp.sum(losses.normguard_penalty(v, v_ref, margin=margin, power=power, relative=relative))

    pen = losses.normguard_penalty(v, v_ref, margin=margin, power=power, relative=relative)
    g_v, g_ref = jax.grad(total, argnums=(0, 1))(v, v_ref)
    return np.asarray(pen), np.asarray(g_v), np.asarray(g_ref)


SETTINGS = list(itertools.product([0.0, 0.05, 0.5], [1, 2], [True, False]))


@pytest.mark.parametrize("margin, power, relative", SETTINGS)
def test_normguard_zero_at_or_below_bound(margin, power, relative):
    rng = np.random.default_rng(int(100 * margin) + 10 * power + relative)
    for _ in range(10):
        v_ref = rng.normal(size=SHAPE) * rng.uniform(0.1, 10)
        ratios = rng.uniform(0.0, (1 + margin) * (1 - 1e-4), size=SHAPE[0])
        v, v_ref = _f32(_scaled_to_ratio(rng, v_ref, ratios), v_ref)
        pen, g_v, g_ref = _penalty_and_grads(v, v_ref, margin, power, relative)
        assert np.all(pen == 0.0)
        assert np.all(g_v == 0.0) and np.all(g_ref == 0.0)
    # exactly at the bound (margin 0, v == v_ref) the hinge is still exactly zero
    pen, g_v, _ = _penalty_and_grads(v_ref, v_ref, 0.0, power, relative)
    assert np.all(pen == 0.0) and np.all(g_v == 0.0)


@pytest.mark.parametrize("margin, power, relative", SETTINGS)
def test_normguard_above_bound_matches_numpy_and_only_shrinks_norm(margin, power, relative):
    rng = np.random.default_rng(7 + int(100 * margin) + 10 * power + relative)
    for _ in range(10):
        v_ref = rng.normal(size=SHAPE) * rng.uniform(0.1, 10)
        # half the samples above the bound, half below
        ratios = np.where(np.arange(SHAPE[0]) % 2 == 0, rng.uniform(1.01, 2.0, SHAPE[0]) * (1 + margin),
                          rng.uniform(0.2, 0.99, SHAPE[0]) * (1 + margin))
        v64 = _scaled_to_ratio(rng, v_ref, ratios)
        v, v_ref32 = _f32(v64, v_ref)
        pen, g_v, g_ref = _penalty_and_grads(v, v_ref32, margin, power, relative)
        np.testing.assert_allclose(pen, np_normguard(v64, v_ref, margin, power, relative), rtol=2e-4, atol=1e-7)
        assert np.all(g_ref == 0.0), "v_ref must carry no gradient"
        above = ratios > (1 + margin)
        assert np.all(pen[above] > 0) and np.all(pen[~above] == 0)
        assert np.all(g_v[~above] == 0.0)
        vf = np.asarray(v, np.float64)
        for i in np.flatnonzero(above):
            g, x = g_v[i].ravel().astype(np.float64), vf[i].ravel()
            cos = g @ x / (np.linalg.norm(g) * np.linalg.norm(x))
            assert cos > 1 - 1e-5, "the gradient must be parallel to v (never touches direction)"
            eta = 0.5 * np.linalg.norm(x) / np.linalg.norm(g)
            stepped = x - eta * g
            assert np.linalg.norm(stepped) < np.linalg.norm(x)
            stepped_dir = stepped / np.linalg.norm(stepped)
            np.testing.assert_allclose(stepped_dir, x / np.linalg.norm(x), atol=1e-5)


def test_normguard_finite_gradient_at_zero_and_zero_reference():
    zero = jnp.zeros(SHAPE)
    v = jnp.asarray(np.random.default_rng(3).normal(size=SHAPE), jnp.float32)
    for a, b in ((zero, v), (zero, zero), (v, zero)):
        for power, relative in itertools.product((1, 2), (True, False)):
            pen, g_v, _ = _penalty_and_grads(a, b, 0.0, power, relative)
            assert np.all(np.isfinite(pen)) and np.all(np.isfinite(g_v))
    pen, g_v, _ = _penalty_and_grads(zero, v, 0.0, 1, True)
    assert np.all(pen == 0) and np.all(g_v == 0)


@pytest.mark.parametrize("kwargs, match", [({"power": 3}, "power must be 1 or 2"),
                                           ({"margin": -1.5}, "margin must be > -1")])
def test_normguard_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.normguard_penalty(jnp.ones(SHAPE), jnp.ones(SHAPE), **kwargs)
    with pytest.raises(ValueError, match="identical"):
        losses.normguard_penalty(jnp.ones(SHAPE), jnp.ones((4, 3)))


def test_with_normguard_adds_mean_penalty_over_all_pairs():
    rng = np.random.default_rng(5)
    vs = [rng.normal(size=SHAPE) * s for s in (1.5, 0.7)]
    refs = [rng.normal(size=SHAPE) for _ in range(2)]
    base = jnp.float32(0.25)
    kw = dict(margin=0.1, power=2, relative=True)
    total, aux = losses.with_normguard(base, _f32(*vs), _f32(*refs), lam=0.3, **kw)
    pens = np.concatenate([np_normguard(v, r, 0.1, 2, True) for v, r in zip(vs, refs)])
    np.testing.assert_allclose(float(total), 0.25 + 0.3 * pens.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["normguard_penalty"]), pens.mean(), rtol=1e-5)
    ratios = np.concatenate([np.sqrt((v ** 2).sum(AXES) / (r ** 2).sum(AXES)) for v, r in zip(vs, refs)])
    np.testing.assert_allclose(float(aux["norm_ratio"]), ratios.mean(), rtol=1e-5)
    assert float(aux["normguard_active_frac"]) == pytest.approx(np.mean(ratios > 1.1))
    assert 0 < float(aux["normguard_active_frac"]) < 1  # the test data exercise both sides


def test_with_normguard_lam_zero_adds_exactly_nothing():
    rng = np.random.default_rng(6)
    v, v_ref = _f32(rng.normal(size=SHAPE) * 3, rng.normal(size=SHAPE))
    kw = dict(margin=0.0, power=1, relative=True)

    def base(v):
        return jnp.mean(jnp.sin(v) ** 2)

    def guarded(v, lam):
        return losses.with_normguard(base(v), [v], [v_ref], lam=lam, **kw)[0]

    assert float(losses.normguard_penalty(v, v_ref, **kw).mean()) > 0
    assert guarded(v, 0.0) == base(v) and guarded(v, 0) == base(v)
    np.testing.assert_array_equal(np.asarray(jax.grad(guarded)(v, 0.0)), np.asarray(jax.grad(base)(v)))
    assert float(guarded(v, 1.0)) > float(base(v))
    with pytest.raises(ValueError, match="same non-zero number"):
        losses.with_normguard(base(v), [v, v], [v_ref], lam=1.0, **kw)


# ------------------------------------------------------------------ NFT


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_value_gradient_and_aux(beta):
    rng = np.random.default_rng(int(beta * 10))
    x0, eps, v, v_old, v_ref = _rand(rng, *range(5))
    sigma = rng.uniform(0.05, 0.95, SHAPE[0])
    x_t = (1 - _b(sigma)) * x0 + _b(sigma) * eps
    adv = rng.normal(size=SHAPE[0]) * 4  # some beyond the clip range
    kw = dict(beta=beta, kl_beta=0.3, adv_clip=5.0)
    want, want_grad, want_aux = np_nft(v, v_old, v_ref, x_t, x0, sigma, adv, beta, 0.3, 5.0)
    args = _f32(v_old, v_ref, x_t, x0, sigma, adv)

    def f(v):
        return losses.nft_loss(v, *args, **kw)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-4, atol=1e-7)
    for k, w in want_aux.items():
        np.testing.assert_allclose(float(aux[k]), w, rtol=2e-5, err_msg=k)
    # v_old and v_ref carry no gradient
    vj = jnp.asarray(v, jnp.float32)
    g_old, g_ref = jax.grad(lambda o, r: losses.nft_loss(vj, o, r, *args[2:], **kw)[0], argnums=(0, 1))(*args[:2])
    assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_ref) == 0)


def test_nft_scalar_sigma_broadcasts_and_bad_sigma_raises():
    rng = np.random.default_rng(11)
    v, v_old, v_ref, x_t, x0 = _f32(*_rand(rng, *range(5)))
    adv = jnp.asarray([1.0, -1.0, 0.5, 9.0])
    a, _ = losses.nft_loss(v, v_old, v_ref, x_t, x0, 0.4, adv)
    b, _ = losses.nft_loss(v, v_old, v_ref, x_t, x0, jnp.full((4,), 0.4), adv)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    with pytest.raises(ValueError, match="sigma must be a scalar or shape \\(4,\\)"):
        losses.nft_loss(v, v_old, v_ref, x_t, x0, jnp.ones((4, 1)), adv)
    with pytest.raises(ValueError, match="x0 has shape"):
        losses.nft_loss(v, v_old, v_ref, x_t, x0[:2], 0.4, adv)


# ------------------------------------------------------------------ AWM


@pytest.mark.parametrize("p", [0.25, 1.0])
def test_awm_loss_value_and_on_policy_gradient(p):
    rng = np.random.default_rng(int(p * 100))
    v, v_ref, v_ema, target = _rand(rng, *range(4))
    sigma = rng.uniform(0.05, 0.95, SHAPE[0])
    adv = rng.normal(size=SHAPE[0]) * 4
    kw = dict(beta=0.2, ema_beta=0.7, p=p, clip_range=1.0, adv_clip=5.0)
    want, want_grad, want_aux = np_awm(v, v_ref, v_ema, target, sigma, adv, 0.2, 0.7, p, 1.0, 5.0)
    rest = _f32(v_ref, v_ema, target, sigma, adv)
    (loss, aux), grad = jax.value_and_grad(lambda v: losses.awm_loss(v, *rest, **kw), has_aux=True)(
        jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-4, atol=1e-7)
    for k, w in want_aux.items():
        np.testing.assert_allclose(float(aux[k]), w, rtol=2e-5, atol=1e-7, err_msg=k)
    assert float(aux["ratio_mean"]) == 1.0 and float(aux["clip_frac"]) == 0.0


def test_awm_policy_gradient_is_advantage_weighted_log_prob_gradient():
    rng = np.random.default_rng(21)
    v, v_ref, v_ema, target = _f32(*_rand(rng, *range(4)))
    sigma, adv = _f32(rng.uniform(0.1, 0.9, SHAPE[0]), rng.normal(size=SHAPE[0]) * 3)
    g_awm = jax.grad(lambda v: losses.awm_loss(v, v_ref, v_ema, target, sigma, adv, beta=0.0, ema_beta=0.0)[0])(v)
    a_c = jnp.clip(adv, -5, 5) / 5
    g_plain = jax.grad(lambda v: -jnp.mean(a_c * losses.awm_log_prob(v, target, sigma)))(v)
    np.testing.assert_allclose(np.asarray(g_awm), np.asarray(g_plain), rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(g_plain).max()) > 0


# ------------------------------------------------------------------ DPO


def test_dpo_loss_is_log2_when_policy_equals_reference():
    rng = np.random.default_rng(31)
    v_w, v_l, t_w, t_l = _f32(*_rand(rng, *range(4)))
    loss, aux = losses.dpo_loss(v_w, v_l, v_w, v_l, t_w, t_l, beta=100.0)
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)
    assert float(aux["implicit_acc"]) == 0.0 and float(aux["inside_mean"]) == 0.0


@pytest.mark.parametrize("beta", [100.0, 2.0])
def test_dpo_loss_value_and_finite_difference_gradient(beta):
    rng = np.random.default_rng(int(beta))
    v_w, v_l, v_ref_w, v_ref_l, t_w, t_l = _rand(rng, *range(6), scale=0.3)
    want, want_acc = np_dpo(v_w, v_l, v_ref_w, v_ref_l, t_w, t_l, beta)
    loss, aux = losses.dpo_loss(*_f32(v_w, v_l, v_ref_w, v_ref_l, t_w, t_l), beta=beta)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(aux["implicit_acc"]) == pytest.approx(want_acc)
    with jax.enable_x64(True):
        g_w, g_l, g_rw = jax.grad(lambda a, b, c: losses.dpo_loss(a, b, c, v_ref_l, t_w, t_l, beta=beta)[0],
                                  argnums=(0, 1, 2))(jnp.asarray(v_w), jnp.asarray(v_l), jnp.asarray(v_ref_w))
        assert g_w.dtype == jnp.float64
    assert np.all(np.asarray(g_rw) == 0), "the reference carries no gradient"
    h = 1e-6
    for x, g, which in ((v_w, g_w, 0), (v_l, g_l, 1)):
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = [v_w, plus] if which else [plus, v_l]
            args_m = [v_w, minus] if which else [minus, v_l]
            fd[idx] = (np_dpo(*args_p, v_ref_w, v_ref_l, t_w, t_l, beta)[0]
                       - np_dpo(*args_m, v_ref_w, v_ref_l, t_w, t_l, beta)[0]) / (2 * h)
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-5, atol=1e-9)
