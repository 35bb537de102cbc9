"""The shapes world's human-preference reward: a small Bradley-Terry preference model.

Real RL post-training of text-to-image models optimises learned human-preference rewards
(PickScore, HPSv2, ImageReward): networks trained Bradley-Terry on pairwise human choices, which
reward prompt alignment but also favour vivid, over-saturated, high-contrast images. This is the
toy world's analogue. ``python -m ng_jax.tools.train_preference`` trains it on synthetic pairwise
choices of an annotator whose utility is the image's correctness for the prompt plus a bias
towards vivid images (see that module), so the reward mixes an alignment signal with a
colourfulness / contrast bias that RL can exploit.

The network maps (image, prompt) to a scalar score; only score differences between images of the
same prompt are meaningful (a difference d means the model expects the annotator to prefer the
higher-scored image with probability sigmoid(d)).

- Image: float [B, 32, 32, 3] in [-1, 1], regrouped into 2x2-pixel patches (16x16x12) plus two
  fixed coordinate channels (x, y in [-1, 1]), through a conv tower 16x16 -> 8x8.
- Prompt: ``prompt_features``, a fixed one-hot featurisation of the parsed ``world.PromptSpec``
  (per group: present, shape, colour, size, count; the relation), embedded by a dense layer whose
  output modulates the 16x16 and 8x8 features and the head's hidden layer (FiLM:
  ``h * (1 + gamma) + beta``, gamma and beta linear in the embedding).
- Head: attention pooling of the last 8x8 features with one query per prompt group (a shared
  projection of that group's features) and a learned "any object" query: each query's attention
  mass (a soft count), centroid and attended features; with the spatial means of every stage (the
  global colour / contrast statistics), through a prompt-modulated hidden layer to one score.

``preference_scores`` is the Flax forward (for training); ``numpy_preference_forward`` is the same
computation in numpy, which the host reward ``PreferenceReward`` runs: rewards are called from
inside the rollout's device computation and must not run JAX on its devices. 87.5k parameters
(350 kB of msgpack); the numpy forward scores about a thousand 32x32 images per second on 2 CPU
cores. The shipped weights' held-out metrics are in ``assets/preference_metrics.json``: 0.80
agreement with the annotator's noisy choices (0.86 with its noiseless preference), the correct
image preferred in 0.81 of correct-vs-wrong pairs (weakest on relations and shapes), and a score
that keeps rising with saturation and contrast past the training range.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.checkpoint import load_params_file
from ng_jax.data import world
from ng_jax.rewards.verifier import check_verifier_images, numpy_conv

__all__ = ["PreferenceNet", "PreferenceReward", "prompt_features", "preference_scores", "numpy_preference_forward",
           "init_preference_params", "save_preference_params", "load_preference_params", "DEFAULT_WEIGHTS",
           "PROMPT_DIM", "IMAGE_SIZE"]

IMAGE_SIZE = world.CANVAS
SHAPE_NAMES = tuple(world.SHAPES)
COLOR_NAMES = tuple(world.COLORS)
SIZE_NAMES = tuple(world.SIZES)
RELATION_NAMES = tuple(world.RELATIONS)
# Per group: present flag, shape one-hot, colour one-hot (all zero = free), size one-hot (zero = free),
# count one-hot (1..MAX_COUNT); then the relation one-hot (all zero = none).
GROUP_DIM = 1 + len(SHAPE_NAMES) + len(COLOR_NAMES) + len(SIZE_NAMES) + world.MAX_COUNT
PROMPT_DIM = world.MAX_GROUPS * GROUP_DIM + len(RELATION_NAMES)

ASSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "preference.msgpack"
TRAIN_TOOL = "ng_jax.tools.train_preference"
CHUNK = 256  # images per numpy forward call


# ----------------------------------------------------------------------------------------- prompts


@functools.lru_cache(maxsize=8192)
def _spec_features(spec: world.PromptSpec) -> np.ndarray:
    f = np.zeros((PROMPT_DIM,), np.float32)
    for g, (obj, count) in enumerate(spec.groups):
        o = g * GROUP_DIM
        f[o] = 1.0
        o += 1
        f[o + SHAPE_NAMES.index(obj.shape)] = 1.0
        o += len(SHAPE_NAMES)
        if obj.color is not None:
            f[o + COLOR_NAMES.index(obj.color)] = 1.0
        o += len(COLOR_NAMES)
        if obj.size is not None:
            f[o + SIZE_NAMES.index(obj.size)] = 1.0
        o += len(SIZE_NAMES)
        f[o + count - 1] = 1.0
    if spec.relation is not None:
        f[world.MAX_GROUPS * GROUP_DIM + RELATION_NAMES.index(spec.relation)] = 1.0
    f.setflags(write=False)
    return f


@functools.lru_cache(maxsize=8192)
def _text_features(text: str) -> np.ndarray:
    return _spec_features(world.parse_prompt(text))


def prompt_features(prompts: Sequence[str | world.PromptSpec]) -> np.ndarray:
    """Fixed one-hot features of prompts (texts of the shapes grammar or PromptSpecs): float32 [B, PROMPT_DIM].

    Raises world.PromptError (a ValueError) for a text outside the grammar."""
    if isinstance(prompts, (str, world.PromptSpec)):
        raise ValueError("prompt_features expects a sequence of prompts, got a single prompt")
    rows = [_text_features(p) if isinstance(p, str) else _spec_features(world.as_spec(p)) for p in prompts]
    if not rows:
        return np.zeros((0, PROMPT_DIM), np.float32)
    return np.stack(rows)


# ----------------------------------------------------------------------------------------- network


def _coordinates(size: int) -> np.ndarray:
    """[size, size, 2] pixel-centre coordinates (x right, y down), each in [-1, 1]."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1)


