"""The shapes world: a compositional prompt grammar, a scene sampler, a renderer and the rule check.

Pure numpy + Pillow (no jax). Images are 32x32 RGB pictures of coloured shapes on a dark background,
described by GenEval-like prompts ("a red circle left of a blue square", "three triangles").

Coordinates of `PlacedObject`s are in pixels of the CANVAS x CANVAS (32x32) canvas, x to the right and
y downwards, whatever size `render` is asked for. `satisfies` is the single definition of what a correct
image is; verifiers call it on their detections.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ng_jax.errors import UserError

CANVAS = 32
BACKGROUND = (24, 24, 24)
# The training renders' mean value per RGB channel in [-1, 1] (6 x 1000 renders, category-balanced as the
# pretraining data; recomputed by tests/unit/test_space.py): the origin of the "centred" sample space.
DATA_MEAN = (-0.706, -0.708, -0.719)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
SIZE_PX = {"small": 8.0, "large": 12.0}  # nominal diameter on the 32-px canvas
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
MAX_COUNT = 4
MAX_GROUPS = 2

BORDER_PX = 1.0  # free pixels between an object's extent and the canvas border
GAP_PX = 1.0  # free pixels between two objects' bounding circles
RELATION_MIN_PX = 6.0  # sampled scenes: centre difference along the relation axis
RELATION_JUDGE_PX = 2.0  # `satisfies`: centre difference along the relation axis
SUPERSAMPLE = 8

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
_COUNT_WORDS = {**_NUMBER_WORDS, "a": 1, "an": 1, **{str(n): n for n in range(1, MAX_COUNT + 1)}}
_RELATION_PHRASES = {  # tokenised phrase -> canonical relation; longest phrases are tried first
    ("left", "of"): "left of", ("to", "the", "left", "of"): "left of", ("on", "the", "left", "of"): "left of",
    ("right", "of"): "right of", ("to", "the", "right", "of"): "right of",
    ("on", "the", "right", "of"): "right of",
    ("above",): "above", ("over",): "above", ("on", "top", "of"): "above",
    ("below",): "below", ("under",): "below", ("beneath",): "below", ("underneath",): "below",
}
_PREFIX = re.compile(r"^(?:(?:a|an)\s+)?(?:photo|image|picture|drawing|rendering|render)\s+of\s+")


class PromptError(UserError, ValueError):
    """A prompt (text or spec) outside the shapes grammar."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a prompt describes it; None means the prompt leaves it free."""

    shape: str
    color: str | None = None
    size: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise PromptError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise PromptError(f"unknown colour {self.color!r}; expected None or one of {tuple(COLORS)}")
        if self.size is not None and self.size not in SIZES:
            raise PromptError(f"unknown size {self.size!r}; expected None or one of {SIZES}")


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: (object, count) groups and an optional relation of group 0 to group 1."""

    category: str
    groups: tuple[tuple[ObjectSpec, int], ...]
    relation: str | None = None

    def __post_init__(self):
        groups = tuple((obj, count) for obj, count in self.groups)
        object.__setattr__(self, "groups", groups)
        _check_groups(groups, self.relation)
        expected = infer_category(groups, self.relation)
        if self.category != expected:
            raise PromptError(f"category {self.category!r} does not match the prompt structure; expected {expected!r}")


@dataclass(frozen=True)
class PlacedObject:
    """One object in a scene: centre (cx, cy) in 32-px canvas pixels, x right, y down."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float


def _check_groups(groups, relation) -> None:
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise PromptError(f"a prompt has 1 to {MAX_GROUPS} object groups, got {len(groups)}")
    for obj, count in groups:
        if not isinstance(obj, ObjectSpec):
            raise PromptError(f"groups must hold (ObjectSpec, count) pairs, got {type(obj).__name__}")
        if not isinstance(count, (int, np.integer)) or not 1 <= count <= MAX_COUNT:
            raise PromptError(f"object counts must be integers in 1..{MAX_COUNT}, got {count!r}")
    if len(groups) == 2 and groups[0][0].shape == groups[1][0].shape:
        a, b = groups[0][0], groups[1][0]
        if a.color is None or b.color is None or a.color == b.color:
            raise PromptError(
                f"two groups of {_PLURALS[a.shape]} must name two different colours "
                f"(e.g. 'a red {a.shape} and a blue {a.shape}'); write one group with a count instead")
    if relation is not None:
        if relation not in RELATIONS:
            raise PromptError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        if len(groups) != 2 or any(count != 1 for _, count in groups):
            raise PromptError("a relation needs exactly two groups of one object each")


