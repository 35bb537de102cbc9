"""Pretraining step on an 8-device CPU mesh, the mixture stream, and the model bundle round trip."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from ng_jax import parallel
from ng_jax.data import world
from ng_jax.data.sources import ImageTextStream, MixtureStream
from ng_jax.models.bundle import BundleError, ModelBundle, load_bundle, save_bundle
from ng_jax.models.text import EMPTY_PROMPT, make_text_encoder, tokenize
from ng_jax.models.velocity import make_velocity_model
from ng_jax.pretrain import ImageTextBatch, make_pretrain_step
from ng_jax.state import TrainState, create_sharded, make_optimizer
from ng_jax import config_base
from tests.test_models import tiny_text_cfg


def tiny_pixel_cfg():
    c = config_base.toy_model_config()
    c.update(dict(patch_size=8, hidden_size=32, depth=2, num_heads=2, context_dim=16, pooled_dim=16))
    return c


PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow cross"] * 4


def test_pretrain_steps_lower_the_loss_and_keep_shardings():
    mesh = parallel.make_mesh((2, 4, 1))
    model, text = make_velocity_model(tiny_pixel_cfg()), make_text_encoder(tiny_text_cfg())
    optim = config_base.optim_config(lr=3e-3)
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
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    images = np.stack([world.render_prompt(p, i)[0] for i, p in enumerate(PROMPTS)])
    ids, mask = tokenize(text.tokenizer, PROMPTS)
    batch = parallel.shard_batch(ImageTextBatch(images=images, ids=ids, mask=mask), mesh)
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
