"""The prompt sets of the shapes world: every category's grammar enumerated, and fixed train/test splits.

Categories follow GenEval:
  single_object  "a circle", "a small circle" (colour free)
  two_objects    "a circle and a square" (two different shapes)
  counting       "three triangles" (2..4 of one shape, colours free)
  colors         "a red circle"
  position       "a circle left of a square"
  color_attr     "a red circle and a blue square" (two shapes, two colours)

Splits are hash-based (sha256 of the canonical text, about 80/20), so a prompt's split never depends
on which other prompts exist, except that every category keeps at least one prompt on each side.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from typing import Sequence

from ng_jax.data.world import (CATEGORIES, COLORS, MAX_COUNT, RELATIONS, SHAPES, SIZES, ObjectSpec,
                               format_prompt, make_prompt_spec, parse_prompt)

SPLITS = ("train", "test")
TEST_FRACTION = 0.2


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {SPLITS}")


def _specs(category: str):
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    if category == "single_object":
        return [make_prompt_spec([(ObjectSpec(s, None, z), 1)]) for s in SHAPES for z in (None, *SIZES)]
    if category == "two_objects":
        return [make_prompt_spec([(ObjectSpec(a), 1), (ObjectSpec(b), 1)]) for a, b in shape_pairs]
    if category == "counting":
        return [make_prompt_spec([(ObjectSpec(s), n)]) for s in SHAPES for n in range(2, MAX_COUNT + 1)]
    if category == "colors":
        return [make_prompt_spec([(ObjectSpec(s, c), 1)]) for s in SHAPES for c in COLORS]
    if category == "position":
        return [make_prompt_spec([(ObjectSpec(a), 1), (ObjectSpec(b), 1)], r) for a, b in shape_pairs
                for r in RELATIONS]
    if category == "color_attr":
        return [make_prompt_spec([(ObjectSpec(a, ca), 1), (ObjectSpec(b, cb), 1)]) for a, b in shape_pairs
                for ca, cb in itertools.permutations(COLORS, 2)]
    raise AssertionError(category)


@functools.lru_cache(maxsize=None)
def _all_prompts(category: str) -> tuple[str, ...]:
    return tuple(sorted(format_prompt(spec) for spec in _specs(category)))


def all_prompts(category: str) -> list[str]:
    """Every canonical prompt of a category, sorted."""
    _check_category(category)
    return list(_all_prompts(category))


@functools.lru_cache(maxsize=None)
def _split(category: str) -> dict[str, tuple[str, ...]]:
    ranked = sorted(_all_prompts(category), key=stable_hash)
    threshold = TEST_FRACTION * 2.0 ** 64
    n_test = sum(stable_hash(p) < threshold for p in ranked)
    n_test = min(max(n_test, 1), len(ranked) - 1)  # both sides non-empty
    return {"test": tuple(sorted(ranked[:n_test])), "train": tuple(sorted(ranked[n_test:]))}


def split_prompts(category: str, split: str) -> list[str]:
    """The prompts of one category in one split ("train" or "test"), sorted; the splits are disjoint."""
    _check_category(category)
    _check_split(split)
    return list(_split(category)[split])


def _categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of names, got the string {categories!r}")
    for c in categories:
        _check_category(c)
    return tuple(categories)


def prompts_for(split: str, categories: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs of a split, category by category (all categories by default)."""
    return [(c, p) for c in _categories(categories) for p in split_prompts(c, split)]


def eval_prompts(per_category: int = 4, categories: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """A fixed, category-balanced subset of the test prompts: the `per_category` test prompts of each
    category with the smallest hash (all of them where a category has fewer)."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    out = []
    for c in _categories(categories):
        chosen = sorted(split_prompts(c, "test"), key=stable_hash)[:per_category]
        out.extend((c, p) for p in sorted(chosen))
    return out


def category_of(text: str) -> str:
    """The category of any prompt the grammar parses (raises PromptError otherwise)."""
    return parse_prompt(text).category