def infer_category(groups: Sequence[tuple[ObjectSpec, int]], relation: str | None = None) -> str:
    """The GenEval-like category of a prompt structure (see CATEGORIES)."""
    if relation is not None:
        return "position"
    if len(groups) == 1:
        obj, count = groups[0]
        if count > 1:
            return "counting"
        return "colors" if obj.color is not None else "single_object"
    return "color_attr" if any(obj.color is not None for obj, _ in groups) else "two_objects"


def make_prompt_spec(groups: Sequence[tuple[ObjectSpec, int]], relation: str | None = None) -> PromptSpec:
    """A PromptSpec whose category is inferred from its structure."""
    groups = tuple((obj, count) for obj, count in groups)
    _check_groups(groups, relation)
    return PromptSpec(infer_category(groups, relation), groups, relation)


# ---------------------------------------------------------------------------------------------- text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _format_object(obj: ObjectSpec, count: int) -> str:
    words = [w for w in (obj.size, obj.color) if w is not None]
    if count == 1:
        words.append(obj.shape)
        return f"{_article(words[0])} {' '.join(words)}"
    words.append(_PLURALS[obj.shape])
    return f"{[k for k, v in _NUMBER_WORDS.items() if v == count][0]} {' '.join(words)}"


def format_prompt(spec: PromptSpec) -> str:
    """The canonical text of a spec: "a small red circle left of a square", "three crosses"."""
    parts = [_format_object(obj, count) for obj, count in spec.groups]
    joiner = f" {spec.relation} " if spec.relation is not None else " and "
    return joiner.join(parts)


_SINGULAR = {plural: shape for shape, plural in _PLURALS.items()}


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the shapes grammar (case-insensitive, tolerant of spacing, a trailing period,
    a "a photo of" prefix, plurals, number words one..four and digits). Raises PromptError."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().replace(",", " ").split()).rstrip(".").strip()
    norm = _PREFIX.sub("", norm)
    tokens = norm.split()
    if not tokens:
        raise PromptError(f"empty prompt {text!r}")

    def fail(i: int, expected: str):
        where = f"word {i + 1} {tokens[i]!r}" if i < len(tokens) else "the end of the prompt"
        raise PromptError(f"cannot parse prompt {text!r}: at {where}: expected {expected}")

    def parse_object(i: int) -> tuple[ObjectSpec, int, int]:
        count = count_word = None
        if i < len(tokens) and tokens[i] in _COUNT_WORDS:
            count_word, count = tokens[i], _COUNT_WORDS[tokens[i]]
            i += 1
        elif i < len(tokens) and tokens[i].isdigit():
            fail(i, f"a count between 1 and {MAX_COUNT}")
        color = size = None
        while i < len(tokens) and (tokens[i] in COLORS or tokens[i] in SIZES):
            if tokens[i] in COLORS:
                if color is not None:
                    fail(i, "at most one colour per object")
                color = tokens[i]
            else:
                if size is not None:
                    fail(i, "at most one size per object")
                size = tokens[i]
            i += 1
        if i >= len(tokens) or (tokens[i] not in SHAPES and tokens[i] not in _SINGULAR):
            fail(i, f"a shape ({', '.join(SHAPES)}), a colour ({', '.join(COLORS)}) or a size "
                    f"({', '.join(SIZES)})")
        plural = tokens[i] in _SINGULAR
        shape = _SINGULAR.get(tokens[i], tokens[i])
        if count is None:
            if plural:
                fail(i, f"a count (two..four) before the plural {tokens[i]!r}")
            count = 1
        elif plural and count_word in ("a", "an"):
            fail(i, f"the singular {shape!r} after 'a'/'an'")
        return ObjectSpec(shape, color, size), count, i + 1

    groups = []
    relation = None
    i = 0
    while True:
        obj, count, i = parse_object(i)
        groups.append((obj, count))
        if i == len(tokens):
            break
        if relation is not None or len(groups) == MAX_GROUPS:
            fail(i, "the end of the prompt (at most two objects, related by 'and' or one relation)")
        if tokens[i] == "and":
            i += 1
            continue
        for phrase in sorted(_RELATION_PHRASES, key=len, reverse=True):
            if tuple(tokens[i:i + len(phrase)]) == phrase:
                relation = _RELATION_PHRASES[phrase]
                i += len(phrase)
                break
        else:
            fail(i, f"'and' or a relation ({', '.join(RELATIONS)})")
    try:
        return make_prompt_spec(groups, relation)
    except PromptError as err:
        raise PromptError(f"cannot use prompt {text!r}: {err}") from None


