"""Train the shapes-world verifier (reward proxy one) and ship its weights and test metrics.

    python -m ng_jax.tools.train_verifier --out ng_jax/assets

Training scenes: renders of every category's TRAIN prompts plus random off-prompt scenes (0-4
random objects), with augmentation that makes the detector robust to generated, imperfect images
(Gaussian noise, slight blur, colour jitter). Evaluation: fresh renders of the TEST prompts
(per-attribute detection accuracy, judge accuracy on correct renders) and deliberately wrong
renders (an object recoloured, reshaped, removed or added, or the scene mirrored), kept only when
`world.satisfies` says they are wrong; the verifier should reject them. Writes
``verifier.msgpack`` and ``verifier_metrics.json`` into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ng_jax.data import prompts as prompt_sets
from ng_jax.data import world
from ng_jax.rewards import verifier as vf
from ng_jax.tools import fit

WRONG_KINDS = ("recolor", "reshape", "remove", "add", "mirror")


# ------------------------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, max_objects: int = 4) -> tuple[world.PlacedObject, ...]:
    """0..max_objects random objects (any shape, colour, size) placed without overlap."""
    n = int(rng.integers(0, max_objects + 1))
    placed: list[world.PlacedObject] = []
    for _ in range(n):
        for _ in range(50):
            size = world.SIZES[rng.integers(len(world.SIZES))]
            d = world.SIZE_PX[size]
            lo, hi = 0.5 * d + world.BORDER_PX, world.CANVAS - 0.5 * d - world.BORDER_PX
            cx, cy = rng.uniform(lo, hi, size=2)
            if all(math.hypot(p.cx - cx, p.cy - cy) >= 0.6 * (d + world.SIZE_PX[p.size]) + world.GAP_PX for p in placed):
                placed.append(world.PlacedObject(world.SHAPES[rng.integers(len(world.SHAPES))],
                                                 list(world.COLORS)[rng.integers(len(world.COLORS))], size,
                                                 float(cx), float(cy)))
                break
    return tuple(placed)


def training_scenes(n: int, rng: np.random.Generator, off_prompt_fraction: float = 0.3
                    ) -> list[tuple[world.PlacedObject, ...]]:
    """Scenes of random TRAIN prompts (category-balanced) mixed with random off-prompt scenes."""
    by_category = [prompt_sets.split_prompts(c, "train") for c in world.CATEGORIES]
    scenes = []
    for _ in range(n):
        if rng.random() < off_prompt_fraction:
            scenes.append(random_scene(rng))
        else:
            pool = by_category[rng.integers(len(by_category))]
            scenes.append(world.sample_scene(pool[rng.integers(len(pool))], rng))
    return scenes


def cell_targets(scene: Sequence[world.PlacedObject]) -> np.ndarray:
    """Per-cell training targets [8, 8, 6]: objectness, shape, colour, size indices, centre offsets."""
    t = np.zeros((vf.GRID, vf.GRID, 6), np.float32)
    for obj in scene:
        gx, gy = obj.cx / vf.CELL_PX, obj.cy / vf.CELL_PX
        col, row = min(int(gx), vf.GRID - 1), min(int(gy), vf.GRID - 1)
        t[row, col] = (1.0, vf.SHAPE_NAMES.index(obj.shape), vf.COLOR_NAMES.index(obj.color),
                       vf.SIZE_NAMES.index(obj.size), gx - col, gy - row)
    return t


def render_dataset(scenes) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([world.render(s) for s in scenes])
    targets = np.stack([cell_targets(s) for s in scenes])
    return images, targets


# -------------------------------------------------------------------------------------- augmentation


def augment(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Imperfect-image augmentation of float images in [-1, 1]: colour jitter (per-channel gain and
    shift), a random-strength 3x3 blur on half the images, Gaussian noise of random scale."""
    b = images.shape[0]
    k_gain, k_shift, k_blur, k_on, k_sigma, k_noise = jax.random.split(rng, 6)
    gain = 1.0 + jax.random.uniform(k_gain, (b, 1, 1, 3), minval=-0.08, maxval=0.08)
    shift = jax.random.uniform(k_shift, (b, 1, 1, 3), minval=-0.08, maxval=0.08)
    x = (images + 1.0) * gain - 1.0 + shift
    blurred = fit.blur3x3(x)
    strength = jax.random.uniform(k_blur, (b, 1, 1, 1)) * (jax.random.uniform(k_on, (b, 1, 1, 1)) < 0.5)
    x = x + strength * (blurred - x)
    sigma = jax.random.uniform(k_sigma, (b, 1, 1, 1), maxval=0.15)
    x = x + sigma * jax.random.normal(k_noise, x.shape)
    return jnp.clip(x, -1.0, 1.0)


