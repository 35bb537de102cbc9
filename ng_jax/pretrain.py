"""Pretraining of the reference model: rectified flow on the shapes image-text set.

    python -m ng_jax.main --config=ng_jax/configs/pretrain_shapes.py --workdir=workdirs/pretrain

The text encoder and the MMDiT train jointly; captions are dropped to the empty prompt with
probability `train.cfg_dropout` (classifier-free guidance); an EMA of both is what gets exported
as the reference bundle. Host side (this file): data, logging, checkpoints, sample grids.
Device side: `make_pretrain_step`, one jitted function with in/out shardings and a donated state.
"""

from __future__ import annotations

import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import flow, logs, sharding, storage
from ng_jax.checkpoint import Checkpointer, Preemption
from ng_jax.config.checks import ConfigError
from ng_jax.data.prompts import split_prompts
from ng_jax.data.sources import ImageTextStream, MixtureStream
from ng_jax.data.tfds_shapes import load_image_text
from ng_jax.errors import TrainingError
from ng_jax.models.bundle import BundleError, ModelBundle, load_bundle, save_bundle
from ng_jax.models.grow import grow_params
from ng_jax.models.nets.text import EMPTY_PROMPT, make_text_encoder, tokenize
from ng_jax.models.velocity import make_velocity_model
from ng_jax.sampling import make_sampler, to_uint8
from ng_jax.state import TrainState, create_sharded, ema_update, make_optimizer


@flax.struct.dataclass
class ImageTextBatch:
    images: jax.Array  # uint8 [B, H, W, 3]
    ids: jax.Array     # int32 [B, L]
    mask: jax.Array    # bool [B, L]