def as_spec(text_or_spec: str | PromptSpec) -> PromptSpec:
    """A PromptSpec from either a prompt text or a spec."""
    if isinstance(text_or_spec, PromptSpec):
        return text_or_spec
    return parse_prompt(text_or_spec)


# --------------------------------------------------------------------------------------------- scenes


def _half_extent(shape: str, diameter: float) -> float:
    """Largest axis-aligned distance from the centre to the shape's outline."""
    return {"circle": 0.5, "square": 0.4, "triangle": 0.45, "cross": 0.45}[shape] * diameter


def _bound_radius(shape: str, diameter: float) -> float:
    """Radius of a circle around the centre that contains the shape."""
    return {"circle": 0.5, "square": 0.566, "triangle": 0.595, "cross": 0.475}[shape] * diameter


def _relation_holds(relation: str, a: PlacedObject, b: PlacedObject, margin: float, dominant: bool) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # "a left of b" means dx > 0
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= margin and (not dominant or along >= abs(across))


def sample_scene(spec: PromptSpec | str, rng: np.random.Generator, max_restarts: int = 400) -> tuple[PlacedObject, ...]:
    """A scene that satisfies `spec`: free colours and sizes drawn at random, objects placed without
    overlap by rejection sampling, the relation (if any) with a clear margin along its axis.
    Raises ValueError when the objects cannot be placed (too many large ones)."""
    spec = as_spec(spec)
    wanted = [obj for obj, count in spec.groups for _ in range(count)]
    colors, sizes = list(COLORS), list(SIZES)
    grid = math.ceil(math.sqrt(len(wanted)))
    for restart in range(max_restarts):
        force_small = restart >= min(32, max_restarts // 2)  # crowded free-size scenes: fall back to small
        on_grid = restart % 2 == 1 and grid > 1  # every other attempt: jittered grid cells, for crowded scenes
        cells = rng.permutation(grid * grid)
        placed: list[PlacedObject] = []
        for j, obj in enumerate(wanted):
            color = obj.color if obj.color is not None else colors[rng.integers(len(colors))]
            size = obj.size if obj.size is not None else ("small" if force_small else sizes[rng.integers(len(sizes))])
            d = SIZE_PX[size]
            lo, hi = _half_extent(obj.shape, d) + BORDER_PX, CANVAS - _half_extent(obj.shape, d) - BORDER_PX
            for _ in range(60):
                if on_grid:
                    cell = np.array(divmod(int(cells[j]), grid), dtype=np.float64)
                    cx, cy = np.clip(lo + (hi - lo) * cell / (grid - 1) + rng.uniform(-2.0, 2.0, size=2), lo, hi)
                else:
                    cx, cy = rng.uniform(lo, hi, size=2)
                cand = PlacedObject(obj.shape, color, size, float(cx), float(cy))
                if all(math.hypot(p.cx - cx, p.cy - cy) >= _bound_radius(p.shape, SIZE_PX[p.size])
                       + _bound_radius(obj.shape, d) + GAP_PX for p in placed):
                    if spec.relation is None or not placed or _relation_holds(
                            spec.relation, placed[0], cand, RELATION_MIN_PX, dominant=True):
                        placed.append(cand)
                        break
            else:
                break
        if len(placed) == len(wanted):
            return tuple(placed)
    raise ValueError(f"could not place the objects of {format_prompt(spec)!r} without overlap on a "
                     f"{CANVAS}x{CANVAS} canvas after {max_restarts} attempts; use fewer or smaller objects")


# ------------------------------------------------------------------------------------------- rendering


def _outline(shape: str, cx: float, cy: float, d: float) -> list[list[tuple[float, float]]]:
    """Polygons (in canvas pixels) whose union is the shape; a circle is its bounding box."""
    if shape == "circle":
        return [[(cx - d / 2, cy - d / 2), (cx + d / 2, cy + d / 2)]]
    if shape == "square":
        h = 0.4 * d
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":  # pointing up, bounding box centred on (cx, cy)
        w, h = 0.45 * d, 0.39 * d
        return [[(cx, cy - h), (cx + w, cy + h), (cx - w, cy + h)]]
    if shape == "cross":  # a plus sign
        a, t = 0.45 * d, 0.15 * d
        return [[(cx - a, cy - t), (cx + a, cy - t), (cx + a, cy + t), (cx - a, cy + t)],
                [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy + a), (cx - t, cy + a)]]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Sequence[PlacedObject], size: int = CANVAS) -> np.ndarray:
    """Render a scene to uint8 [size, size, 3], anti-aliased (drawn at SUPERSAMPLE x resolution and
    box-filtered down); the same scene always gives the same bytes."""
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"render size must be an integer >= 8, got {size!r}")
    big = size * SUPERSAMPLE
    scale = big / CANVAS
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        if obj.color not in COLORS or obj.size not in SIZES:
            raise ValueError(f"cannot render {obj}: colour must be one of {tuple(COLORS)}, size one of {SIZES}")
        fill = COLORS[obj.color]
        for poly in _outline(obj.shape, obj.cx, obj.cy, SIZE_PX[obj.size]):
            pts = [(x * scale, y * scale) for x, y in poly]
            if obj.shape == "circle":
                draw.ellipse(pts, fill=fill)
            else:
                draw.polygon(pts, fill=fill)
    return np.asarray(image.resize((size, size), Image.BOX), dtype=np.uint8)