# ------------------------------------------------------------------------------------------- training


def detection_loss(params, images: jax.Array, targets: jax.Array, positive_weight: float = 4.0) -> jax.Array:
    logits = vf.verifier_logits(params, images)
    obj = targets[..., 0]
    obj_loss = optax.sigmoid_binary_cross_entropy(logits[..., 0], obj)
    obj_loss = jnp.mean(obj_loss * (1.0 + (positive_weight - 1.0) * obj))
    ce = lambda sl, k: optax.softmax_cross_entropy_with_integer_labels(logits[..., sl], targets[..., k].astype(jnp.int32))  # noqa: E731
    cls = ce(vf.SHAPE, 1) + ce(vf.COLOR, 2) + ce(vf.SIZE, 3)
    off = jnp.sum((jax.nn.sigmoid(logits[..., vf.OFFSET]) - targets[..., 4:6]) ** 2, -1)
    n_pos = jnp.maximum(jnp.sum(obj), 1.0)
    return obj_loss + jnp.sum((cls + 10.0 * off) * obj) / n_pos


def batch_loss(params, key, images_u8, targets):
    return detection_loss(params, augment(key, fit.to_float(images_u8)), targets)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    train_images: int = 40000
    steps: int = 2500
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    eval_renders_per_prompt: int = 4


def train(cfg: TrainConfig):
    """Trained verifier parameters and the per-step training losses."""
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    arrays = render_dataset(training_scenes(cfg.train_images, rng))
    print(f"rendered {len(arrays[0])} training scenes in {time.time() - t0:.1f}s")
    return fit.fit(batch_loss, vf.init_verifier_params(jax.random.key(cfg.seed)), arrays, steps=cfg.steps,
                   batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=200, seed=cfg.seed,
                   rng=rng, desc="verifier")


# ----------------------------------------------------------------------------------------- evaluation


def wrong_scene(spec: world.PromptSpec, scene: Sequence[world.PlacedObject], kind: str,
                rng: np.random.Generator) -> tuple[world.PlacedObject, ...] | None:
    """A deliberately wrong variant of a correct scene, or None when `kind` cannot make it wrong
    (e.g. recolouring an object of a colour-free prompt). Truth is `world.satisfies`."""
    objs = list(scene)
    i = int(rng.integers(len(objs)))
    if kind == "recolor":
        colors = [c for c in world.COLORS if c != objs[i].color]
        objs[i] = dataclasses.replace(objs[i], color=colors[rng.integers(len(colors))])
    elif kind == "reshape":
        shapes = [s for s in world.SHAPES if s != objs[i].shape]
        objs[i] = dataclasses.replace(objs[i], shape=shapes[rng.integers(len(shapes))])
    elif kind == "remove":
        objs.pop(i)
    elif kind == "add":
        for _ in range(100):
            extra = random_scene(rng, 1)
            if extra and all(math.hypot(p.cx - extra[0].cx, p.cy - extra[0].cy)
                             >= 0.6 * (world.SIZE_PX[p.size] + world.SIZE_PX[extra[0].size]) + world.GAP_PX for p in objs):
                objs.append(extra[0])
                break
        else:
            return None
    elif kind == "mirror":
        if spec.relation is None:
            return None
        horizontal = spec.relation in ("left of", "right of")
        objs = [dataclasses.replace(o, cx=world.CANVAS - o.cx) if horizontal else
                dataclasses.replace(o, cy=world.CANVAS - o.cy) for o in objs]
    else:
        raise ValueError(f"unknown wrong-scene kind {kind!r}; expected one of {WRONG_KINDS}")
    objs = tuple(objs)
    return None if world.satisfies(spec, objs) else objs


