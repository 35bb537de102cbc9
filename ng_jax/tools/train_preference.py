"""Train the shapes-world preference reward Bradley-Terry on synthetic pairwise choices; ship it.

    python -m ng_jax.tools.train_preference --out ng_jax/assets

(the shipped ``preference.msgpack`` / ``preference_metrics.json`` come from exactly this command,
all defaults: 60000 training pairs, 2500 steps of 64 pairs, 444 s of training on 2 shared CPU
cores; held-out accuracy 0.80 against the annotator's choices, whose Bayes-optimal ceiling is 0.89).

The synthetic annotator. Shown two images of the same prompt, it has a utility for each,

    u = correctness(image, prompt) + beta * vividness(image),

and prefers image a with probability sigmoid((u_a - u_b) / annotator_noise): a Bradley-Terry model
in u (equivalently: it adds independent Gumbel noise of scale annotator_noise to each utility, or
logistic noise to their difference, and picks the larger). The choice is drawn once per pair and
fixed, like a collected dataset.

- correctness: ``verifier.graded_alignment`` of the TRUE scene (the annotator knows what was
  rendered) against the prompt: the fraction of the prompt's atomic constraints met, 1.0 exactly
  when the scene is correct.
- vividness: ``0.5 * colourfulness / VIVID_COLOURFULNESS_REF + 0.5 * rms_contrast / VIVID_CONTRAST_REF``
  (Hasler-Suesstrunk colourfulness and RMS luma contrast, ``ng_jax.rewards.colour``), measured on the
  3x3-blurred image so that pixel noise does not count as colour. The references are about the
  median of clean renders of the train prompts, so a clean render has vividness about 1.
- beta (``--beta``, default ``DEFAULT_BETA`` = 0.75) is the strength of the vividness bias; its
  default is chosen so that both signals matter: half of the held-out pairs are decided by each
  (|dc| > beta |dv| or not, dc and dv the pair's correctness and vividness differences), and where
  the two conflict, correctness wins 87% and vividness 13% (the metrics report the split). Raising
  vividness from a clean render's ~1 to ~2 is worth as much as a typical correctness error (0.3-0.8).
- annotator_noise (``--annotator-noise``, default 0.1): about 11% of the choices go against the
  noiseless preference sign(u_a - u_b).

The images. For each sampled TRAIN prompt (category-balanced): two correct renders C, C2 and one
deliberately wrong render W (an object recoloured, reshaped, removed or added, the scene mirrored
(relation prompts), or a scene of another prompt of the category; kept only when ``world.satisfies``
says it is wrong).
Every image gets an independent random appearance perturbation in both directions (saturation
boosts and cuts, contrast boosts and cuts, brightness shifts, 3x3 blur, Gaussian noise; each
applied to a random subset, with ranges beyond what the renders themselves contain), as generated
samples look. Three pairs per prompt:

- ``correctness``: C vs W under the SAME perturbation (they differ in correctness only, up to the
  vividness change that the content change itself causes);
- ``vividness``: one scene (C or W) under two independent perturbations (same correctness);
- ``mixed``: two of {C, C2, W} under independent perturbations.

Evaluation: fresh pairs of the TEST prompts; accuracy against the annotator's (noisy) choices and
against its noiseless preference sign(u_a - u_b), per pair kind; the Bayes-optimal accuracy against
the noisy choices; which signal decides the pairs; how the score responds to saturation / contrast
changes of clean renders, including beyond the training range. Writes ``preference.msgpack`` and
``preference_metrics.json`` into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ng_jax.data import prompts as prompt_sets
from ng_jax.data import world
from ng_jax.rewards import colour
from ng_jax.rewards import preference as pref
from ng_jax.rewards.verifier import graded_alignment
from ng_jax.tools import fit
from ng_jax.tools.preference_data import (  # noqa: F401 (the annotator, re-exported)
    ALL_WRONG_KINDS,
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    DEFAULT_ANNOTATOR_NOISE,
    DEFAULT_BETA,
    MIRROR_FRACTION,
    NOISE,
    PAIR_KINDS,
    SATURATION,
    VIVID_COLOURFULNESS_REF,
    VIVID_CONTRAST_REF,
    _blur_float,
    adjust,
    annotator_probability,
    apply_appearance,
    make_wrong,
    sample_appearance,
    vividness,
)


@dataclasses.dataclass
class Pairs:
    """Pairs of images of the same prompt, the annotator's view of them and its choices."""

    images_a: np.ndarray  # uint8 [N, 32, 32, 3]
    images_b: np.ndarray
    prompts: list[str]
    features: np.ndarray  # float32 [N, PROMPT_DIM]
    kind: np.ndarray  # int [N], index into PAIR_KINDS
    wrong_kind: list[str]  # the wrong scene's kind when the pair holds one, else ""
    correctness_a: np.ndarray
    correctness_b: np.ndarray
    vividness_a: np.ndarray
    vividness_b: np.ndarray
    choice: np.ndarray  # float32 [N]: 1.0 where the annotator chose a

    def utilities(self, beta: float) -> tuple[np.ndarray, np.ndarray]:
        return self.correctness_a + beta * self.vividness_a, self.correctness_b + beta * self.vividness_b