def render_prompt(text_or_spec: str | PromptSpec, seed: int, size: int = CANVAS
                  ) -> tuple[np.ndarray, tuple[PlacedObject, ...]]:
    """Sample a scene for a prompt with `np.random.default_rng(seed)` and render it."""
    scene = sample_scene(as_spec(text_or_spec), np.random.default_rng(seed))
    return render(scene, size), scene


def nearest_color(rgb: Sequence[float]) -> str:
    """The name of the palette colour closest (Euclidean RGB) to `rgb`."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.shape != (3,):
        raise ValueError(f"nearest_color expects one RGB triple, got shape {rgb.shape}")
    names = list(COLORS)
    dists = [float(np.sum((rgb - np.asarray(COLORS[n])) ** 2)) for n in names]
    return names[int(np.argmin(dists))]


# ---------------------------------------------------------------------------------------- rule check


def _matches(obj: ObjectSpec, placed: PlacedObject, with_color: bool = True, with_size: bool = True) -> bool:
    return (placed.shape == obj.shape
            and (not with_color or obj.color is None or placed.color == obj.color)
            and (not with_size or obj.size is None or placed.size == obj.size))


def constraint_scores(spec: PromptSpec | str, objects: Sequence[PlacedObject]) -> dict[str, bool]:
    """Every atomic constraint of the prompt, judged on (detected) objects:

    - ``g{i}_count``: the number of objects of group i's shape equals the count the prompt asks for
      that shape (summed over groups of the same shape);
    - ``g{i}_color`` (when the group names a colour): exactly `count` objects of that shape and colour;
    - ``g{i}_size`` (when the group names a size): exactly `count` objects matching all of the group;
    - ``relation`` (position prompts): the one object of group 0 and the one of group 1 have centres at
      least RELATION_JUDGE_PX apart in the stated direction;
    - ``no_extra_objects``: nothing beyond what the prompt asks for (no unmentioned shapes).
    """
    spec = as_spec(spec)
    scores: dict[str, bool] = {}
    for i, (obj, count) in enumerate(spec.groups):
        asked = sum(c for o, c in spec.groups if o.shape == obj.shape)
        scores[f"g{i}_count"] = sum(p.shape == obj.shape for p in objects) == asked
        if obj.color is not None:
            scores[f"g{i}_color"] = sum(_matches(obj, p, with_size=False) for p in objects) == count
        if obj.size is not None:
            scores[f"g{i}_size"] = sum(_matches(obj, p) for p in objects) == count
    if spec.relation is not None:
        found = [[p for p in objects if _matches(obj, p)] for obj, _ in spec.groups]
        scores["relation"] = (len(found[0]) == 1 and len(found[1]) == 1
                              and _relation_holds(spec.relation, found[0][0], found[1][0],
                                                  RELATION_JUDGE_PX, dominant=False))
    scores["no_extra_objects"] = len(objects) == sum(count for _, count in spec.groups)
    return scores


def satisfies(spec: PromptSpec | str, objects: Sequence[PlacedObject]) -> bool:
    """True when the objects satisfy every constraint of the prompt (GenEval-style, strict)."""
    return all(constraint_scores(spec, objects).values())
