"""The shapes world: grammar round trips, parse errors, scene sampling, rendering and the rule check."""
import dataclasses
import itertools
import math

import numpy as np
import pytest

from ng_jax.data import prompts as P
from ng_jax.data import world as W


def _sample_of(category, k, rng):
    prompts = P.all_prompts(category)
    return prompts if len(prompts) <= k else [prompts[i] for i in rng.choice(len(prompts), k, replace=False)]


# ------------------------------------------------------------------------------------------ grammar


@pytest.mark.parametrize("category", W.CATEGORIES)
def test_parse_format_round_trip_every_grammar_prompt(category):
    prompts = P.all_prompts(category)
    assert prompts == sorted(set(prompts)) and len(prompts) >= 12
    for text in prompts:
        spec = W.parse_prompt(text)
        assert spec.category == category == P.category_of(text)
        assert W.format_prompt(spec) == text
        assert W.parse_prompt(W.format_prompt(spec)) == spec


@pytest.mark.parametrize("text, expected", [
    ("A photo of a Red  circle.", ((W.ObjectSpec("circle", "red"), 1),)),
    ("an image of three TRIANGLES", ((W.ObjectSpec("triangle"), 3),)),
    ("2 small crosses", ((W.ObjectSpec("cross", None, "small"), 2),)),
    ("a red small square", ((W.ObjectSpec("square", "red", "small"), 1),)),
    ("one circle and four squares", ((W.ObjectSpec("circle"), 1), (W.ObjectSpec("square"), 4))),
    ("red circle and a blue circle", ((W.ObjectSpec("circle", "red"), 1), (W.ObjectSpec("circle", "blue"), 1))),
])
def test_parse_user_variations(text, expected):
    assert W.parse_prompt(text).groups == expected


@pytest.mark.parametrize("text, relation", [
    ("a circle to the left of a square", "left of"), ("a circle on the right of a square", "right of"),
    ("a circle on top of a square", "above"), ("a circle under a square.", "below"),
])
def test_parse_relation_synonyms(text, relation):
    spec = W.parse_prompt(text)
    assert spec.relation == relation and spec.category == "position"
    assert W.format_prompt(spec) == f"a circle {relation} a square"


@pytest.mark.parametrize("text, fragment", [
    ("a purpel circle", "word 2 'purpel'"),
    ("a red hexagon", "word 3 'hexagon'"),
    ("circles", "a count"),
    ("five circles", "word 1 'five'"),
    ("7 squares", "a count between 1 and 4"),
    ("a circles", "singular"),
    ("a circle left of", "end of the prompt"),
    ("a circle and a square and a cross", "at most two objects"),
    ("a circle beside a square", "word 3 'beside'"),
    ("two circles left of a square", "a relation needs exactly two groups of one object"),
    ("a circle and a circle", "two different colours"),
    ("a red red circle", "at most one colour"),
    ("", "empty prompt"),
])
def test_parse_errors_are_prompt_errors_with_a_useful_message(text, fragment):
    with pytest.raises(W.PromptError) as info:
        W.parse_prompt(text)
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_spec_validation():
    circle = W.ObjectSpec("circle")
    with pytest.raises(W.PromptError, match="does not match the prompt structure"):
        W.PromptSpec("counting", ((circle, 1),))
    with pytest.raises(W.PromptError, match="unknown colour 'pink'"):
        W.ObjectSpec("circle", "pink")
    with pytest.raises(W.PromptError, match="counts must be integers in 1..4"):
        W.make_prompt_spec([(circle, 5)])
    spec = W.make_prompt_spec([[circle, 2]])  # lists are accepted and stored as tuples
    assert spec == W.parse_prompt("two circles") and hash(spec) == hash(W.parse_prompt("two circles"))


# --------------------------------------------------------------------------------------- scenes