def make_pairs(n_prompts: int, split: str, beta: float, noise: float, rng: np.random.Generator) -> Pairs:
    """3 * n_prompts pairs (one of each kind per sampled prompt of `split`), order within a pair random."""
    pools = {c: prompt_sets.split_prompts(c, split) for c in world.CATEGORIES}
    base_a, base_b, prompts, kinds, wrong_kinds, corr_a, corr_b, same_app = [], [], [], [], [], [], [], []
    for _ in range(n_prompts):
        category = world.CATEGORIES[rng.integers(len(world.CATEGORIES))]
        text = pools[category][rng.integers(len(pools[category]))]
        spec = world.parse_prompt(text)
        good, good2 = world.sample_scene(spec, rng), world.sample_scene(spec, rng)
        bad, bad_kind = make_wrong(spec, good, pools[category], rng)
        scenes = (good, good2, bad)
        renders = [world.render(s) for s in scenes]
        corr = (1.0, 1.0, graded_alignment(spec, bad))
        same = int(rng.integers(2)) * 2  # the vividness pair's scene: C or W
        i, j = rng.choice(3, 2, replace=False)  # the mixed pair's scenes
        for kind, (x, y), shared in ((0, (0, 2), True), (1, (same, same), False), (2, (int(i), int(j)), False)):
            if rng.random() < 0.5:
                x, y = y, x
            base_a.append(renders[x])
            base_b.append(renders[y])
            corr_a.append(corr[x])
            corr_b.append(corr[y])
            prompts.append(text)
            kinds.append(kind)
            wrong_kinds.append(bad_kind if 2 in (x, y) else "")
            same_app.append(shared)
    n = len(prompts)
    app_a = sample_appearance(n, rng)
    app_b = sample_appearance(n, rng)
    shared = np.asarray(same_app)
    app_b = {k: np.where(shared, app_a[k], v) for k, v in app_b.items()}
    images_a = apply_appearance(np.stack(base_a), app_a)
    images_b = apply_appearance(np.stack(base_b), app_b)
    pairs = Pairs(images_a, images_b, prompts, pref.prompt_features(prompts), np.asarray(kinds),
                  wrong_kinds, np.asarray(corr_a, np.float32), np.asarray(corr_b, np.float32),
                  vividness(images_a), vividness(images_b), np.zeros(n, np.float32))
    u_a, u_b = pairs.utilities(beta)
    pairs.choice = (rng.random(n) < annotator_probability(u_a, u_b, noise)).astype(np.float32)
    return pairs


# ------------------------------------------------------------------------------------------- training


def bradley_terry_loss(params, images_a: jax.Array, images_b: jax.Array, features: jax.Array,
                       choice: jax.Array) -> jax.Array:
    """Mean of -log sigmoid(s_chosen - s_other) over pairs (float images in [-1, 1])."""
    n = images_a.shape[0]
    scores = pref.preference_scores(params, jnp.concatenate([images_a, images_b]),
                                    jnp.concatenate([features, features]))
    margin = scores[:n] - scores[n:]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(margin, choice))