def make_pretrain_step(model, text, optimizer, train_cfg, empty_ids, empty_mask):
    """A pure step `(state, batch) -> (state, metrics)`; the caller jits it with shardings."""
    cfg_dropout = float(train_cfg.cfg_dropout)
    ema_decay = float(train_cfg.ema_decay)
    ln_mean, ln_std = float(train_cfg.get("logit_mean", 0.0)), float(train_cfg.get("logit_std", 1.0))

    def loss_fn(params, batch: ImageTextBatch, rng):
        r_drop, r_sigma, r_noise = jax.random.split(rng, 3)
        b = batch.ids.shape[0]
        drop = jax.random.uniform(r_drop, (b,)) < cfg_dropout
        ids = jnp.where(drop[:, None], empty_ids[None], batch.ids)
        mask = jnp.where(drop[:, None], empty_mask[None], batch.mask)
        cond = text.encode(params["text"], ids, mask)
        x0 = batch.images.astype(jnp.float32) / 127.5 - 1.0
        sigma = flow.sample_logit_normal(r_sigma, (b,), mean=ln_mean, std=ln_std)
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        x_t = flow.interpolate(x0, noise, sigma)
        v = model.apply(params["velocity"], x_t, sigma, cond)
        per_sample = flow.per_sample_mean(jnp.square(v - flow.velocity_target(x0, noise)))
        return jnp.mean(per_sample), {"loss": jnp.mean(per_sample)}

    def step(state: TrainState, batch: ImageTextBatch):
        rng, step_rng = jax.random.split(state.rng)
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        # EMA warm-up: early on the average would be dominated by the (zero-output) initialisation.
        step_f = state.step.astype(jnp.float32)
        ema = ema_update(state.ema, params, jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f)))
        metrics = dict(aux, grad_norm=_global_norm(grads))
        return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state, rng=rng), metrics

    return step


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def make_image_text_stream(data_cfg, batch_size: int, seed: int):
    """One TFDS image-text source per prompt category, mixed in `data.category_weights` proportions.

    Each category gets about `data.images_per_category` renders (examples per prompt = that divided by
    the category's train-prompt count), so rare categories (10 single-object prompts) are seen as
    often as the 539 colour-attribution prompts."""
    weights = {k: float(v) for k, v in data_cfg.category_weights.items() if float(v) > 0}
    ppc = data_cfg.get("prompts_per_category")
    streams = {}
    for i, cat in enumerate(sorted(weights)):
        n_prompts = len(split_prompts(cat, "train")) if ppc is None else min(int(ppc), len(split_prompts(cat, "train")))
        per_prompt = max(1, -(-int(data_cfg.images_per_category) // n_prompts))
        source = load_image_text(data_cfg.data_dir, "train", examples_per_prompt=per_prompt, categories=(cat,),
                                 prompts_per_category=ppc)
        streams[cat] = ImageTextStream(source, batch_size, seed=seed + 1000 * i)
    return MixtureStream(streams, weights, batch_size, seed=seed)


def _depths(bundle, config) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((int(bundle.text_cfg.depth), int(bundle.model_cfg.depth)), (int(config.text.depth), int(config.model.depth)))


def _warm_start(config):
    """The bundle named by `init_from`, checked against the run's model: only depths may differ."""
    try:
        bundle = load_bundle(config.init_from)
    except BundleError as err:
        raise ConfigError(f"init_from: {err}") from None
    for part, have, want in (("model", bundle.model_cfg, config.model), ("text", bundle.text_cfg, config.text)):
        diff = sorted(k for k in set(have) | set(want) if k != "depth" and have.get(k) != want.get(k))
        if diff:
            raise ConfigError(f"init_from={config.init_from}: its {part} config differs in {diff} "
                              f"({[(k, have.get(k), want.get(k)) for k in diff]}); only depth may grow")
    (t_old, m_old), (t_new, m_new) = _depths(bundle, config)
    if t_new < t_old or m_new < m_old:
        raise ConfigError(f"init_from={config.init_from}: depths (text {t_old}, MMDiT {m_old}) cannot shrink to "
                          f"(text {t_new}, MMDiT {m_new})")
    return bundle


def run(config, workdir: str) -> int:
    storage.makedirs(workdir)
    mesh = sharding.make_mesh(config.mesh.shape)
    batch_size = int(config.data.batch_size)
    if batch_size % sharding.batch_size_multiple(mesh):
        raise ConfigError(f"data.batch_size={batch_size} must be divisible by data x fsdp = "
                         f"{sharding.batch_size_multiple(mesh)}")
    model = make_velocity_model(config.model)
    text = make_text_encoder(config.text)
    optimizer = make_optimizer(config.optim)
    empty_ids, empty_mask = tokenize(text.tokenizer, [EMPTY_PROMPT])

    warm = _warm_start(config) if config.get("init_from") else None

    def init_state():
        r_text, r_model, r_state = jax.random.split(jax.random.key(config.seed), 3)
        params = {"text": text.init(r_text), "velocity": model.init(r_model)}
        if warm is not None:
            params = grow_params(warm.params, params, *_depths(warm, config))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                          opt_state=optimizer.init(params), rng=r_state)

    state, shardings = create_sharded(init_state, mesh, sharding.layouts(config.mesh)[0])
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        make_pretrain_step(model, text, optimizer, config.train, jnp.asarray(empty_ids[0]), jnp.asarray(empty_mask[0])),
        in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,))

    stream = make_image_text_stream(config.data, batch_size, seed=config.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.ckpt.max_to_keep))
    if ckpt.latest_step() is not None:
        restore_step = int(config.ckpt.get("restore_step", -1))
        state, meta, _ = ckpt.restore(state, None if restore_step < 0 else restore_step)
        stream.restore(meta["data"])
        print(f"resumed from step {int(state.step)}")
    writer = logs.MetricWriter(workdir, enabled=jax.process_index() == 0)
    sampler = jax.jit(make_sampler(model.apply, num_steps=int(config.sample.num_steps),
                                   shift=float(config.sample.shift), cfg_scale=float(config.sample.cfg_scale)))
    sample_prompts = list(config.sample.prompts)

    def sample_grid(params, step):
        ids, mask = tokenize(text.tokenizer, sample_prompts)
        uids, umask = tokenize(text.tokenizer, [EMPTY_PROMPT] * len(sample_prompts))
        cond = text.encode(params["text"], ids, mask)
        uncond = text.encode(params["text"], uids, umask)
        noise = jax.random.normal(jax.random.key(1234), (len(sample_prompts),) + model.sample_shape)
        out = sampler(params["velocity"], noise, cond, uncond)
        logs.save_grid(os.path.join(workdir, "samples", f"step_{step:06d}.png"), np.asarray(to_uint8(out.x0)),
                            labels=sample_prompts, cols=min(8, len(sample_prompts)), scale=3)

    total = int(config.train.steps)
    start = int(state.step)
    bar = logs.progress(total, desc="pretrain", initial=start, enabled=jax.process_index() == 0)
    t0, seen = time.time(), 0
    with Preemption() as preemption:
        try:
            for step in range(start, total):
                raw = stream.next_batch()
                ids, mask = tokenize(text.tokenizer, raw["prompt"])
                batch = sharding.shard_batch(ImageTextBatch(images=raw["image"], ids=ids, mask=mask), mesh)
                state, metrics = step_fn(state, batch)
                seen += batch_size
                done = step + 1
                bar.update(1)
                if done % config.log_every == 0 or done == total:
                    m = jax.device_get(metrics)
                    if not np.isfinite(m["loss"]):
                        raise TrainingError(f"pretraining loss is {m['loss']} at step {done}; last good checkpoint: "
                                            f"step {ckpt.latest_step()} in {ckpt.directory}")
                    m["images_per_s"] = seen / (time.time() - t0)
                    writer.write(done, m)
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                    t0, seen = time.time(), 0
                if done % config.sample_every == 0 or done == total:
                    sample_grid(state.ema, done)
                stop = preemption.should_stop()  # SIGTERM on any host stops all of them at this step
                if done % config.ckpt.every == 0 or done == total or stop:
                    ckpt.save(done, state, {"data": stream.state()})
                if stop:
                    print(f"SIGTERM: checkpointed step {done}, exiting")
                    break
        finally:
            bar.close()
            ckpt.wait()
            writer.close()
    if int(state.step) == total:
        export_dir = config.get("export_dir") or os.path.join(workdir, "reference")
        bundle = ModelBundle(model_cfg=config.model, text_cfg=config.text, sampling=dict(config.sample.to_dict()),
                             params=jax.device_get(state.ema),
                             info={"trained_steps": total, "batch_size": batch_size, "config": config.name,
                                   **({"init_from": dict(warm.info, path=str(config.init_from))} if warm else {})})
        save_bundle(export_dir, bundle, storage_dtype=str(config.get("export_dtype", "float32")))
        print(f"exported reference bundle to {export_dir}")
    return 0