def _check_geometry(spec, scene):
    for obj in scene:
        lo = W.BORDER_PX + W._half_extent(obj.shape, W.SIZE_PX[obj.size]) - 1e-9
        assert lo <= obj.cx <= W.CANVAS - lo and lo <= obj.cy <= W.CANVAS - lo
    for a, b in itertools.combinations(scene, 2):
        gap = math.hypot(a.cx - b.cx, a.cy - b.cy) - W._bound_radius(a.shape, W.SIZE_PX[a.size]) \
            - W._bound_radius(b.shape, W.SIZE_PX[b.size])
        assert gap >= W.GAP_PX - 1e-9
    if spec.relation is not None:
        a, b = scene
        along = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
        assert along[spec.relation] >= W.RELATION_MIN_PX


@pytest.mark.parametrize("category", W.CATEGORIES)
def test_sampled_scenes_satisfy_their_prompts(category):
    rng = np.random.default_rng(1)
    for text in _sample_of(category, 24, rng):
        spec = W.parse_prompt(text)
        for seed in range(3):
            scene = W.sample_scene(spec, np.random.default_rng(seed))
            assert W.satisfies(spec, scene), (text, scene)
            assert all(W.constraint_scores(text, scene).values())
            assert len(scene) == sum(c for _, c in spec.groups)
            _check_geometry(spec, scene)


def test_crowded_prompts_place_or_fail_clearly():
    for text in ("four large triangles", "a large triangle left of a large square", "four circles and four squares"):
        scene = W.sample_scene(text, np.random.default_rng(0))
        assert W.satisfies(text, scene)
        _check_geometry(W.parse_prompt(text), scene)
    with pytest.raises(ValueError, match="could not place the objects"):
        W.sample_scene("four large circles and four large squares", np.random.default_rng(0), max_restarts=20)


def test_free_attributes_vary_and_fixed_ones_hold():
    colors = {W.sample_scene("a circle", np.random.default_rng(s))[0].color for s in range(40)}
    sizes = {W.sample_scene("a circle", np.random.default_rng(s))[0].size for s in range(40)}
    assert len(colors) >= 4 and sizes == set(W.SIZES)
    fixed = [W.sample_scene("a small red cross", np.random.default_rng(s))[0] for s in range(10)]
    assert {(o.color, o.size) for o in fixed} == {("red", "small")}


# ------------------------------------------------------------------------------------------ rendering


def test_render_is_deterministic_in_the_seed():
    a, scene_a = W.render_prompt("a red circle left of a blue square", seed=3)
    b, scene_b = W.render_prompt("a red circle left of a blue square", seed=3)
    c, scene_c = W.render_prompt("a red circle left of a blue square", seed=4)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert a.tobytes() == b.tobytes() and scene_a == scene_b
    assert scene_a != scene_c and a.tobytes() != c.tobytes()
    assert W.render(scene_a).tobytes() == a.tobytes()
    assert W.render(scene_a, size=64).shape == (64, 64, 3)


def test_render_is_antialiased_and_paints_the_right_colours():
    image, scene = W.render_prompt("a large yellow circle and a large purple triangle", seed=0)
    pixels = {tuple(p) for p in image.reshape(-1, 3)}
    pure = {W.BACKGROUND, W.COLORS["yellow"], W.COLORS["purple"]}
    assert pure <= pixels
    assert len(pixels - pure) >= 8  # blended edge pixels exist
    for obj in scene:  # the centre pixel has the object's colour, a far corner the background
        assert tuple(image[int(obj.cy), int(obj.cx)]) == W.COLORS[obj.color]
        assert W.nearest_color(image[int(obj.cy), int(obj.cx)]) == obj.color
    assert tuple(image[0, 0]) == W.BACKGROUND


def test_small_and_large_differ_in_painted_area():
    def area(text):
        image, _ = W.render_prompt(text, seed=0)
        return int(np.sum(np.any(image != W.BACKGROUND, axis=-1)))

    for shape in W.SHAPES:
        assert area(f"a large red {shape}") > 1.6 * area(f"a small red {shape}")


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="size must be an integer >= 8"):
        W.render([], size=4)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        W.render([W.PlacedObject("hexagon", "red", "small", 10.0, 10.0)])


# ------------------------------------------------------------------------------------------ rule check