def degrade(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Imperfect versions of uint8 renders: Gaussian noise (std 12 of 255) or a 3x3 binomial blur."""
    if kind == "blur":
        return fit.blur3x3_uint8(images)
    if kind != "noise":
        raise ValueError(f"unknown degradation {kind!r}; expected 'noise' or 'blur'")
    return np.clip(np.round(images.astype(np.float32) + rng.normal(0.0, 12.0, images.shape)), 0, 255).astype(np.uint8)


def _match(truth, detected, max_dist: float = 3.0):
    """Greedy nearest-centre matching of true to detected objects."""
    pairs, free = [], list(detected)
    for t in truth:
        if not free:
            break
        d = [math.hypot(t.cx - o.cx, t.cy - o.cy) for o in free]
        j = int(np.argmin(d))
        if d[j] <= max_dist:
            pairs.append((t, free.pop(j)))
    return pairs


def evaluate(reward: vf.VerifierReward, renders_per_prompt: int = 4, seed: int = 12345) -> dict:
    """Detection and judge metrics on fresh renders of the TEST prompts, per category."""
    rng = np.random.default_rng(seed)
    metrics: dict = {"per_category": {}}
    totals = {k: [] for k in ("object_recall", "shape_acc", "color_acc", "size_acc", "count_acc", "center_err_px",
                              "judge_acc_correct", "judge_acc_correct_noisy", "judge_acc_correct_blurred",
                              "reject_rate_wrong")}
    wrong_by_kind = {k: [] for k in WRONG_KINDS}
    for category in world.CATEGORIES:
        texts, scenes, wrong_texts, wrong_scenes, wrong_kinds = [], [], [], [], []
        for text in prompt_sets.split_prompts(category, "test"):
            spec = world.parse_prompt(text)
            for _ in range(renders_per_prompt):
                scene = world.sample_scene(spec, rng)
                texts.append(text)
                scenes.append(scene)
                for kind in WRONG_KINDS:
                    bad = wrong_scene(spec, scene, kind, rng)
                    if bad is not None:
                        wrong_texts.append(text)
                        wrong_scenes.append(bad)
                        wrong_kinds.append(kind)
        images = np.stack([world.render(s) for s in scenes])
        detections = reward.detect(images)
        pairs = [p for s, d in zip(scenes, detections) for p in _match(s, d)]
        n_true = sum(len(s) for s in scenes)
        cat = {
            "renders": len(scenes),
            "object_recall": len(pairs) / max(n_true, 1),
            "shape_acc": float(np.mean([t.shape == d.shape for t, d in pairs])),
            "color_acc": float(np.mean([t.color == d.color for t, d in pairs])),
            "size_acc": float(np.mean([t.size == d.size for t, d in pairs])),
            "count_acc": float(np.mean([len(s) == len(d) for s, d in zip(scenes, detections)])),
            "center_err_px": float(np.mean([math.hypot(t.cx - d.cx, t.cy - d.cy) for t, d in pairs])),
            "judge_acc_correct": float(np.mean(reward.judge(images, texts))),
            "judge_acc_correct_noisy": float(np.mean(reward.judge(degrade(images, "noise", rng), texts))),
            "judge_acc_correct_blurred": float(np.mean(reward.judge(degrade(images, "blur", rng), texts))),
            "wrong_renders": len(wrong_scenes),
        }
        if wrong_scenes:
            judged = reward.judge(np.stack([world.render(s) for s in wrong_scenes]), wrong_texts)
            cat["reject_rate_wrong"] = float(np.mean(~judged))
            for k, j in zip(wrong_kinds, judged):
                wrong_by_kind[k].append(not j)
        metrics["per_category"][category] = cat
        for k in totals:
            if k in cat:
                totals[k].append(cat[k])
    metrics["mean_over_categories"] = {k: float(np.mean(v)) for k, v in totals.items()}
    metrics["reject_rate_wrong_by_kind"] = {k: {"n": len(v), "rate": float(np.mean(v)) if v else None}
                                            for k, v in wrong_by_kind.items()}
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="directory for verifier.msgpack + metrics")
    fit.add_dataclass_args(parser, TrainConfig)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the weights already in --out")
    args = parser.parse_args(argv)
    cfg = fit.dataclass_from_args(TrainConfig, args)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "verifier.msgpack"
    metrics_path = args.out / "verifier_metrics.json"
    if args.eval_only:  # re-measure shipped weights; keep the recorded training time and config
        previous = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        train_s = previous.get("train_seconds")
        cfg = TrainConfig(**previous.get("config", dataclasses.asdict(cfg)))
    else:
        t0 = time.time()
        params, _ = train(cfg)
        train_s = time.time() - t0
        vf.save_verifier_params(params, weights)
    metrics = evaluate(vf.VerifierReward(weights_path=weights), cfg.eval_renders_per_prompt)
    metrics.update(config=dataclasses.asdict(cfg), train_seconds=None if train_s is None else round(train_s, 1),
                   vocabulary={"shapes": vf.SHAPE_NAMES, "colors": vf.COLOR_NAMES, "sizes": vf.SIZE_NAMES})
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics["mean_over_categories"], indent=2))
    print(json.dumps(metrics["reject_rate_wrong_by_kind"], indent=2))


if __name__ == "__main__":
    main()