PATCH = 2  # the stem sees 2x2-pixel patches (space-to-depth): a quarter of the convolution cost at 32x32
PATCH_GRID = IMAGE_SIZE // PATCH
_COORDS_PATCHES = _coordinates(PATCH_GRID)
_COORDS_CELLS = _coordinates(IMAGE_SIZE // 4)


def space_to_depth(images):
    """[B, H, W, C] -> [B, H / PATCH, W / PATCH, PATCH * PATCH * C] (numpy or jax arrays)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // PATCH, w // PATCH, PATCH * PATCH * c)


NUM_QUERIES = world.MAX_GROUPS + 1


def _attention_summary(xp, attn, cells):
    """Per query: the attention mass (a soft count), its centroid (x, y in [-1, 1]) and the attended
    mean features; attn [B, Q, 8, 8], cells [B, 8, 8, C] -> ([B, Q], [B, 2Q], [B, QC]). `xp` is numpy
    or jax.numpy."""
    mass = attn.sum((2, 3))
    denom = (mass + 1e-3)[..., None]
    centroid = xp.einsum("bqhw,hwk->bqk", attn, _COORDS_CELLS) / denom
    features = xp.einsum("bqhw,bhwc->bqc", attn, cells) / denom
    b = attn.shape[0]
    return mass, centroid.reshape(b, -1), features.reshape(b, -1)


def _film(h, film):
    """Feature-wise modulation h * (1 + gamma) + beta, (gamma, beta) = the halves of film [B, 2C]."""
    c = h.shape[-1]
    expand = (slice(None),) + (None,) * (h.ndim - 2) + (slice(None),)
    return h * (1.0 + film[:, :c][expand]) + film[:, c:][expand]


class PreferenceNet(nn.Module):
    """(images [B, 32, 32, 3] in [-1, 1], prompt features [B, PROMPT_DIM]) -> scores [B]."""

    widths: tuple[int, int, int] = (32, 32, 48)
    embed_dim: int = 64
    hidden_dim: int = 64

    @nn.compact
    def __call__(self, images: jax.Array, prompts: jax.Array) -> jax.Array:
        w1, w2, w3 = self.widths
        b = images.shape[0]
        coords = jnp.broadcast_to(jnp.asarray(_COORDS_PATCHES), (b, PATCH_GRID, PATCH_GRID, 2))
        x = jnp.concatenate([space_to_depth(images), coords], axis=-1)  # 16x16x14
        e = nn.relu(nn.Dense(self.embed_dim, name="prompt")(prompts))
        h1 = nn.relu(nn.Conv(w1, (3, 3), name="stem")(x))  # 16x16
        h2 = _film(h1, nn.Dense(2 * w1, name="film16")(e))
        h2 = nn.relu(nn.Conv(w2, (3, 3), name="mid")(h2))
        h3 = nn.relu(nn.Conv(w3, (3, 3), strides=(2, 2), name="down2")(h2))  # 8x8
        h3 = _film(h3, nn.Dense(2 * w3, name="film8")(e))
        h4 = nn.relu(nn.Conv(w3, (3, 3), name="cell")(h3))
        # Attention pooling of the 8x8 cells, one query per prompt group (a shared projection of the
        # group's features) and one learned query for "any object".
        groups = prompts[:, :world.MAX_GROUPS * GROUP_DIM].reshape(b, world.MAX_GROUPS, GROUP_DIM)
        queries = jnp.concatenate([nn.Dense(w3, name="query")(groups),
                                   jnp.broadcast_to(self.param("query_any", nn.initializers.normal(1.0), (1, 1, w3)),
                                                    (b, 1, w3))], axis=1)
        bias = self.param("query_bias", nn.initializers.zeros, (NUM_QUERIES,))
        attn = jax.nn.sigmoid(jnp.einsum("bhwc,bqc->bqhw", h4, queries) / np.sqrt(w3) + bias[:, None, None])
        pooled = jnp.concatenate([h1.mean((1, 2)), h2.mean((1, 2)), h4.mean((1, 2)),
                                  *_attention_summary(jnp, attn, h4)], axis=-1)
        z = nn.Dense(self.hidden_dim, name="hidden")(pooled)
        z = nn.relu(_film(z, nn.Dense(2 * self.hidden_dim, name="film_head")(e)))
        return nn.Dense(1, name="out")(z)[:, 0]


MODEL = PreferenceNet()


def preference_scores(params, images: jax.Array, prompts: jax.Array) -> jax.Array:
    """The Flax forward: float images [B, 32, 32, 3] in [-1, 1] and prompt features [B, PROMPT_DIM] -> [B]."""
    return MODEL.apply({"params": params}, images, prompts)


def init_preference_params(rng: jax.Array):
    return MODEL.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
                      jnp.zeros((1, PROMPT_DIM), jnp.float32))["params"]


# --------------------------------------------------------------------------------- numpy forward


def numpy_params(params) -> dict:
    """The parameter tree as float32 numpy arrays (what `numpy_preference_forward` takes)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(flax.core.unfreeze(params)))


