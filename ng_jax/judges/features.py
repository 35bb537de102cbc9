"""The judge feature network: a small CNN that no reward uses, for Frechet distance and
precision/recall of generated shapes-world images.

Trained by ``python -m ng_jax.tools.train_judge --out ng_jax/assets`` to predict, from a whole
image, which shapes, colours and sizes are present and how many objects there are (a global,
multi-label task unlike the per-cell verifier), and how strongly the image was degraded (Gaussian
noise, blur, contrast gain), so that its embedding encodes both content and image quality, as
Inception features do for FID. The features concatenate the spatially averaged activations of every
stage with the final embedding.
"""
from __future__ import annotations

import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.checkpoint import load_params_file
from ng_jax.data import world

IMAGE_SIZE = world.CANVAS
NUM_SHAPES, NUM_COLORS, NUM_SIZES = len(world.SHAPES), len(world.COLORS), len(world.SIZES)
MAX_OBJECTS = 4
NUM_COUNTS = MAX_OBJECTS + 1  # 0..4 objects
NUM_DEGRADATIONS = 3  # noise std, blur strength, log contrast gain (see tools/train_judge.degrade)
DEFAULT_WEIGHTS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "judge_features.msgpack"
CHUNK = 64


class JudgeFeatureNet(nn.Module):
    """[B, 32, 32, 3] in [-1, 1] -> (features [B, D], presence logits [B, S+C+Z], count logits [B, 5],
    degradation estimates [B, NUM_DEGRADATIONS])."""

    widths: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 64

    @nn.compact
    def __call__(self, images: jax.Array):
        h = images
        pooled = []
        for i, w in enumerate(self.widths):
            h = nn.gelu(nn.Conv(w, (5, 5) if i == 0 else (3, 3), name=f"conv{i}a")(h))
            h = nn.gelu(nn.Conv(w, (3, 3), name=f"conv{i}b")(h))
            pooled.append(jnp.mean(h, axis=(1, 2)))
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        embed = nn.gelu(nn.Dense(self.embed_dim, name="embed")(h.reshape(h.shape[0], -1)))
        features = jnp.concatenate([*pooled, embed], axis=-1)
        presence = nn.Dense(NUM_SHAPES + NUM_COLORS + NUM_SIZES, name="presence")(embed)
        count = nn.Dense(NUM_COUNTS, name="count")(embed)
        degradation = nn.Dense(NUM_DEGRADATIONS, name="degradation")(embed)
        return features, presence, count, degradation


MODEL = JudgeFeatureNet()
FEATURE_DIM = sum(MODEL.widths) + MODEL.embed_dim


def judge_outputs(params, images: jax.Array):
    """Pure forward on float images in [-1, 1]: (features, presence logits, count logits, degradation)."""
    return MODEL.apply({"params": params}, images)


def init_judge_params(rng: jax.Array):
    return MODEL.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))["params"]


def save_judge_params(params, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_bytes(flax.serialization.to_bytes(jax.device_get(params)))


def load_judge_params(path: str | pathlib.Path = DEFAULT_WEIGHTS):
    """Restore the judge parameters, with one-line errors for a missing, corrupt or mismatched file."""
    template = jax.eval_shape(init_judge_params, jax.random.key(0))
    return load_params_file(path, template, "judge feature", "ng_jax.tools.train_judge")


def make_feature_forward():
    return jax.jit(lambda params, images: judge_outputs(params, images)[0])


class JudgeFeatures:
    """Host-side feature extractor: uint8 [B, 32, 32, 3] -> float32 [B, FEATURE_DIM]."""

    def __init__(self, params=None, weights_path: str | pathlib.Path | None = None):
        if params is not None and weights_path is not None:
            raise ValueError("give either params or weights_path, not both")
        self.params = params if params is not None else load_judge_params(weights_path or DEFAULT_WEIGHTS)
        self._forward = make_feature_forward()

    def features(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"JudgeFeatures.features: images must be a uint8 numpy array, got {got}")
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"JudgeFeatures.features: images must have shape [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], "
                             f"got {images.shape}")
        x = images.astype(np.float32) / 127.5 - 1.0
        n = x.shape[0]
        pad = (-n) % CHUNK
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        out = [np.asarray(self._forward(self.params, x[i:i + CHUNK])) for i in range(0, x.shape[0], CHUNK)]
        return np.concatenate(out)[:n].astype(np.float32)
