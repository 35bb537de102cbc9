"""The fused RL train step (ng_jax.rl.step) on an 8-device (data=2, fsdp=4) CPU mesh.

Compile time dominates on 2 cores, so every jitted step is built once per (method, lam, micro_batch,
LoRA) by the module-scoped `steps` cache and shared between tests. The fast tier (`-m "not slow"`)
compiles six steps: NormGuard for each method, the NFT base step, a single-micro-batch NFT step and a
LoRA step; the slow tier adds the AWM and DPO base steps. Every step's optimizer also records the raw
averaged gradient in its state (`recording`), so tests compare gradients directly, not through Adam.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from ng_jax import flow, losses, sharding

from ng_jax.config import blocks, methods
from ng_jax.models.nets.lora import lora_init, lora_merge
from ng_jax.models.nets.text import TextCond
from ng_jax.models.velocity import make_velocity_model
from ng_jax.state import TrainState, make_optimizer
from ng_jax.rl.step import NORMGUARD_METRICS, StepSpec, TrainBatch, make_train_step
from tests.fixtures import tiny_model_cfg

METHODS = ("nft", "awm", "dpo")
N = 16            # samples (DPO: pairs) per optimizer step; a multiple of the 8 devices
MICRO = 8         # gradient-accumulation chunk: 2 micro-batches per step
T = 2             # training timesteps per sample
GRID = tuple(float(s) for s in np.asarray(flow.sigma_grid(4))[:-1])  # (1, .75, .5, .25)
LOSS_KWARGS = {m: dict(methods.METHODS[m]["loss"]) for m in METHODS}
FRACTION = {"nft": 0.99, "awm": 0.9, "dpo": 1.0}
CTX_LEN = 4
LORA = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=("attn/(to_q|to_v)",)))


def recording(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """`opt`, whose state also keeps the last raw (averaged, unclipped) gradient: state = (inner, grads)."""
    def init(params):
        return opt.init(params), jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        updates, inner = opt.update(grads, state[0], params)
        return updates, (inner, grads)

    return optax.GradientTransformation(init, update)


OPTIMIZER = recording(make_optimizer(blocks.optim_config(lr=1e-3)))  # AdamW + clip 1.0
# Semantics, not speed, are under test: skipping LLVM's optimisations halves each step's compile time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
SLOW = pytest.mark.slow  # each needs one more compiled step (~10-20 s on 2 cores)


def spec_for(method, lam=0.0, micro_batch=MICRO, margin=0.0):
    return StepSpec(method=method, micro_batch=micro_batch, num_timesteps=T, grid=GRID,
                    grid_fraction=FRACTION[method], loss_kwargs=LOSS_KWARGS[method], lam=lam, margin=margin)


def to_host(tree):
    """numpy copies of every leaf (PRNG keys as their raw key data)."""
    def one(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x))
    return jax.tree.map(one, tree)


def scale_output(params, factor):
    """The MMDiT's v is linear in proj_out (kernel and bias): scaling them scales v by `factor`."""
    params = dict(params)
    params["proj_out"] = jax.tree.map(lambda x: x * factor, params["proj_out"])
    return params


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 4, 1))


@pytest.fixture(scope="module")
def model():
    return make_velocity_model(tiny_model_cfg(depth=1))  # one (context-pre-only) joint block


