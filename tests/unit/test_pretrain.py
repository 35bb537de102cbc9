"""Pretraining step on an 8-device CPU mesh, the mixture stream, the model bundle round trip, depth growth
and the warm-start checks (the pretraining job end to end: tests/e2e/test_pretrain_job.py)."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from ng_jax import sharding
from ng_jax.data import world
from ng_jax.data.sources import ImageTextStream, MixtureStream
from ng_jax.models.bundle import BundleError, ModelBundle, load_bundle, save_bundle
from ng_jax.models.nets.text import EMPTY_PROMPT, make_text_encoder, tokenize
from ng_jax.models.velocity import make_velocity_model
from ng_jax.pretrain import ImageTextBatch, make_pretrain_step
from ng_jax.state import TrainState, create_sharded, make_optimizer
from ng_jax.config import blocks
from tests.fixtures import tiny_model_cfg, tiny_text_cfg


def tiny_pixel_cfg():
    """32x32 pixels (the world's renders) in 8-pixel patches: 16 image tokens."""
    return tiny_model_cfg(image_size=32, patch_size=8)


PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow cross"] * 4


def test_pretrain_steps_lower_the_loss_and_keep_shardings():
    mesh = sharding.make_mesh((2, 4, 1))
    model, text = make_velocity_model(tiny_pixel_cfg()), make_text_encoder(tiny_text_cfg())
    optim = blocks.optim_config(lr=3e-3)
    optimizer = make_optimizer(optim)
    train = mlc.ConfigDict(dict(cfg_dropout=0.1, ema_decay=0.9))
    e_ids, e_mask = tokenize(text.tokenizer, [EMPTY_PROMPT])

    def init():
        r1, r2 = jax.random.split(jax.random.key(0))
        params = {"text": text.init(r1), "velocity": model.init(r2)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                          opt_state=optimizer.init(params), rng=jax.random.key(1))

    state, shardings = create_sharded(init, mesh, [(".*", "fsdp")])
    sharded_dims = [s.spec for s in jax.tree.leaves(shardings.params) if any(a is not None for a in s.spec)]
    assert sharded_dims, "the fsdp rule should shard some parameters across the 4-way fsdp axis"
    traces = []
    pure_step = make_pretrain_step(model, text, optimizer, train, jnp.asarray(e_ids[0]), jnp.asarray(e_mask[0]))

    def counted(state, batch):
        traces.append(1)  # runs once per trace, i.e. once per compilation
        return pure_step(state, batch)

    step = jax.jit(counted,
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    images = np.stack([world.render_prompt(p, i)[0] for i, p in enumerate(PROMPTS)])
    ids, mask = tokenize(text.tokenizer, PROMPTS)
    batch = sharding.shard_batch(ImageTextBatch(images=images, ids=ids, mask=mask), mesh)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert int(state.step) == 30
    # The EMA lags the parameters but has moved off the initialisation.
    p, e = state.params["velocity"]["proj_out"]["kernel"], state.ema["velocity"]["proj_out"]["kernel"]
    assert float(jnp.abs(e).max()) > 0 and not np.allclose(np.asarray(p), np.asarray(e))


class _ListSource(list):
    pass


def _source(tag, n):
    return _ListSource({"image": np.full((4, 4, 3), i, np.uint8), "prompt": f"{tag}{i}"} for i in range(n))


def test_mixture_stream_proportions_and_exact_resume():
    def make():
        streams = {"a": ImageTextStream(_source("a", 5), 8, seed=1), "b": ImageTextStream(_source("b", 50), 8, seed=2)}
        return MixtureStream(streams, {"a": 1.0, "b": 3.0}, batch_size=8, seed=0)

    mix = make()
    batches = [mix.next_batch() for _ in range(50)]
    share_a = np.mean([sum(p.startswith("a") for p in b["prompt"]) / 8 for b in batches])
    assert abs(share_a - 0.25) < 0.03
    assert all(b["image"].shape == (8, 4, 4, 3) for b in batches)
    mix = make()
    for _ in range(20):
        mix.next_batch()
    saved = mix.state()
    want = [mix.next_batch()["prompt"] for _ in range(5)]
    again = make()
    again.restore(saved)
    assert [again.next_batch()["prompt"] for _ in range(5)] == want
    with pytest.raises(ValueError, match="must match"):
        MixtureStream({"a": ImageTextStream(_source("a", 5), 8)}, {"b": 1.0}, batch_size=8)


def test_bundle_round_trip_and_mismatch_errors(tmp_path):
    model_cfg, text_cfg = tiny_pixel_cfg(), tiny_text_cfg()
    model, text = make_velocity_model(model_cfg), make_text_encoder(text_cfg)
    params = {"text": text.init(jax.random.key(0)), "velocity": model.init(jax.random.key(1))}
    save_bundle(str(tmp_path / "b"), ModelBundle(model_cfg, text_cfg, {"num_steps": 4}, params, {"note": "t"}))
    loaded = load_bundle(str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.sampling == {"num_steps": 4} and loaded.model_cfg.hidden_size == 32
    # float16 storage: half the bytes, loads as float32 holding the rounded weights.
    save_bundle(str(tmp_path / "h"), ModelBundle(model_cfg, text_cfg, {}, params), storage_dtype="float16")
    half = load_bundle(str(tmp_path / "h"))
    size = lambda d: (tmp_path / d / "params.msgpack").stat().st_size  # noqa: E731
    assert size("h") < 0.6 * size("b")
    for a, b in zip(jax.tree.leaves(half.params), jax.tree.leaves(params)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.asarray(b).astype(np.float16).astype(np.float32))
    with pytest.raises(BundleError, match="storage dtype 'int8'"):
        save_bundle(str(tmp_path / "x"), ModelBundle(model_cfg, text_cfg, {}, params), storage_dtype="int8")
    # A config that disagrees with the stored tensors names the mismatch.
    import json

    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    meta["model"]["hidden_size"] = 64
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="mis-shaped"):
        load_bundle(str(tmp_path / "b"))
    blob = bytearray((tmp_path / "b" / "params.msgpack").read_bytes())
    blob[100] ^= 0xFF
    (tmp_path / "b" / "params.msgpack").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(str(tmp_path / "b"))
    with pytest.raises(BundleError, match="missing config.json"):
        load_bundle(str(tmp_path / "nowhere"))


def _tiny_bundle(tmp_path, model_cfg, text_cfg, seed=0):
    model, text = make_velocity_model(model_cfg), make_text_encoder(text_cfg)
    # Train-like parameters: random everywhere (a fresh init has zero adaLN / output layers, which would
    # make "the grown model computes the same" hold trivially).
    shapes = jax.eval_shape(lambda: {"text": text.init(jax.random.key(0)), "velocity": model.init(jax.random.key(1))})
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = tree.unflatten([0.2 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    path = str(tmp_path / f"bundle{seed}")
    save_bundle(path, ModelBundle(model_cfg, text_cfg, {}, params, {"trained_steps": 5}))
    return path, params


def test_depth_growth_preserves_the_function_and_then_trains(tmp_path):
    from ng_jax.models.grow import GrowError, grow_params

    small_m, small_t = tiny_pixel_cfg(), tiny_text_cfg()
    path, params = _tiny_bundle(tmp_path, small_m, small_t)
    deep_m, deep_t = tiny_pixel_cfg(), tiny_text_cfg()
    deep_m.depth, deep_t.depth = small_m.depth + 2, small_t.depth + 1
    m0, t0 = make_velocity_model(small_m), make_text_encoder(small_t)
    m1, t1 = make_velocity_model(deep_m), make_text_encoder(deep_t)
    fresh = {"text": t1.init(jax.random.key(5)), "velocity": m1.init(jax.random.key(6))}
    grown = grow_params(params, fresh, (small_t.depth, small_m.depth), (deep_t.depth, deep_m.depth))
    assert sorted(grown["velocity"]) == sorted(fresh["velocity"])
    # The trained context-pre-only last block moved to the new last place.
    last = lambda p, d: np.asarray(p["velocity"][f"transformer_blocks_{d - 1}"]["ff"]["net_0"]["proj"]["kernel"])  # noqa: E731
    np.testing.assert_array_equal(last(grown, deep_m.depth), last(params, small_m.depth))
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    sigma = jnp.array([0.2, 0.9])
    c0, c1 = t0.encode_prompts(params["text"], PROMPTS[:2]), t1.encode_prompts(grown["text"], PROMPTS[:2])
    np.testing.assert_allclose(np.asarray(c1.tokens), np.asarray(c0.tokens), atol=1e-6)
    np.testing.assert_allclose(np.asarray(c1.pooled), np.asarray(c0.pooled), atol=1e-6)
    v0, v1 = m0.apply(params["velocity"], x, sigma, c0), m1.apply(grown["velocity"], x, sigma, c1)
    assert float(jnp.abs(v0).max()) > 0.1  # a real function, not the zero output of an initialisation
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v0), atol=1e-5)
    # The new blocks are not dead: their modulation gets a gradient.
    new_block = f"transformer_blocks_{small_m.depth - 1}"

    def loss(p):
        return jnp.mean(jnp.square(m1.apply(p, x, sigma, c1) - 1.0))

    g = jax.grad(loss)(grown["velocity"])
    assert float(jnp.abs(g[new_block]["norm1"]["linear"]["kernel"]).max()) > 0
    with pytest.raises(GrowError, match="shallower"):
        grow_params(grown, params, (deep_t.depth, deep_m.depth), (small_t.depth, small_m.depth))
    wide = tiny_pixel_cfg()
    wide.hidden_size, wide.depth = 64, deep_m.depth
    fresh_wide = {"text": fresh["text"], "velocity": make_velocity_model(wide).init(jax.random.key(7))}
    with pytest.raises(GrowError, match="only depths may differ"):
        grow_params(params, fresh_wide, (small_t.depth, small_m.depth), (deep_t.depth, deep_m.depth))


def test_warm_start_checks_the_bundle_against_the_run(tmp_path):
    from ng_jax.config.checks import ConfigError
    from ng_jax.pretrain import _warm_start

    path, _ = _tiny_bundle(tmp_path, tiny_pixel_cfg(), tiny_text_cfg())
    config = mlc.ConfigDict(dict(init_from=path, model=tiny_pixel_cfg(), text=tiny_text_cfg()))
    config.model.depth += 1
    assert _warm_start(config).info["trained_steps"] == 5
    config.model.hidden_size = 64
    with pytest.raises(ConfigError, match=r"model config differs in \['hidden_size'\]"):
        _warm_start(config)
    config.model.hidden_size, config.text.depth = 32, 0
    with pytest.raises(ConfigError, match="cannot shrink"):
        _warm_start(config)
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="init_from: model bundle .*missing config.json"):
        _warm_start(config)
