"""Reward proxy one: a GenEval-style prompt-alignment verifier for the shapes world.

A small Linen CNN detector (trained by ``python -m ng_jax.tools.train_verifier``) looks at a
32x32 image through an 8x8 grid of 4-pixel cells. Every cell predicts whether an object's centre
lies in it (objectness), the object's shape, colour and size, and the centre's offset inside the
cell. Objects in the world never overlap (centres are >= ~8.6 px apart), so one object per cell
suffices. Detections are decoded to ``world.PlacedObject``s and judged with
``world.constraint_scores`` / ``world.satisfies``, the world's single definition of correctness,
as GenEval judges detector outputs with rules.

- ``VerifierReward``: the host-side reward (graded score = fraction of the prompt's atomic
  constraints met, 1.0 iff fully correct), ``judge`` (GenEval's binary criterion), ``detect``.
- ``verifier_logits(params, images)``: the pure jax network forward on float images in [-1, 1].
- ``soft_alignment(params, images, targets)``: a differentiable relaxation of the graded score
  for fixed prompts (probabilities instead of hard decisions), for back-propagating the reward
  through a sampler.
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

IMAGE_SIZE = world.CANVAS
GRID = 8
CELL_PX = IMAGE_SIZE / GRID
SHAPE_NAMES = tuple(world.SHAPES)
COLOR_NAMES = tuple(world.COLORS)
SIZE_NAMES = tuple(world.SIZES)
NUM_SHAPES, NUM_COLORS, NUM_SIZES = len(SHAPE_NAMES), len(COLOR_NAMES), len(SIZE_NAMES)
# Channel layout of the per-cell prediction.
OBJ = slice(0, 1)
SHAPE = slice(1, 1 + NUM_SHAPES)
COLOR = slice(SHAPE.stop, SHAPE.stop + NUM_COLORS)
SIZE = slice(COLOR.stop, COLOR.stop + NUM_SIZES)
OFFSET = slice(SIZE.stop, SIZE.stop + 2)
NUM_OUTPUTS = OFFSET.stop

ASSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "verifier.msgpack"
OBJECTNESS_THRESHOLD = 0.5
NMS_RADIUS_PX = 5.0  # world scenes keep centres >= ~8.6 px apart
CHUNK = 64  # images per host forward call
MAX_CONSTRAINTS = 2 * 3 + 1  # per group: count, colour, size; plus no_extra_objects
SOFT_RELATION_TEMPERATURE_PX = 1.0


class VerifierNet(nn.Module):
    """Per-cell detector: [B, 32, 32, 3] in [-1, 1] -> [B, 8, 8, NUM_OUTPUTS] raw outputs."""

    width: int = 16

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        w = self.width
        h = nn.relu(nn.Conv(w, (3, 3), name="stem")(images))  # 32x32
        h = nn.relu(nn.Conv(2 * w, (3, 3), strides=(2, 2), name="down1")(h))  # 16x16
        h = nn.relu(nn.Conv(2 * w, (3, 3), name="mid1")(h))
        h = nn.relu(nn.Conv(4 * w, (3, 3), strides=(2, 2), name="down2")(h))  # 8x8
        h = nn.relu(nn.Conv(4 * w, (3, 3), name="cell1")(h))
        h = nn.relu(nn.Conv(4 * w, (3, 3), name="cell2")(h))
        return nn.Conv(NUM_OUTPUTS, (1, 1), name="head")(h)


MODEL = VerifierNet()


def verifier_logits(params, images: jax.Array) -> jax.Array:
    """The pure network forward: float images [B, 32, 32, 3] in [-1, 1] -> [B, 8, 8, NUM_OUTPUTS]
    (objectness logit, shape/colour/size logits, centre-offset logits; see the channel slices)."""
    return MODEL.apply({"params": params}, images)


def init_verifier_params(rng: jax.Array):
    return MODEL.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))["params"]


@flax.struct.dataclass
class CellPredictions:
    """Per-cell probabilities and centres decoded from the raw outputs (all [B, 8, 8, ...])."""

    objectness: jax.Array  # [B, G, G]
    shape: jax.Array  # [B, G, G, S]
    color: jax.Array  # [B, G, G, C]
    size: jax.Array  # [B, G, G, Z]
    center: jax.Array  # [B, G, G, 2] (cx, cy) in canvas pixels


def cell_predictions(logits: jax.Array) -> CellPredictions:
    offsets = jax.nn.sigmoid(logits[..., OFFSET])
    cols = jnp.arange(GRID, dtype=jnp.float32)
    base = jnp.stack(jnp.meshgrid(cols, cols, indexing="xy"), axis=-1)  # [G, G, 2]: (x=col, y=row)
    return CellPredictions(
        objectness=jax.nn.sigmoid(logits[..., 0]),
        shape=jax.nn.softmax(logits[..., SHAPE]),
        color=jax.nn.softmax(logits[..., COLOR]),
        size=jax.nn.softmax(logits[..., SIZE]),
        center=(base + offsets) * CELL_PX,
    )


def images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def check_verifier_images(images: np.ndarray, who: str) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{who}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{who}: images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{who}: images must have shape [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {images.shape}")


# ------------------------------------------------------------------------------------ weights on disk


def save_verifier_params(params, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_bytes(flax.serialization.to_bytes(jax.device_get(params)))


def load_verifier_params(path: str | pathlib.Path = DEFAULT_WEIGHTS):
    template = jax.eval_shape(init_verifier_params, jax.random.key(0))
    return load_params_file(path, template, "verifier", "ng_jax.tools.train_verifier")


# ----------------------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=None)
def make_cell_forward():
    """The jitted detector forward: float images [CHUNK, 32, 32, 3] -> per-cell objectness, argmax
    shape / colour / size indices and centres (compiled once per process and shared)."""

    @jax.jit
    def forward(params, images):
        p = cell_predictions(verifier_logits(params, images))
        return (p.objectness, jnp.argmax(p.shape, -1), jnp.argmax(p.color, -1), jnp.argmax(p.size, -1), p.center)

    return forward


def numpy_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """NHWC convolution with flax/XLA "SAME" padding (extra padding at the end), in numpy."""
    k = kernel.shape[0]
    h = x.shape[1]
    out = -(-h // stride)
    total = max((out - 1) * stride + k - h, 0)
    lo = total // 2
    xp = np.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    # win: [B, Ho, Wo, C, kh, kw]; kernel: [kh, kw, C, O]
    return np.einsum("bhwcij,ijco->bhwo", win, kernel, optimize=True) + bias


_NP_LAYERS = (("stem", 1), ("down1", 2), ("mid1", 1), ("down2", 2), ("cell1", 1), ("cell2", 1))


def numpy_cell_forward(params, images: np.ndarray):
    """`make_cell_forward`'s computation in numpy: what the host-side reward runs.

    Host rewards are called from inside a running device computation (a `pure_callback` in the
    rollout's jit); calling JAX there can deadlock the CPU backend when it has several devices
    (each device's callback would wait for the same busy devices). So the detector's forward on
    the host is plain numpy (about as fast for this 6-layer CNN)."""
    np_params = {name: {k: np.asarray(v, np.float32) for k, v in layer.items()} for name, layer in params.items()}
    h = np.asarray(images, np.float32)
    for name, stride in _NP_LAYERS:
        h = np.maximum(numpy_conv(h, np_params[name]["kernel"], np_params[name]["bias"], stride), 0.0)
    logits = numpy_conv(h, np_params["head"]["kernel"], np_params["head"]["bias"], 1)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    cols = np.arange(GRID, dtype=np.float32)
    base = np.stack(np.meshgrid(cols, cols, indexing="xy"), axis=-1)
    center = (base + sigmoid(logits[..., OFFSET])) * CELL_PX
    return (sigmoid(logits[..., 0]), np.argmax(logits[..., SHAPE], -1), np.argmax(logits[..., COLOR], -1),
            np.argmax(logits[..., SIZE], -1), center)


def decode_cells(objectness, shape_idx, color_idx, size_idx, center,
                 threshold: float = OBJECTNESS_THRESHOLD) -> list[world.PlacedObject]:
    """Objects of one image from per-cell outputs ([G, G] and [G, G, 2] numpy arrays): cells above the
    threshold, strongest first, dropping any whose centre is within NMS_RADIUS_PX of a kept one."""
    rows, cols = np.nonzero(objectness > threshold)
    order = np.argsort(-objectness[rows, cols], kind="stable")
    kept: list[world.PlacedObject] = []
    for r, c in zip(rows[order], cols[order]):
        cx, cy = float(center[r, c, 0]), float(center[r, c, 1])
        if all((k.cx - cx) ** 2 + (k.cy - cy) ** 2 >= NMS_RADIUS_PX ** 2 for k in kept):
            kept.append(world.PlacedObject(SHAPE_NAMES[shape_idx[r, c]], COLOR_NAMES[color_idx[r, c]],
                                           SIZE_NAMES[size_idx[r, c]], cx, cy))
    return kept


def graded_alignment(spec: world.PromptSpec, objects: Sequence[world.PlacedObject]) -> float:
    """Fraction of the prompt's atomic constraints (world.constraint_scores) that the objects meet;
    1.0 exactly when world.satisfies holds."""
    scores = world.constraint_scores(spec, objects)
    return float(np.mean([float(v) for v in scores.values()]))


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> world.PromptSpec:
    return world.parse_prompt(text)


class VerifierReward:
    """GenEval-style alignment reward on the host: uint8 [B, 32, 32, 3] + prompts -> float32 [B] in [0, 1]."""

    name = "verifier"

    def __init__(self, params=None, weights_path: str | pathlib.Path | None = None,
                 threshold: float = OBJECTNESS_THRESHOLD):
        if params is not None and weights_path is not None:
            raise ValueError("give either params or weights_path, not both")
        self.params = params if params is not None else load_verifier_params(weights_path or DEFAULT_WEIGHTS)
        self.threshold = threshold
        self._np_params = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(self.params))

    def detect(self, images: np.ndarray) -> list[list[world.PlacedObject]]:
        """Detected objects of every image."""
        check_verifier_images(images, "VerifierReward.detect")
        x = images_to_float(images)
        n = x.shape[0]
        outs = [numpy_cell_forward(self._np_params, x[i:i + CHUNK]) for i in range(0, n, CHUNK)]
        obj, sh, co, si, ce = (np.concatenate(parts) for parts in zip(*outs))
        return [decode_cells(obj[i], sh[i], co[i], si[i], ce[i], self.threshold) for i in range(n)]

    def _specs(self, images: np.ndarray, prompts: Sequence[str]) -> list[world.PromptSpec]:
        if isinstance(prompts, str) or len(prompts) != len(images):
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"{self.name}: got {got} for {len(images)} images; expected one prompt per image")
        return [_parse_cached(p) if isinstance(p, str) else world.as_spec(p) for p in prompts]

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        check_verifier_images(images, self.name)
        specs = self._specs(images, prompts)
        detections = self.detect(images)
        return np.asarray([graded_alignment(s, d) for s, d in zip(specs, detections)], np.float32)

    def judge(self, images: np.ndarray, prompts: Sequence[str],
              detections: Sequence[list[world.PlacedObject]] | None = None) -> np.ndarray:
        """GenEval's binary criterion: bool [B], True where the image fully satisfies its prompt.
        `detections` (`detect(images)`, when the caller needs them too) skips a second detector pass."""
        check_verifier_images(images, f"{self.name}.judge")
        specs = self._specs(images, prompts)
        detections = self.detect(images) if detections is None else detections
        return np.asarray([world.satisfies(s, d) for s, d in zip(specs, detections)], bool)


# ----------------------------------------------------------------------------- differentiable score


@flax.struct.dataclass
class PromptTargets:
    """Fixed prompts as arrays for ``soft_alignment``; build with ``encode_prompts``.

    Count constraints (k < MAX_CONSTRAINTS) mirror world.constraint_scores: "exactly target[b, k]
    objects whose shape, colour and size lie in the masks". The relation compares the expected
    centres of group 0's and group 1's matches along ``relation_axis`` (a unit (x, y) vector).
    """

    shape_mask: jax.Array  # [B, K, S]
    color_mask: jax.Array  # [B, K, C]
    size_mask: jax.Array  # [B, K, Z]
    target: jax.Array  # [B, K] int32
    valid: jax.Array  # [B, K] float32
    relation_masks: tuple  # (shape [B, 2, S], colour [B, 2, C], size [B, 2, Z])
    relation_axis: jax.Array  # [B, 2]
    has_relation: jax.Array  # [B] float32


_RELATION_AXES = {"left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0), "below": (0.0, -1.0)}


def _object_masks(obj: world.ObjectSpec | None, with_color: bool, with_size: bool):
    shape = np.ones(NUM_SHAPES, np.float32) if obj is None else np.eye(NUM_SHAPES, dtype=np.float32)[SHAPE_NAMES.index(obj.shape)]
    color = np.ones(NUM_COLORS, np.float32)
    size = np.ones(NUM_SIZES, np.float32)
    if obj is not None and with_color and obj.color is not None:
        color = np.eye(NUM_COLORS, dtype=np.float32)[COLOR_NAMES.index(obj.color)]
    if obj is not None and with_size and obj.size is not None:
        size = np.eye(NUM_SIZES, dtype=np.float32)[SIZE_NAMES.index(obj.size)]
    return shape, color, size


def encode_prompts(prompts: Sequence[str | world.PromptSpec]) -> PromptTargets:
    """Encode prompts (texts or specs) as the count/relation constraints of world.constraint_scores."""
    if isinstance(prompts, (str, world.PromptSpec)) or len(prompts) == 0:
        raise ValueError("encode_prompts expects a non-empty sequence of prompts (texts or PromptSpecs)")
    b = len(prompts)
    sm = np.zeros((b, MAX_CONSTRAINTS, NUM_SHAPES), np.float32)
    cm = np.zeros((b, MAX_CONSTRAINTS, NUM_COLORS), np.float32)
    zm = np.zeros((b, MAX_CONSTRAINTS, NUM_SIZES), np.float32)
    target = np.zeros((b, MAX_CONSTRAINTS), np.int32)
    valid = np.zeros((b, MAX_CONSTRAINTS), np.float32)
    rel = [np.ones((b, 2, n), np.float32) for n in (NUM_SHAPES, NUM_COLORS, NUM_SIZES)]
    axis = np.zeros((b, 2), np.float32)
    has_rel = np.zeros((b,), np.float32)
    for i, prompt in enumerate(prompts):
        spec = world.as_spec(prompt)
        rows = []
        for obj, count in spec.groups:
            asked = sum(c for o, c in spec.groups if o.shape == obj.shape)
            rows.append((_object_masks(obj, False, False), asked))
            if obj.color is not None:
                rows.append((_object_masks(obj, True, False), count))
            if obj.size is not None:
                rows.append((_object_masks(obj, True, True), count))
        rows.append((_object_masks(None, False, False), sum(c for _, c in spec.groups)))
        for k, ((s, c, z), t) in enumerate(rows):
            sm[i, k], cm[i, k], zm[i, k], target[i, k], valid[i, k] = s, c, z, t, 1.0
        if spec.relation is not None:
            for g, (obj, _) in enumerate(spec.groups):
                rel[0][i, g], rel[1][i, g], rel[2][i, g] = _object_masks(obj, True, True)
            axis[i] = _RELATION_AXES[spec.relation]
            has_rel[i] = 1.0
    return PromptTargets(jnp.asarray(sm), jnp.asarray(cm), jnp.asarray(zm), jnp.asarray(target),
                         jnp.asarray(valid), tuple(jnp.asarray(r) for r in rel), jnp.asarray(axis),
                         jnp.asarray(has_rel))


def count_distribution(p: jax.Array, max_count: int = world.MAX_COUNT + 2) -> jax.Array:
    """Distribution of the number of successes of independent Bernoullis (Poisson-binomial).

    p: [..., N] probabilities -> [..., max_count + 1] with P(count = k) for k < max_count and
    P(count >= max_count) in the last bin.
    """
    init = jnp.zeros(p.shape[:-1] + (max_count + 1,), p.dtype).at[..., 0].set(1.0)

    def step(dist, pc):
        pc = pc[..., None]
        shifted = jnp.concatenate([jnp.zeros_like(dist[..., :1]), dist[..., :-1]], axis=-1)
        new = dist * (1.0 - pc) + shifted * pc
        new = new.at[..., -1].add(dist[..., -1] * pc[..., 0])  # the top bin absorbs
        return new, None

    dist, _ = jax.lax.scan(step, init, jnp.moveaxis(p, -1, 0))
    return dist


def _match_probability(pred: CellPredictions, shape_mask, color_mask, size_mask) -> jax.Array:
    """P(cell holds an object matching the masks): [B, K, G*G] for masks [B, K, *]."""
    flat = lambda x: x.reshape(x.shape[0], GRID * GRID, -1)  # noqa: E731
    ps = jnp.einsum("bcs,bks->bkc", flat(pred.shape), shape_mask)
    pc = jnp.einsum("bcs,bks->bkc", flat(pred.color), color_mask)
    pz = jnp.einsum("bcs,bks->bkc", flat(pred.size), size_mask)
    return pred.objectness.reshape(-1, 1, GRID * GRID) * ps * pc * pz


def soft_alignment(params, images: jax.Array, targets: PromptTargets | Sequence[str]) -> jax.Array:
    """Differentiable graded alignment in [0, 1]: float [B].

    images: float [B, 32, 32, 3] in [-1, 1]; targets: a PromptTargets (``encode_prompts``) or a
    sequence of B prompts (encoded here, so only under a trace that closes over them). Each count
    constraint scores P(exactly target matches) under independent per-cell match probabilities
    (objectness x class probabilities); the relation scores P(one match of each group) times a
    sigmoid of the expected-centre difference along the relation axis beyond world.RELATION_JUDGE_PX.
    The result is the mean over the prompt's constraints, like the hard graded score.
    """
    if not isinstance(targets, PromptTargets):
        targets = encode_prompts(targets)
    pred = cell_predictions(verifier_logits(params, images))
    match = _match_probability(pred, targets.shape_mask, targets.color_mask, targets.size_mask)
    dist = count_distribution(match)  # [B, K, M+1]
    count_ok = jnp.take_along_axis(dist, targets.target[..., None], axis=-1)[..., 0]  # [B, K]
    total = jnp.sum(count_ok * targets.valid, axis=-1)
    n = jnp.sum(targets.valid, axis=-1)

    rel_match = _match_probability(pred, *targets.relation_masks)  # [B, 2, G*G]
    rel_one = count_distribution(rel_match)[..., 1].prod(axis=-1)  # [B]
    centers = pred.center.reshape(-1, 1, GRID * GRID, 2)
    mean_center = jnp.sum(rel_match[..., None] * centers, axis=2) / (jnp.sum(rel_match, axis=2)[..., None] + 1e-6)
    along = jnp.sum((mean_center[:, 1] - mean_center[:, 0]) * targets.relation_axis, axis=-1)
    rel_ok = rel_one * jax.nn.sigmoid((along - world.RELATION_JUDGE_PX) / SOFT_RELATION_TEMPERATURE_PX)
    total = total + targets.has_relation * rel_ok
    return total / (n + targets.has_relation)