def random_params(model, seed=0):
    """Random host parameters of the model's shapes (no compile): kernels ~ N(0, 1 / fan_in), biases
    ~ N(0, 0.05^2). Unlike `model.init` nothing is zero (the MMDiT zero-initialises adaLN and proj_out,
    so a fresh model outputs v == 0)."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        if str(path[-1].key) == "kernel":
            return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(model.init, jax.random.key(0)))


@pytest.fixture(scope="module")
def ref_host(model):
    return random_params(model)


@pytest.fixture(scope="module")
def ref(ref_host, mesh):
    return jax.device_put(ref_host, sharding.param_shardings(ref_host, mesh, [(".*", "fsdp")]))


def new_state(trainable):
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema=trainable,
                      opt_state=OPTIMIZER.init(trainable), rng=jax.random.key(0))


def state_shardings(trainable_host, mesh):
    return sharding.param_shardings(jax.eval_shape(new_state, trainable_host), mesh, [(".*", "fsdp")])


_STATE_INITS = {}


def make_state(trainable_host, mesh):
    """A fresh sharded state from host arrays (fresh buffers: the step donates them); one compile per tree."""
    key = (jax.tree.structure(trainable_host), id(mesh))
    if key not in _STATE_INITS:
        _STATE_INITS[key] = jax.jit(new_state, out_shardings=state_shardings(trainable_host, mesh),
                                   compiler_options=COMPILER_OPTIONS)
    return _STATE_INITS[key](trainable_host)


def make_batch(method, seed, mesh, *, nan_advantage=False, nan_x0=False):
    rng = np.random.default_rng(seed)
    x0 = (0.5 * rng.standard_normal((N, 8, 8, 3))).astype(np.float32)
    mask = np.ones((N, CTX_LEN), bool)
    mask[:, -1] = rng.random(N) < 0.5
    cond = TextCond(tokens=rng.standard_normal((N, CTX_LEN, 16)).astype(np.float32),
                    pooled=rng.standard_normal((N, 16)).astype(np.float32), mask=mask)
    adv = rng.standard_normal(N).astype(np.float32)
    if nan_advantage:
        adv[3] = np.nan
    x0_l = (0.5 * rng.standard_normal((N, 8, 8, 3))).astype(np.float32) if method == "dpo" else None
    if nan_x0:
        (x0_l if method == "dpo" else x0)[5, 1, 2, 0] = np.nan
    return sharding.shard_batch(TrainBatch(x0=x0, cond=cond, advantages=adv, x0_l=x0_l), mesh)


@pytest.fixture(scope="module")
def steps(model, mesh, ref_host):
    """get(method, lam=0., micro_batch=MICRO, lora=False) -> jitted step, built (and compiled) once each."""
    cache = {}
    ref_sh = sharding.param_shardings(ref_host, mesh, [(".*", "fsdp")])
    lora_host = to_host(lora_init(ref_host, jax.random.key(3), rank=LORA.rank, alpha=LORA.alpha,
                                  targets=tuple(LORA.targets)))

    def get(method, lam=0.0, micro_batch=MICRO, lora=False):
        key = (method, lam, micro_batch, lora)
        if key not in cache:
            state_sh = state_shardings(lora_host if lora else ref_host, mesh)
            step = make_train_step(model.apply, OPTIMIZER, spec_for(method, lam, micro_batch), LORA if lora else None)
            cache[key] = jax.jit(step, in_shardings=(state_sh, ref_sh, sharding.batch_sharding(mesh)),
                                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                                 compiler_options=COMPILER_OPTIONS)
        return cache[key]

    get.lora_host = lora_host
    return get


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations (of anything) inside the block."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_normguard_step_compiles_once_keeps_shardings_and_reference(method, steps, mesh, ref, ref_host):
    step = steps(method, lam=1.0)
    state = make_state(ref_host, mesh)
    want = jax.tree.leaves(state_shardings(ref_host, mesh))
    start = to_host(state.params)
    compiles = []
    for i in range(3):
        batch = make_batch(method, i, mesh)
        with count_compiles() as seen:
            state, m = step(state, ref, batch)
        compiles.append(len(seen))
        assert bool(m["finite"]) and np.isfinite(float(m["loss"])), m
    assert compiles == [1, 0, 0]  # one jit, one compile; later calls reuse it (incl. donated outputs)
    for leaf, sh in zip(jax.tree.leaves(state), want, strict=True):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.sharding, sh)
    assert_trees_equal(ref, ref_host)                      # the reference is read, never written
    assert int(state.step) == 3
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                                    jax.tree.leaves(start))]
    assert max(moved) > 1e-4 and sum(d > 0 for d in moved) > len(moved) // 2
    # Metrics: loss parts, NormGuard diagnostics, norm ratio per sigma bucket, gradient norm.
    for key in ("loss", "base_loss", "grad_norm", "norm_ratio", *NORMGUARD_METRICS):
        assert np.isfinite(float(m[key])), key
    assert 0.0 <= float(m["normguard_active_frac"]) <= 1.0
    samples = N * T * (2 if method == "dpo" else 1)
    assert float(np.sum(m["bucket_count"])) == samples
    by_bucket, counts = np.asarray(m["norm_ratio_by_bucket"]), np.asarray(m["bucket_count"])
    assert np.isclose(np.sum(by_bucket * counts) / samples, float(m["norm_ratio"]), rtol=1e-5)
    if method != "dpo":  # grid sigmas (1, .75, .5, .25): NFT/AWM never train in the lowest bucket
        assert counts[0] == 0


@pytest.mark.parametrize("method", ["nft", pytest.param("awm", marks=SLOW), pytest.param("dpo", marks=SLOW)])
def test_normguard_lowers_the_norm_ratio_of_an_inflated_policy(method, steps, mesh, ref, ref_host):
    """Policy (and old/EMA) start at 1.2 x the reference velocity. Both runs see the same batches and
    draw the same sigmas and noise, so step k's ratios are paired: with NormGuard the ratio is below the
    base method's at every step after the first, and clearly below its start.

    The hinge's own gradient, g_ng - g_base at the first step (same parameters, batch, sigmas and noise),
    must not increase ||v||: a small step against it lowers the measured norm ratio. (With every sample
    active, the relative power-1 hinge is exactly mean ratio - 1, so this holds to first order.)"""
    inflated = scale_output(ref_host, 1.2)
    ratios, first_grads = {}, {}
    for lam in (0.0, 1.0):
        state = make_state(inflated, mesh)
        ratios[lam] = []
        for i in range(6):
            state, m = steps(method, lam=lam)(state, ref, make_batch(method, 10 + i, mesh))
            ratios[lam].append(float(m["norm_ratio"]))  # measured before this step's update
            if i == 0:
                first_grads[lam] = to_host(state.opt_state[1])
                if lam:
                    assert float(m["normguard_active_frac"]) == 1.0
    base, ng = np.asarray(ratios[0.0]), np.asarray(ratios[1.0])
    np.testing.assert_allclose(base[0], 1.2, rtol=1e-4)
    np.testing.assert_allclose(ng[0], 1.2, rtol=1e-4)
    assert np.all(ng[1:] < base[1:]), (base, ng)
    assert ng[-1] < ng[0] - 0.05 and ng[-1] < base[-1] - 0.01, (base, ng)

    hinge_grad = jax.tree.map(np.subtract, first_grads[1.0], first_grads[0.0])
    size = float(optax.global_norm(hinge_grad))
    assert size > 0
    nudged = jax.tree.map(lambda p, g: p - 1e-2 * g / size, inflated, hinge_grad)
    _, m = steps(method, lam=0.0)(make_state(nudged, mesh), ref, make_batch(method, 10, mesh))
    assert float(m["norm_ratio"]) < base[0] - 1e-4, (float(m["norm_ratio"]), base[0])


@pytest.mark.parametrize("method", ["nft", pytest.param("awm", marks=SLOW), pytest.param("dpo", marks=SLOW)])
def test_inactive_normguard_adds_nothing_to_the_base_step(method, steps, mesh, ref, ref_host):
    """From a policy below the reference norm (0.8 x) the hinge is inactive: lam = 1 gives the lam = 0
    (base) loss exactly and the same gradients and parameters up to float rounding (the extra zero
    terms may change XLA's fusion, hence its rounding, so bit equality is not asserted here; that
    lam = 0 is the base program itself is `test_lam_zero_never_computes_the_penalty`)."""
    deflated = scale_output(ref_host, 0.8)
    out = {}
    for lam in (0.0, 1.0):
        state = make_state(deflated, mesh)
        for i in range(2):
            state, m = steps(method, lam=lam)(state, ref, make_batch(method, 20 + i, mesh))
            out[lam, i] = (to_host(state), to_host(m))
    for i in range(2):
        (s0, m0), (s1, m1) = out[0.0, i], out[1.0, i]
        assert float(m1["normguard_active_frac"]) == 0.0 and float(m1["normguard_penalty"]) == 0.0
        assert not set(NORMGUARD_METRICS) & set(m0)   # lam = 0: no NormGuard metrics at all
        assert float(m0["norm_ratio"]) < 0.9          # the diagnostic is still reported
        assert float(m0["loss"]) == float(m1["loss"]) == float(m1["base_loss"])
        for a, b in zip(jax.tree.leaves(s0.opt_state[1]), jax.tree.leaves(s1.opt_state[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(a).max())
        for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_lam_zero_never_computes_the_penalty(method, model, mesh, monkeypatch, ref_host):
    """lam = 0 traces no NormGuard code at all (abstract evaluation: no compile)."""
    def boom(*a, **k):
        raise AssertionError("NormGuard code was traced")

    monkeypatch.setattr(losses, "with_normguard", boom)
    monkeypatch.setattr(losses, "normguard_penalty", boom)
    state = jax.eval_shape(new_state, ref_host)
    batch = make_batch(method, 0, mesh)
    _, metrics = jax.eval_shape(make_train_step(model.apply, OPTIMIZER, spec_for(method, 0.0)), state, ref_host, batch)
    assert not set(NORMGUARD_METRICS) & set(metrics) and "norm_ratio" in metrics
    with pytest.raises(AssertionError, match="NormGuard code was traced"):  # the patch is live: lam > 0 does call it
        jax.eval_shape(make_train_step(model.apply, OPTIMIZER, spec_for(method, 1.0)), state, ref_host, batch)


def test_gradient_accumulation_equals_one_big_batch(steps, mesh, ref, ref_host):
    """NFT + NormGuard, inflated policy (hinge active): 2 micro-batches of 8 == 1 micro-batch of 16."""
    inflated = scale_output(ref_host, 1.1)
    batch = make_batch("nft", 30, mesh)
    res = {}
    for mb in (MICRO, N):
        state, m = steps("nft", lam=1.0, micro_batch=mb)(make_state(inflated, mesh), ref, batch)
        res[mb] = (to_host(state.opt_state[1]), to_host(m))
    (g_acc, m_acc), (g_big, m_big) = res[MICRO], res[N]
    assert float(m_big["normguard_active_frac"]) > 0.5
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * np.abs(b).max() + 1e-9)
    for key in ("loss", "base_loss", "normguard_penalty", "norm_ratio", "grad_norm"):
        np.testing.assert_allclose(m_acc[key], m_big[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(m_acc["bucket_count"], m_big["bucket_count"])
    assert float(m_big["grad_norm"]) > 0


@pytest.mark.parametrize("method,nan", [("nft", "advantage"), ("awm", "advantage"), ("dpo", "x0")])
def test_non_finite_batch_leaves_the_state_unchanged(method, nan, steps, mesh, ref, ref_host):
    step = steps(method, lam=1.0)
    state = make_state(ref_host, mesh)
    state, m = step(state, ref, make_batch(method, 40, mesh))  # one good step first: non-trivial Adam state
    assert bool(m["finite"])
    before = to_host(state)
    state, m = step(state, ref, make_batch(method, 41, mesh, nan_advantage=nan == "advantage", nan_x0=nan == "x0"))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = to_host(state)
    assert int(after.step) == int(before.step) == 1
    assert_trees_equal((after.rng, after.params, after.ema, after.opt_state),
                       (before.rng, before.params, before.ema, before.opt_state))
    assert_trees_equal(ref, ref_host)


def test_lora_trains_adapters_only(steps, model, mesh, ref, ref_host):
    step = steps("nft", lam=1.0, lora=True)
    adapters = steps.lora_host
    state = make_state(adapters, mesh)
    for i in range(2):
        batch = make_batch("nft", 50 + i, mesh)
        with count_compiles() as seen:
            state, m = step(state, ref, batch)
        assert bool(m["finite"]) and len(seen) == (1 if i == 0 else 0)
    # The trainable tree (and the optimizer's moments) are the adapters alone.
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names == {"lora_a", "lora_b"}
    assert sum(x.size for x in jax.tree.leaves(state.params)) < 0.2 * sum(x.size for x in jax.tree.leaves(ref_host))
    assert_trees_equal(ref, ref_host)
    lora_b = [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
              if str(p[-1].key) == "lora_b"]
    assert all(np.abs(b).max() > 0 for b in lora_b)  # lora_b starts at 0 and has been trained
    merged = lora_merge(ref_host, to_host(state.params), alpha=LORA.alpha, rank=LORA.rank)
    flat_merged, flat_ref = jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(ref_host)
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(flat_merged, flat_ref, strict=True)
               if not np.array_equal(np.asarray(a), b)}
    assert changed == {"['transformer_blocks_0']['attn']['to_q']['kernel']",
                       "['transformer_blocks_0']['attn']['to_v']['kernel']"}, changed
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    cond = TextCond(tokens=jnp.ones((2, CTX_LEN, 16)), pooled=jnp.ones((2, 16)), mask=jnp.ones((2, CTX_LEN), bool))
    v_policy = model.apply(merged, x, jnp.full((2,), 0.5), cond)
    v_ref = model.apply(ref_host, x, jnp.full((2,), 0.5), cond)
    assert float(jnp.abs(v_policy - v_ref).max()) > 1e-6


def test_bad_specs_are_named(model):
    with pytest.raises(ValueError, match="num_timesteps=5 exceeds the 3 grid timesteps"):
        make_train_step(model.apply, OPTIMIZER, StepSpec("nft", MICRO, 5, GRID, 0.9, {}))
    with pytest.raises(ValueError, match="method must be one of"):
        make_train_step(model.apply, OPTIMIZER, StepSpec("ppo", MICRO, 1, GRID, 0.9, {}))
    with pytest.raises(ValueError, match="AWM: num_timesteps=6"):
        make_train_step(model.apply, OPTIMIZER, StepSpec("awm", MICRO, 6, GRID, 0.9, {}))