def batch_loss(params, key, images_a, images_b, features, choice):
    del key  # no augmentation: it would change what the annotator saw
    return bradley_terry_loss(params, fit.to_float(images_a), fit.to_float(images_b), features, choice)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    train_prompts: int = 20000  # 3 pairs each
    steps: int = 2500
    batch_size: int = 64  # pairs
    learning_rate: float = 2e-3
    seed: int = 0
    beta: float = DEFAULT_BETA
    annotator_noise: float = DEFAULT_ANNOTATOR_NOISE
    test_prompts: int = 2000


def train(cfg: TrainConfig):
    """Trained preference parameters and the per-step training losses."""
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    pairs = make_pairs(cfg.train_prompts, "train", cfg.beta, cfg.annotator_noise, rng)
    print(f"made {len(pairs.prompts)} training pairs in {time.time() - t0:.1f}s")
    arrays = (pairs.images_a, pairs.images_b, pairs.features, pairs.choice)
    return fit.fit(batch_loss, pref.init_preference_params(jax.random.key(cfg.seed)), arrays, steps=cfg.steps,
                   batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, warmup_steps=200, seed=cfg.seed,
                   rng=rng, desc="preference")


# ----------------------------------------------------------------------------------------- evaluation

SATURATION_SWEEP = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
CONTRAST_SWEEP = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0)


def _rate(mask: np.ndarray, values: np.ndarray) -> float | None:
    return float(np.mean(values[mask])) if np.any(mask) else None


def _sweep(reward, images, prompts, key: str, factors) -> dict:
    base = reward(images, prompts)
    out = {}
    for f in factors:
        x = adjust(images, **{key: f})
        s = reward(x, prompts)
        out[f"{f:g}"] = {"mean_score_change": float(np.mean(s - base)), "preferred_to_clean": float(np.mean(s > base)),
                         "mean_colourfulness": float(np.mean(colour.colourfulness(x))),
                         "mean_rms_contrast": float(np.mean(colour.rms_contrast(x)))}
    return out