def test_satisfies_rejects_perturbed_scenes():
    rng = np.random.default_rng(0)
    spec = W.parse_prompt("a red circle left of a blue square")
    scene = W.sample_scene(spec, rng)
    red, blue = scene
    assert W.satisfies(spec, scene)
    swapped = (dataclasses.replace(red, cx=blue.cx, cy=blue.cy), dataclasses.replace(blue, cx=red.cx, cy=red.cy))
    assert W.constraint_scores(spec, swapped) == {"g0_count": True, "g0_color": True, "g1_count": True,
                                                  "g1_color": True, "relation": False, "no_extra_objects": True}
    recoloured = (dataclasses.replace(red, color="green"), blue)
    assert not W.satisfies(spec, recoloured) and not W.constraint_scores(spec, recoloured)["g0_color"]
    reshaped = (red, dataclasses.replace(blue, shape="triangle"))
    assert not W.satisfies(spec, reshaped) and not W.constraint_scores(spec, reshaped)["g1_count"]

    counting = W.parse_prompt("three crosses")
    scene = W.sample_scene(counting, rng)
    assert W.satisfies(counting, scene)
    assert not W.satisfies(counting, scene[:2])
    assert not W.satisfies(counting, scene + (dataclasses.replace(scene[0], cx=2.0),))
    extra = scene + (W.PlacedObject("circle", "red", "small", 4.0, 4.0),)
    assert W.constraint_scores(counting, extra) == {"g0_count": True, "no_extra_objects": False}

    sized = W.parse_prompt("a small circle")
    small = W.sample_scene(sized, rng)
    assert W.satisfies(sized, small)
    assert not W.satisfies(sized, (dataclasses.replace(small[0], size="large"),))


def test_same_shape_groups_are_told_apart_by_colour():
    spec = W.parse_prompt("a red circle and a blue circle")
    ok = (W.PlacedObject("circle", "red", "small", 8.0, 8.0), W.PlacedObject("circle", "blue", "large", 20.0, 20.0))
    assert W.satisfies(spec, ok)
    both_red = (ok[0], dataclasses.replace(ok[1], color="red"))
    scores = W.constraint_scores(spec, both_red)
    assert scores["g0_count"] and not scores["g0_color"] and not scores["g1_color"]


def test_relation_judge_margin():
    spec = W.parse_prompt("a circle above a square")
    a = W.PlacedObject("circle", "red", "small", 10.0, 10.0)
    assert W.satisfies(spec, (a, W.PlacedObject("square", "red", "small", 25.0, 10.0 + W.RELATION_JUDGE_PX)))
    assert not W.satisfies(spec, (a, W.PlacedObject("square", "red", "small", 25.0, 10.0 + W.RELATION_JUDGE_PX / 2)))


# ------------------------------------------------------------------------------------------ prompt sets


def test_splits_are_disjoint_deterministic_and_cover_the_grammar():
    for category in W.CATEGORIES:
        train, test = P.split_prompts(category, "train"), P.split_prompts(category, "test")
        assert train and test and not set(train) & set(test)
        assert sorted(train + test) == P.all_prompts(category)
        assert len(test) <= 0.35 * len(train + test)
        assert P.split_prompts(category, "test") == test
    big = P.split_prompts("color_attr", "test")
    assert 0.12 < len(big) / len(P.all_prompts("color_attr")) < 0.28  # ~20% on the large category
    pairs = P.prompts_for("train", ["colors", "counting"])
    assert {c for c, _ in pairs} == {"colors", "counting"} and all(P.category_of(p) == c for c, p in pairs)
    with pytest.raises(ValueError, match="unknown prompt split 'val'"):
        P.split_prompts("colors", "val")
    with pytest.raises(ValueError, match="unknown prompt category 'shapes'"):
        P.all_prompts("shapes")


def test_eval_prompts_are_a_balanced_subset_of_test():
    chosen = P.eval_prompts(per_category=3)
    test = set(p for _, p in P.prompts_for("test"))
    assert {p for _, p in chosen} <= test
    for category in W.CATEGORIES:
        n = sum(c == category for c, _ in chosen)
        assert n == min(3, len(P.split_prompts(category, "test")))
    assert P.eval_prompts(per_category=3) == chosen
