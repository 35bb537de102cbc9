"""The synthetic annotator of the preference reward's training data: vividness, the annotator's choice
probability, the appearance perturbations (saturation, contrast, brightness, blur, noise) that make
vividness vary both ways, and wrong scenes for the correctness pairs (ng_jax.tools.train_preference)."""
from __future__ import annotations

import numpy as np

from ng_jax.data import world
from ng_jax.rewards import colour
from ng_jax.tools import fit
from ng_jax.tools.train_verifier import WRONG_KINDS, wrong_scene

VIVID_COLOURFULNESS_REF = 50.0
VIVID_CONTRAST_REF = 0.12
DEFAULT_BETA = 0.75
DEFAULT_ANNOTATOR_NOISE = 0.1
PAIR_KINDS = ("correctness", "vividness", "mixed")
MIRROR_FRACTION = 0.4
ALL_WRONG_KINDS = (*WRONG_KINDS, "other_prompt")

# Appearance perturbations: (probability of being applied, range). Factors are log-uniform.
SATURATION = (0.7, (0.3, 2.5))  # scale of the deviation from the pixel's luma
CONTRAST = (0.6, (0.5, 2.0))  # scale of the deviation from the image's mean luma
BRIGHTNESS = (0.4, (-40.0, 40.0))  # added to every channel (0..255 units)
BLUR = (0.3, (0.0, 1.0))  # blend towards the 3x3 binomial blur
NOISE = (0.4, (0.0, 20.0))  # Gaussian noise std (0..255 units)


# ------------------------------------------------------------------------------------ the annotator


def vividness(images: np.ndarray) -> np.ndarray:
    """The annotator's vividness of uint8 images [B, H, W, 3]: float32 [B], about 1 for a clean render."""
    smooth = fit.blur3x3_uint8(images)
    return (0.5 * colour.colourfulness(smooth) / VIVID_COLOURFULNESS_REF
            + 0.5 * colour.rms_contrast(smooth) / VIVID_CONTRAST_REF).astype(np.float32)


def annotator_probability(u_a: np.ndarray, u_b: np.ndarray, noise: float) -> np.ndarray:
    """P(the annotator prefers a) = sigmoid((u_a - u_b) / noise)."""
    return 0.5 * (1.0 + np.tanh(0.5 * (np.asarray(u_a, np.float64) - u_b) / noise))  # a sigmoid that never overflows


# ---------------------------------------------------------------------------------------- appearance


def sample_appearance(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n random perturbations: arrays 'saturation', 'contrast', 'brightness', 'blur', 'noise', 'seed'."""
    def pick(spec, log):
        prob, (lo, hi) = spec
        on = rng.random(n) < prob
        if log:
            return np.where(on, np.exp(rng.uniform(np.log(lo), np.log(hi), n)), 1.0)
        return np.where(on, rng.uniform(lo, hi, n), 0.0)

    return {"saturation": pick(SATURATION, True), "contrast": pick(CONTRAST, True),
            "brightness": pick(BRIGHTNESS, False), "blur": pick(BLUR, False), "noise": pick(NOISE, False),
            "seed": rng.integers(0, 2**31, n)}


def _blur_float(x: np.ndarray) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    xp = 0.25 * xp[:, :h] + 0.5 * xp[:, 1:h + 1] + 0.25 * xp[:, 2:h + 2]
    return 0.25 * xp[:, :, :w] + 0.5 * xp[:, :, 1:w + 1] + 0.25 * xp[:, :, 2:w + 2]


def apply_appearance(images: np.ndarray, app: dict[str, np.ndarray]) -> np.ndarray:
    """Perturbed copies of uint8 images [N, H, W, 3] (one perturbation each, from `sample_appearance`):
    saturation about the pixel luma, contrast about the mean luma, brightness, blur, noise; rounded."""
    col = lambda k: np.asarray(app[k], np.float32)[:, None, None, None]  # noqa: E731
    x = images.astype(np.float32)
    luma = (x @ np.asarray(colour.LUMA_WEIGHTS, np.float32))[..., None]
    x = luma + col("saturation") * (x - luma)
    mean = luma.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + col("contrast") * (x - mean) + col("brightness")
    x = x + col("blur") * (_blur_float(x) - x)
    noise = np.stack([np.random.default_rng(int(s)).standard_normal(images.shape[1:], np.float32)
                      for s in app["seed"]]) if len(images) else 0.0
    x = x + col("noise") * noise
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def adjust(images: np.ndarray, saturation: float = 1.0, contrast: float = 1.0) -> np.ndarray:
    """Only a saturation and / or contrast change of uint8 images (the evaluation's sweeps)."""
    n = len(images)
    app = {"saturation": np.full(n, saturation), "contrast": np.full(n, contrast), "brightness": np.zeros(n),
           "blur": np.zeros(n), "noise": np.zeros(n), "seed": np.zeros(n, np.int64)}
    return apply_appearance(images, app)


# -------------------------------------------------------------------------------------------- pairs


def make_wrong(spec: world.PromptSpec, scene, category_pool, rng: np.random.Generator):
    """(a wrong scene for `spec`, its kind): a `train_verifier.wrong_scene` edit of `scene`, or a scene
    of another prompt of the category; always one that `world.satisfies` rejects. Relation prompts are
    mirrored with probability MIRROR_FRACTION (else their relation would rarely be what is wrong)."""
    kinds = [k for k in ALL_WRONG_KINDS if k != "mirror"]
    for _ in range(100):
        if spec.relation is not None and rng.random() < MIRROR_FRACTION:
            kind = "mirror"
        else:
            kind = kinds[rng.integers(len(kinds))]
        if kind == "other_prompt":
            other = category_pool[rng.integers(len(category_pool))]
            bad = world.sample_scene(other, rng)
            if world.satisfies(spec, bad):
                continue
        else:
            bad = wrong_scene(spec, scene, kind, rng)
            if bad is None:
                continue
        return bad, kind
    raise RuntimeError(f"could not make a wrong scene for {world.format_prompt(spec)!r}")