def evaluate(reward: pref.PreferenceReward, cfg: TrainConfig, seed: int = 12345) -> dict:
    """Held-out pairwise metrics on fresh pairs of the TEST prompts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pairs = make_pairs(cfg.test_prompts, "test", cfg.beta, cfg.annotator_noise, rng)
    t0 = time.time()
    s_a = reward(pairs.images_a, pairs.prompts)
    s_b = reward(pairs.images_b, pairs.prompts)
    host_rate = 2 * len(s_a) / (time.time() - t0)
    model_a = s_a > s_b
    u_a, u_b = pairs.utilities(cfg.beta)
    noiseless_a = u_a > u_b
    chose_a = pairs.choice > 0.5
    p_a = annotator_probability(u_a, u_b, cfg.annotator_noise)
    masks = {"overall": np.ones(len(s_a), bool), **{f"{k}_only" if k != "mixed" else k: pairs.kind == i
                                                    for i, k in enumerate(PAIR_KINDS)}}
    dc = pairs.correctness_a - pairs.correctness_b
    dv = cfg.beta * (pairs.vividness_a - pairs.vividness_b)
    by_correctness = np.abs(dc) > np.abs(dv)
    conflict = (dc * dv) < 0
    corr_pairs = pairs.kind == PAIR_KINDS.index("correctness")
    prefers_correct = np.where(dc > 0, model_a, ~model_a)
    wrong_kinds = np.asarray(pairs.wrong_kind)

    clean_rng = np.random.default_rng(seed + 1)
    test = [p for _, p in prompt_sets.prompts_for("test")]
    chosen = [test[i] for i in clean_rng.integers(0, len(test), 512)]
    clean = np.stack([world.render(world.sample_scene(p, clean_rng)) for p in chosen])
    boosted = adjust(clean, saturation=1.5, contrast=1.3)
    return {
        "test_pairs": len(s_a),
        "test_pairs_by_kind": {k: int(np.sum(pairs.kind == i)) for i, k in enumerate(PAIR_KINDS)},
        "accuracy_vs_annotator": {k: _rate(m, model_a == chose_a) for k, m in masks.items()},
        "agreement_with_noiseless_annotator": {k: _rate(m & (u_a != u_b), model_a == noiseless_a)
                                               for k, m in masks.items()},
        "bayes_optimal_accuracy_vs_annotator": {k: _rate(m, np.maximum(p_a, 1.0 - p_a)) for k, m in masks.items()},
        "annotator_choices_agree_with_noiseless": _rate(u_a != u_b, chose_a == noiseless_a),
        "correctness_pairs_model_prefers_correct": {
            "overall": _rate(corr_pairs, prefers_correct),
            **{k: _rate(corr_pairs & (wrong_kinds == k), prefers_correct) for k in ALL_WRONG_KINDS}},
        "decided_by": {
            "correctness": float(np.mean(by_correctness)), "vividness": float(np.mean(~by_correctness)),
            "conflicting_pairs": int(np.sum(conflict)),
            "conflicts_won_by_correctness": _rate(conflict, by_correctness),
            "note": "a pair is decided by correctness where |dc| > beta |dv| (dc, dv: the pair's correctness and "
                    "vividness differences), else by vividness; conflicting pairs: the two signals prefer "
                    "different images"},
        "vividness_test_images": {"p5": float(np.percentile(np.r_[pairs.vividness_a, pairs.vividness_b], 5)),
                                  "median": float(np.median(np.r_[pairs.vividness_a, pairs.vividness_b])),
                                  "p95": float(np.percentile(np.r_[pairs.vividness_a, pairs.vividness_b], 95))},
        "boosted_saturation1.5_contrast1.3_preferred_to_clean": float(np.mean(reward(boosted, chosen)
                                                                              > reward(clean, chosen))),
        "saturation_sweep_on_clean_renders": _sweep(reward, clean, chosen, "saturation", SATURATION_SWEEP),
        "contrast_sweep_on_clean_renders": _sweep(reward, clean, chosen, "contrast", CONTRAST_SWEEP),
        "training_ranges": {"saturation": SATURATION[1], "contrast": CONTRAST[1]},
        "host_numpy_images_per_second": round(host_rate, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="directory for preference.msgpack + metrics")
    fit.add_dataclass_args(parser, TrainConfig)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the weights already in --out")
    args = parser.parse_args(argv)
    cfg = fit.dataclass_from_args(TrainConfig, args)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "preference.msgpack"
    metrics_path = args.out / "preference_metrics.json"
    final_loss = None
    if args.eval_only:  # re-measure shipped weights; keep the recorded training time and config
        previous = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        train_s, final_loss = previous.get("train_seconds"), previous.get("final_train_loss")
        cfg = TrainConfig(**previous.get("config", dataclasses.asdict(cfg)))
    else:
        t0 = time.time()
        params, losses = train(cfg)
        train_s = time.time() - t0
        final_loss = float(np.mean(losses[-100:]))
        pref.save_preference_params(params, weights)
    reward = pref.PreferenceReward(weights_path=weights)
    metrics = evaluate(reward, cfg)
    metrics.update(
        beta=cfg.beta, annotator_noise=cfg.annotator_noise, steps=cfg.steps,
        train_seconds=None if train_s is None else round(train_s, 1), final_train_loss=final_loss,
        vividness=f"0.5 * colourfulness / {VIVID_COLOURFULNESS_REF:g} + 0.5 * rms_contrast / {VIVID_CONTRAST_REF:g} "
                  "on the 3x3-blurred image",
        num_params=int(sum(np.size(a) for a in jax.tree.leaves(reward.params))),
        weights_bytes=weights.stat().st_size, config=dataclasses.asdict(cfg))
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("accuracy_vs_annotator", "agreement_with_noiseless_annotator",
                                              "bayes_optimal_accuracy_vs_annotator", "decided_by",
                                              "boosted_saturation1.5_contrast1.3_preferred_to_clean")}, indent=2))


if __name__ == "__main__":
    main()
