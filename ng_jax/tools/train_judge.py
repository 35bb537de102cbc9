"""Train the judge feature network (quality measures, not a reward) and ship its weights.

    python -m ng_jax.tools.train_judge --out ng_jax/assets

The network learns, from renders of TRAIN prompts and random off-prompt scenes, which shapes /
colours / sizes are present and how many objects there are, and, from randomly degraded copies, how
much Gaussian noise, blur and contrast gain was applied (so its features are sensitive to image
quality, not only to content). Writes
``judge_features.msgpack`` and ``judge_features_metrics.json`` (held-out accuracy on TEST-prompt
renders, and Frechet distance / precision / recall of fresh renders against reference renders,
degraded renders and noise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ng_jax.data import prompts as prompt_sets
from ng_jax.data import world
from ng_jax.judges import features as jf
from ng_jax.judges.toy import frechet_distance, knn_precision_recall, reference_renders
from ng_jax.tools import fit
from ng_jax.tools.train_verifier import training_scenes

_COLOR_NAMES = tuple(world.COLORS)


def scene_labels(scene: Sequence[world.PlacedObject]) -> tuple[np.ndarray, int]:
    """Multi-hot presence [S + C + Z] (shapes, colours, sizes) and the object count."""
    presence = np.zeros(jf.NUM_SHAPES + jf.NUM_COLORS + jf.NUM_SIZES, np.float32)
    for obj in scene:
        presence[world.SHAPES.index(obj.shape)] = 1.0
        presence[jf.NUM_SHAPES + _COLOR_NAMES.index(obj.color)] = 1.0
        presence[jf.NUM_SHAPES + jf.NUM_COLORS + world.SIZES.index(obj.size)] = 1.0
    return presence, len(scene)


def labelled_renders(scenes):
    images = np.stack([world.render(s) for s in scenes])
    labels = [scene_labels(s) for s in scenes]
    return images, np.stack([p for p, _ in labels]), np.asarray([c for _, c in labels], np.int32)


MAX_NOISE_STD = 0.25  # in [-1, 1] image units (about 32 of 255)
MAX_LOG_GAIN = 0.2


def degrade(rng: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Randomly degraded float images in [-1, 1] and the normalised degradation levels [B, 3]:
    Gaussian noise std / MAX_NOISE_STD, 3x3 blur strength in [0, 1], log contrast gain / MAX_LOG_GAIN
    (the gain scales deviations from the world's background colour). Each is applied to about half
    of the images, independently."""
    b = images.shape[0]
    keys = jax.random.split(rng, 7)
    on = lambda k: (jax.random.uniform(k, (b,)) < 0.5).astype(jnp.float32)  # noqa: E731
    noise = on(keys[0]) * jax.random.uniform(keys[1], (b,))
    blur = on(keys[2]) * jax.random.uniform(keys[3], (b,))
    gain = on(keys[4]) * jax.random.uniform(keys[5], (b,), minval=-1.0, maxval=1.0)
    x = images + blur[:, None, None, None] * (fit.blur3x3(images) - images)
    background = jnp.asarray(world.BACKGROUND, jnp.float32) / 127.5 - 1.0
    x = background + (x - background) * jnp.exp(gain * MAX_LOG_GAIN)[:, None, None, None]
    x = x + (noise * MAX_NOISE_STD)[:, None, None, None] * jax.random.normal(keys[6], x.shape)
    return jnp.clip(x, -1.0, 1.0), jnp.stack([noise, blur, gain], axis=-1)


def judge_loss(params, images, presence, count, degradation):
    _, presence_logits, count_logits, degradation_pred = jf.judge_outputs(params, images)
    bce = optax.sigmoid_binary_cross_entropy(presence_logits, presence).sum(-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(count_logits, count)
    mse = jnp.sum((degradation_pred - degradation) ** 2, -1)
    return jnp.mean(bce + ce + 2.0 * mse)


def batch_loss(params, key, images_u8, presence, count):
    images, degradation = degrade(key, fit.to_float(images_u8))
    return judge_loss(params, images, presence, count, degradation)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    train_images: int = 20000
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 1
    eval_renders: int = 512


def train(cfg: TrainConfig):
    """Trained judge parameters and the per-step training losses."""
    rng = np.random.default_rng(cfg.seed)
    arrays = labelled_renders(training_scenes(cfg.train_images, rng))
    return fit.fit(batch_loss, jf.init_judge_params(jax.random.key(cfg.seed)), arrays, steps=cfg.steps,
                   batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=100, seed=cfg.seed,
                   rng=rng, desc="judge")


def evaluate(params, n: int, seed: int = 4321) -> dict:
    """Held-out label accuracy and FD / precision / recall sanity numbers on TEST-prompt renders."""
    rng = np.random.default_rng(seed)
    test = [p for _, p in prompt_sets.prompts_for("test")]
    chosen = [test[i] for i in rng.integers(0, len(test), n)]
    real = reference_renders(chosen, rng.integers(0, 2**31, n))
    fresh = reference_renders(chosen, rng.integers(0, 2**31, n))
    scenes = [world.sample_scene(p, rng) for p in chosen]
    images, presence, count = labelled_renders(scenes)
    _, pl, cl, _ = jax.jit(jf.judge_outputs)(params, images.astype(np.float32) / 127.5 - 1.0)
    feats = jf.JudgeFeatures(params=params)
    f_real = feats.features(real)
    noisy = np.clip(fresh + rng.normal(0, 20, fresh.shape), 0, 255).astype(np.uint8)
    variants = {
        "fresh_renders": fresh,
        "blurred_renders": fit.blur3x3_uint8(fresh),
        "noisy_renders_std20": noisy,
        "saturated_renders_x1.3": np.clip(fresh.astype(np.float32) * 1.3, 0, 255).astype(np.uint8),
        "uniform_noise_images": rng.integers(0, 256, fresh.shape, dtype=np.uint8),
    }
    quality = {}
    for name, imgs in variants.items():
        f = feats.features(imgs)
        quality[name] = {"fd": frechet_distance(f, f_real), **knn_precision_recall(f_real, f, k=3)}
    return {
        "eval_images": n,
        "presence_label_acc": float(np.mean((np.asarray(pl) > 0) == (presence > 0.5))),
        "presence_exact_set_acc": float(np.mean(np.all((np.asarray(pl) > 0) == (presence > 0.5), -1))),
        "count_acc": float(np.mean(np.argmax(np.asarray(cl), -1) == count)),
        "quality_vs_reference_renders": quality,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="directory for judge_features.msgpack + metrics")
    fit.add_dataclass_args(parser, TrainConfig)
    args = parser.parse_args(argv)
    cfg = fit.dataclass_from_args(TrainConfig, args)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    params, _ = train(cfg)
    train_s = time.time() - t0
    weights = args.out / "judge_features.msgpack"
    jf.save_judge_params(params, weights)
    metrics = evaluate(jf.load_judge_params(weights), cfg.eval_renders)
    metrics.update(config=dataclasses.asdict(cfg), train_seconds=round(train_s, 1), feature_dim=jf.FEATURE_DIM)
    (args.out / "judge_features_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