def numpy_preference_forward(np_params, images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """`preference_scores` in numpy (float32 [B]): the host reward's forward, no JAX involved."""
    p = np_params
    relu = lambda z: np.maximum(z, 0.0)  # noqa: E731
    dense = lambda z, name: z @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
    conv = lambda z, name, s=1: numpy_conv(z, p[name]["kernel"], p[name]["bias"], s)  # noqa: E731
    images = np.asarray(images, np.float32)
    prompts = np.asarray(prompts, np.float32)
    b = images.shape[0]
    x = np.concatenate([space_to_depth(images), np.broadcast_to(_COORDS_PATCHES, (b, PATCH_GRID, PATCH_GRID, 2))],
                       axis=-1)
    e = relu(dense(prompts, "prompt"))
    h1 = relu(conv(x, "stem"))
    h2 = _film(h1, dense(e, "film16"))
    h2 = relu(conv(h2, "mid"))
    h3 = relu(conv(h2, "down2", 2))
    h3 = _film(h3, dense(e, "film8"))
    h4 = relu(conv(h3, "cell"))
    w3 = h4.shape[-1]
    groups = prompts[:, :world.MAX_GROUPS * GROUP_DIM].reshape(b, world.MAX_GROUPS, GROUP_DIM)
    queries = np.concatenate([dense(groups, "query"), np.broadcast_to(p["query_any"], (b, 1, w3))], axis=1)
    logits = np.einsum("bhwc,bqc->bqhw", h4, queries) / np.float32(np.sqrt(w3)) + p["query_bias"][:, None, None]
    attn = 1.0 / (1.0 + np.exp(-logits))
    pooled = np.concatenate([h1.mean((1, 2)), h2.mean((1, 2)), h4.mean((1, 2)),
                             *_attention_summary(np, attn, h4)], axis=-1)
    z = relu(_film(dense(pooled, "hidden"), dense(e, "film_head")))
    return dense(z, "out")[:, 0].astype(np.float32)


# ------------------------------------------------------------------------------------ weights on disk


def save_preference_params(params, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_bytes(flax.serialization.to_bytes(jax.device_get(params)))


def load_preference_params(path: str | pathlib.Path = DEFAULT_WEIGHTS):
    """Restore the preference parameters (float32 numpy, for the host forward); one-line errors for a
    missing, corrupt or mismatched file."""
    template = jax.eval_shape(init_preference_params, jax.random.key(0))
    params = load_params_file(path, template, "preference", TRAIN_TOOL)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


# --------------------------------------------------------------------------------------- the reward


class PreferenceReward:
    """The learned preference score on the host: uint8 [B, 32, 32, 3] + prompts -> float32 [B].

    Numpy only, no mutable state after construction (safe to call from several threads at once).
    Scores are Bradley-Terry logits: compare them between images of the same prompt."""

    name = "preference"

    def __init__(self, params=None, weights_path: str | pathlib.Path | None = None):
        if params is not None and weights_path is not None:
            raise ValueError("give either params or weights_path, not both")
        params = params if params is not None else load_preference_params(weights_path or DEFAULT_WEIGHTS)
        self._np_params = numpy_params(params)

    @property
    def params(self) -> dict:
        return self._np_params

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        check_verifier_images(images, self.name)  # the same 32x32 uint8 world images
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"{self.name}: got {got} for {images.shape[0]} images; expected one prompt per image")
        feats = prompt_features(list(prompts))
        out = np.empty((images.shape[0],), np.float32)
        for i in range(0, images.shape[0], CHUNK):
            x = images[i:i + CHUNK].astype(np.float32) / 127.5 - 1.0
            out[i:i + CHUNK] = numpy_preference_forward(self._np_params, x, feats[i:i + CHUNK])
        return out
