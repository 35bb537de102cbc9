"""ng_jax.flow and ng_jax.sampling against hand computations with a toy analytic velocity model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import flow, sampling

B, SHAPE = 3, (4, 4, 2)
PARAMS = {"a": jnp.float32(0.8), "b": jnp.float32(-0.5)}
REF_PARAMS = {"a": jnp.float32(0.6), "b": jnp.float32(-0.2)}


def toy_apply(p, x, s, c):
    """A velocity model with a pytree condition: tanh(x) and sigma-dependent terms plus a bias."""
    bias = c["y"][:, None, None, :] + c["z"][:, None, None, None]
    return p["a"] * jnp.tanh(x) + p["b"] * s[:, None, None, None] * x + bias


def np_apply(p, x, s, c):
    a, b = float(p["a"]), float(p["b"])
    y, z = np.asarray(c["y"], np.float64), np.asarray(c["z"], np.float64)
    return a * np.tanh(x) + b * s * x + y[:, None, None, :] + z[:, None, None, None]


def make_cond(seed):
    ky, kz = jax.random.split(jax.random.key(seed))
    return {"y": jax.random.normal(ky, (B, SHAPE[-1])), "z": jax.random.normal(kz, (B,))}


NOISE = jax.random.normal(jax.random.key(0), (B,) + SHAPE)
COND, UNCOND = make_cond(1), make_cond(2)


@functools.lru_cache(maxsize=None)
def sampler(**kw):
    """Jitted samplers shared by the tests (compiled once per configuration)."""
    kw.setdefault("record", ("x0",))
    return jax.jit(sampling.make_sampler(toy_apply, **kw))


def np_grid_shift(n, shift):
    s = np.linspace(1.0, 1.0 / n, n)
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0)


# ----------------------------------------------------------------------------------------------
# flow


def test_interpolate_target_x0_consistency():
    x0 = jax.random.normal(jax.random.key(3), (B,) + SHAPE)
    for sigma in (jnp.float32(0.37), jnp.array([0.1, 0.5, 0.9], jnp.float32)):
        x_t = flow.interpolate(x0, NOISE, sigma)
        s = np.asarray(sigma).reshape(-1, 1, 1, 1) if np.ndim(sigma) else float(sigma)
        np.testing.assert_allclose(x_t, (1 - s) * np.asarray(x0) + s * np.asarray(NOISE), rtol=1e-6, atol=1e-6)
        back = flow.x0_from_velocity(x_t, sigma, flow.velocity_target(x0, NOISE))
        np.testing.assert_allclose(back, x0, atol=1e-5)
    np.testing.assert_array_equal(flow.interpolate(x0, NOISE, 0.0), x0)
    np.testing.assert_array_equal(flow.interpolate(x0, NOISE, jnp.ones(B)), NOISE)
    with pytest.raises(ValueError):
        flow.interpolate(x0, NOISE, jnp.ones(B + 1))


def test_per_sample_reductions():
    x = np.asarray(NOISE)
    np.testing.assert_allclose(flow.per_sample_norm(x), np.sqrt((x.astype(np.float64) ** 2).sum((1, 2, 3))), rtol=1e-6)
    np.testing.assert_allclose(flow.per_sample_mean(x), x.mean((1, 2, 3)), rtol=1e-5, atol=1e-7)
    assert flow.per_sample_norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize("n,shift", [(1, 1.0), (10, 1.0), (10, 3.0), (14, 3.0), (4, 0.5)])
def test_sigma_grid_shift(n, shift):
    g = np.asarray(flow.sigma_grid(n, shift=shift))
    assert g.dtype == np.float32 and g.shape == (n + 1,)
    assert g[0] == 1.0 and g[-1] == 0.0
    assert np.all(np.diff(g) < 0)
    np.testing.assert_allclose(g, np_grid_shift(n, shift), rtol=1e-6, atol=1e-7)


def test_sigma_grid_exponential_shift_and_flux_mu():
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(2176) == pytest.approx(0.825)
    mu = flow.flux_mu(1024)
    g = np.asarray(flow.sigma_grid(8, mu=mu))
    s = np.linspace(1, 1 / 8, 8)
    np.testing.assert_allclose(g[:-1], np.exp(mu) / (np.exp(mu) + (1 / s - 1)), rtol=1e-6)
    assert g[0] == pytest.approx(1.0) and g[-1] == 0.0 and np.all(np.diff(g) < 0)
    # jittable with static num_steps, traced shift
    jg = jax.jit(lambda sh: flow.sigma_grid(6, shift=sh))(3.0)
    np.testing.assert_allclose(jg, np_grid_shift(6, 3.0), rtol=1e-6, atol=1e-7)


@pytest.mark.needs_torch
@pytest.mark.parametrize("n", [1, 10, 28])
def test_sigma_grid_matches_diffusers(n):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    # SD3 shift with the FLUX-style explicit grid linspace(1, 1/N, N)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    np.testing.assert_allclose(flow.sigma_grid(n, shift=3.0), sched.sigmas.numpy(), rtol=1e-6, atol=1e-6)
    # SD3 pipeline default: set_timesteps(N) ends the linspace at the smallest training sigma
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    ours = flow.sigma_grid(n, shift=3.0, s_min=flow.shift_sigmas(1.0 / 1000, 3.0))
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=1e-6, atol=1e-6)
    # FLUX dynamic shifting
    mu = flow.flux_mu(1024)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    np.testing.assert_allclose(flow.sigma_grid(n, mu=mu), sched.sigmas.numpy(), rtol=1e-6, atol=1e-6)


def test_logit_normal():
    s = np.asarray(flow.sample_logit_normal(jax.random.key(4), (20000,), mean=0.5, std=1.0))
    assert s.min() > 0 and s.max() < 1
    assert np.median(s) == pytest.approx(1 / (1 + np.exp(-0.5)), abs=0.01)
    t = np.asarray(flow.sample_logit_normal(jax.random.key(4), (20000,), mean=0.5, std=1.0, shift=3.0))
    np.testing.assert_allclose(t, 3 * s / (1 + 2 * s), rtol=1e-5)
    assert flow.sample_logit_normal(jax.random.key(0), (2, 5)).shape == (2, 5)


def test_permuted_grid_timesteps():
    grid = flow.sigma_grid(10, shift=3.0)[:-1]
    ts = np.asarray(jax.jit(flow.permuted_grid_timesteps, static_argnums=(2, 3))(jax.random.key(5), grid, 16, 0.99))
    assert ts.shape == (9, 16)  # int(0.99 * 10) = 9
    prefix = np.sort(np.asarray(grid[:9]))
    for col in ts.T:
        np.testing.assert_array_equal(np.sort(col), prefix)
    assert len({tuple(c) for c in ts.T}) > 1  # each sample its own order
    # the prefix length is not lost to float rounding: 0.29 * 100 = 28.999999999999996
    assert flow.permuted_grid_timesteps(jax.random.key(0), jnp.linspace(1, 0.01, 100), 2, 0.29).shape == (29, 2)
    assert flow.permuted_grid_timesteps(jax.random.key(0), grid, 2, 0.01).shape == (1, 2)


def test_stratified_slot_timesteps():
    grid = np.asarray(flow.sigma_grid(14, shift=3.0)[:-1])
    strata = np.array_split(np.arange(13), 6)  # K = round(0.9 * 14) = 13
    fn = jax.jit(jax.vmap(lambda k: flow.stratified_slot_timesteps(k, jnp.asarray(grid), 6, 0.9)))
    vals = np.asarray(fn(jax.random.split(jax.random.key(6), 400)))
    assert vals.shape == (400, 6)
    idx = np.abs(vals[..., None] - grid).argmin(-1)
    for j, stratum in enumerate(strata):
        assert set(idx[:, j]) == set(stratum.tolist())  # inside its stratum, every index reached
    with pytest.raises(ValueError):
        flow.stratified_slot_timesteps(jax.random.key(0), jnp.asarray(grid), 15, 0.9)


# ----------------------------------------------------------------------------------------------
# sampling: guidance helpers and conversions


def np_cfg_rescale(v_cfg, v_c, phi):
    """ALGORITHMS.md sec 6 item 7, written out: phi * v_cfg * std(v_c) / max(std(v_cfg), 1e-12) + (1 - phi) * v_cfg,
    with per-sample population standard deviations over every non-batch axis."""
    v_cfg, v_c = np.asarray(v_cfg, np.float64), np.asarray(v_c, np.float64)
    out = np.empty_like(v_cfg)
    for b in range(len(v_cfg)):
        std_c = np.sqrt(np.mean((v_c[b] - v_c[b].mean()) ** 2))
        std_cfg = np.sqrt(np.mean((v_cfg[b] - v_cfg[b].mean()) ** 2))
        out[b] = phi * v_cfg[b] * std_c / max(std_cfg, 1e-12) + (1 - phi) * v_cfg[b]
    return out


def test_cfg_rescale_formula():
    # Independent velocities whose per-sample spreads differ from sample to sample and, within a sample, from
    # channel to channel and row to row: any other reduction (per channel, per row, over the batch) differs.
    rng = np.random.default_rng(4)
    scale_c = rng.uniform(0.2, 3.0, (B, 1, 1, 1)) * rng.uniform(0.5, 2.0, (1, 1, 1, SHAPE[-1]))
    scale_cfg = rng.uniform(0.2, 3.0, (B, 1, 1, 1)) * rng.uniform(0.5, 2.0, (1, SHAPE[0], 1, 1))
    vc = (rng.standard_normal((B,) + SHAPE) * scale_c + rng.normal(size=(B, 1, 1, 1))).astype(np.float32)
    vcfg = (rng.standard_normal((B,) + SHAPE) * scale_cfg - 0.3).astype(np.float32)
    for phi in (0.7, 1.0):
        out = np.asarray(sampling.cfg_rescale(jnp.asarray(vcfg), jnp.asarray(vc), phi))
        np.testing.assert_allclose(out, np_cfg_rescale(vcfg, vc, phi), rtol=1e-5, atol=1e-6)
    # phi = 1 gives every sample exactly the conditional velocity's spread
    out = np.asarray(sampling.cfg_rescale(jnp.asarray(vcfg), jnp.asarray(vc), 1.0))
    np.testing.assert_allclose(out.std((1, 2, 3)), vc.std((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(sampling.cfg_rescale(jnp.asarray(vcfg), jnp.asarray(vc), 0.0), vcfg, rtol=1e-6)
    # a constant guided velocity (std 0) is left as it is rather than divided by zero
    flat = np.full((1,) + SHAPE, 0.25, np.float32)
    np.testing.assert_allclose(sampling.cfg_rescale(jnp.asarray(flat), jnp.asarray(vc[:1]), 0.7),
                               np_cfg_rescale(flat, vc[:1], 0.7), rtol=1e-6)
    np.testing.assert_allclose(sampling.cfg_combine(1.0, 3.0, 2.5), 6.0)


def test_uint8_round_trip():
    u = np.arange(256, dtype=np.uint8)
    f = np.asarray(sampling.from_uint8(u))
    assert f.dtype == np.float32 and f[0] == -1.0 and f[-1] == 1.0
    np.testing.assert_array_equal(sampling.to_uint8(f), u)
    np.testing.assert_array_equal(sampling.to_uint8(jnp.array([-3.0, -1.0, 0.0, 1.0, 7.0])), [0, 0, 128, 255, 255])
    x = np.asarray(NOISE).clip(-1, 1)
    assert np.abs(np.asarray(sampling.from_uint8(sampling.to_uint8(x))) - x).max() <= 0.5 / 127.5 + 1e-6


# ----------------------------------------------------------------------------------------------
# sampling: the sampler


def np_euler(p, noise, cond, grid, uncond=None, w=1.0, scales=None):
    x = np.asarray(noise, np.float64)
    for i in range(len(grid) - 1):
        s = grid[i]
        v = np_apply(p, x, s, cond)
        if uncond is not None:
            v = np_apply(p, x, s, uncond) + w * (v - np_apply(p, x, s, uncond))
        x = x + (grid[i + 1] - s) * (1.0 if scales is None else scales[i]) * v
    return x


def test_euler_matches_numpy():
    for n in (2, 3):
        out = sampler(num_steps=n, shift=3.0)(PARAMS, NOISE, COND)
        grid = np_grid_shift(n, 3.0)
        np.testing.assert_allclose(out.sigmas, grid, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out.x0, np_euler(PARAMS, NOISE, COND, grid), rtol=1e-5, atol=1e-5)
        assert out.trajectory is None and out.velocities is None and out.log_probs is None
    np.testing.assert_allclose(sampling.euler_sample(toy_apply, PARAMS, NOISE, COND, 3, shift=3.0), out.x0, atol=1e-6)


def test_cfg_one_batched_call_equals_separate_calls():
    batches = []

    def counting_apply(p, x, s, c):
        batches.append(x.shape[0])
        return toy_apply(p, x, s, c)

    fn = jax.jit(sampling.make_sampler(counting_apply, num_steps=3, shift=3.0, cfg_scale=4.0))
    out = fn(PARAMS, NOISE, COND, UNCOND)
    assert batches and set(batches) == {2 * B}
    ref = np_euler(PARAMS, NOISE, COND, np_grid_shift(3, 3.0), uncond=UNCOND, w=4.0)
    np.testing.assert_allclose(out.x0, ref, rtol=1e-5, atol=1e-5)
    # CFG-rescale on top of the combined velocity (one step from sigma 1 to 0: x0 = noise - v)
    resc = sampler(num_steps=1, cfg_scale=4.0, cfg_rescale_phi=0.7, record=("velocities",))(PARAMS, NOISE, COND, UNCOND)
    noise = np.asarray(NOISE, np.float64)
    vc, vu = np_apply(PARAMS, noise, 1.0, COND), np_apply(PARAMS, noise, 1.0, UNCOND)
    expect = np_cfg_rescale(vu + 4.0 * (vc - vu), vc, 0.7)
    assert np.abs(expect - (vu + 4.0 * (vc - vu))).max() > 0.1  # the rescale changes this velocity
    np.testing.assert_allclose(resc.velocities[0], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resc.x0, noise - expect, rtol=1e-5, atol=1e-5)


def test_renorm_to_ref_and_norm_records():
    rec = ("x0", "velocities", "norms", "trajectory")
    out = sampler(num_steps=4, shift=3.0, cfg_scale=2.0, renorm_to_ref=True, record=rec)(
        PARAMS, NOISE, COND, UNCOND, ref_params=REF_PARAMS)
    assert out.velocities.shape == (4, B) + SHAPE and out.trajectory.shape == (5, B) + SHAPE
    assert out.norms_policy.shape == out.norms_ref.shape == (4, B)
    v_norm = np.asarray(jax.vmap(flow.per_sample_norm)(out.velocities))
    np.testing.assert_allclose(v_norm / np.asarray(out.norms_ref), 1.0, atol=1e-5)
    assert np.abs(np.asarray(out.norms_policy) / np.asarray(out.norms_ref) - 1).max() > 1e-2  # it did rescale
    np.testing.assert_array_equal(out.trajectory[0], NOISE)
    np.testing.assert_array_equal(out.trajectory[-1], out.x0)
    dsig = np.diff(np.asarray(out.sigmas))
    steps = np.asarray(out.trajectory[1:] - out.trajectory[:-1])
    np.testing.assert_allclose(steps, dsig[:, None, None, None, None] * np.asarray(out.velocities), atol=1e-5)
    # without renorm: norms_policy is the norm of the velocity used, norms_ref of the reference
    fn = sampler(num_steps=4, shift=3.0, cfg_scale=2.0, record=rec)
    plain = fn(PARAMS, NOISE, COND, UNCOND, ref_params=REF_PARAMS)
    np.testing.assert_allclose(jax.vmap(flow.per_sample_norm)(plain.velocities), plain.norms_policy, rtol=1e-5)
    ref_run = fn(REF_PARAMS, NOISE, COND, UNCOND)
    np.testing.assert_allclose(ref_run.norms_policy[0], plain.norms_ref[0], rtol=1e-5)  # same x at step 0
    assert ref_run.norms_ref is None  # no ref_params given


def test_step_scales():
    fn = sampler(num_steps=4, shift=3.0)
    base = fn(PARAMS, NOISE, COND)
    np.testing.assert_array_equal(fn(PARAMS, NOISE, COND, step_scales=jnp.ones(4)).x0, base.x0)
    scales = np.array([1.0, 0.9, 1.2, 1.05])
    out = fn(PARAMS, NOISE, COND, step_scales=jnp.asarray(scales, jnp.float32))
    expect = np_euler(PARAMS, NOISE, COND, np_grid_shift(4, 3.0), scales=scales)
    np.testing.assert_allclose(out.x0, expect, rtol=1e-5, atol=1e-5)


def test_adjoint_grad_matches_finite_difference():
    fn = sampling.make_sampler(toy_apply, num_steps=4, shift=3.0, cfg_scale=2.0)

    @jax.jit
    def reward(alpha):
        x0 = fn(PARAMS, NOISE, COND, UNCOND, step_scales=alpha).x0
        return jnp.mean(jnp.square(x0 - 0.3))

    ones = jnp.ones(4, jnp.float32)
    g = np.asarray(jax.jit(jax.grad(reward))(ones))
    eps = 1e-2
    fd = np.array([(reward(ones.at[k].add(eps)) - reward(ones.at[k].add(-eps))) / (2 * eps) for k in range(4)])
    assert np.abs(g).max() > 1e-3
    np.testing.assert_allclose(g, fd, rtol=1e-2, atol=1e-4)


def np_sde_logprob(x, x_next, v, sigma, sigma_next, s):
    d = sigma_next - sigma
    mean = x + (v + s ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * d
    std = s * np.sqrt(abs(d))
    r = (x_next - mean) / std
    return (-0.5 * r ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum((1, 2, 3))


def test_flow_sde():
    rec = ("x0", "log_probs", "trajectory", "velocities")
    ode = sampler(num_steps=5, shift=3.0, record=rec)(PARAMS, NOISE, COND)
    zero = sampler(num_steps=5, shift=3.0, sde_noise=0.0, sde_window=(0.2, 0.95), record=rec)(
        PARAMS, NOISE, COND, None, jax.random.key(0))
    np.testing.assert_array_equal(zero.x0, ode.x0)
    np.testing.assert_array_equal(ode.log_probs, np.zeros((5, B)))
    sde = sampler(num_steps=5, shift=3.0, sde_noise=0.7, sde_window=(0.2, 0.95), record=rec)
    a = sde(PARAMS, NOISE, COND, None, jax.random.key(7))
    np.testing.assert_array_equal(a.x0, sde(PARAMS, NOISE, COND, None, jax.random.key(7)).x0)
    assert np.abs(np.asarray(a.x0 - sde(PARAMS, NOISE, COND, None, jax.random.key(8)).x0)).max() > 1e-3
    assert np.abs(np.asarray(a.x0 - ode.x0)).max() > 1e-3
    assert a.log_probs.shape == (5, B) and np.all(np.isfinite(a.log_probs))
    grid = np.asarray(a.sigmas, np.float64)
    active = (grid[:-1] >= 0.2) & (grid[:-1] <= 0.95) & (grid[1:] > 0)
    assert active.any() and not active.all() and not active[-1]
    traj, vel = np.asarray(a.trajectory, np.float64), np.asarray(a.velocities, np.float64)
    for i in range(5):
        if active[i]:
            s = 0.7 * np.sqrt(grid[i] / (1 - grid[i]))
            expect = np_sde_logprob(traj[i], traj[i + 1], vel[i], grid[i], grid[i + 1], s)
            np.testing.assert_allclose(a.log_probs[i], expect, rtol=1e-3)
        else:  # ODE steps (the last one included): exact Euler, zero log-prob
            np.testing.assert_array_equal(a.log_probs[i], np.zeros(B))
            np.testing.assert_allclose(traj[i + 1], traj[i] + (grid[i + 1] - grid[i]) * vel[i], atol=1e-5)


def test_flow_sde_at_sigma_one_is_finite():
    out = sampler(num_steps=3, shift=3.0, sde_noise=0.5, record=("x0", "log_probs"))(
        PARAMS, NOISE, COND, None, jax.random.key(1))
    assert np.all(np.isfinite(out.x0)) and np.all(np.isfinite(out.log_probs))
    assert np.all(np.asarray(out.log_probs[:2]) != 0) and np.all(np.asarray(out.log_probs[2]) == 0)


def test_errors():
    with pytest.raises(ValueError, match="uncond"):
        sampling.make_sampler(toy_apply, num_steps=2, cfg_scale=3.0)(PARAMS, NOISE, COND)
    with pytest.raises(ValueError, match="rng"):
        sampling.make_sampler(toy_apply, num_steps=2, sde_noise=0.5)(PARAMS, NOISE, COND)
    with pytest.raises(ValueError, match="ref_params"):
        sampling.make_sampler(toy_apply, num_steps=2, renorm_to_ref=True)(PARAMS, NOISE, COND)
    with pytest.raises(ValueError, match="record"):
        sampling.make_sampler(toy_apply, num_steps=2, record=("x0", "latents"))
    with pytest.raises(ValueError, match="step_scales"):
        sampling.make_sampler(toy_apply, num_steps=2)(PARAMS, NOISE, COND, step_scales=jnp.ones(3))


def test_sde_step_and_its_log_density_by_hand():
    x, v = np.array([[1.0, -2.0]], np.float32), np.array([[0.5, 0.25]], np.float32)
    mean, std = flow.sde_step(x, v, 0.5, -0.1, 0.4)
    # x + (v + 0.16 / 1.0 * (x + 0.5 v)) * (-0.1)
    np.testing.assert_allclose(mean, [[1.0 - 0.1 * (0.5 + 0.16 * 1.25), -2.0 - 0.1 * (0.25 + 0.16 * -1.875)]], rtol=1e-6)
    np.testing.assert_allclose(std, 0.4 * np.sqrt(0.1), rtol=1e-6)
    m0, s0 = flow.sde_step(x, v, 0.5, -0.1, 0.0)
    np.testing.assert_allclose(m0, x + v * -0.1, rtol=1e-6) and np.testing.assert_allclose(s0, 0.0)
    lp = flow.gaussian_log_prob(np.array([[1.0, 1.0]]), np.zeros((1, 2)), 2.0)
    np.testing.assert_allclose(lp, [-0.5 * 0.5 - 2 * (np.log(2.0) + 0.5 * np.log(2 * np.pi))], rtol=1e-6)
