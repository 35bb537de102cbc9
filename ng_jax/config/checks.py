"""Value checks on a loaded config, so a bad setting fails in one line before anything compiles.

Each rule is (dotted key, predicate, what is expected). Keys absent from a config are skipped:
a pretraining config has no `normguard` block.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ng_jax.errors import UserError

# `eval.norms`: which evaluations measure the norm ratio (ng_jax.eval.evaluate.RunEvaluation)
NORMS_MODES = ("always", "final", "never")
_NORMS_EXPECTED = " or ".join(f'"{m}"' for m in NORMS_MODES)


def norms_problem(key: str, value) -> str | None:
    """One line saying what is wrong with an `eval.norms` setting (in the block or a variant), or None."""
    return None if value in NORMS_MODES else f"{key}={value!r}: expected {_NORMS_EXPECTED}"


class ConfigError(UserError, ValueError):
    """A setting that cannot work (reported in one line by the entry point)."""


_positive_int = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
_nonneg = (lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")
_positive = (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0")
_prob = (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a number in [0, 1]")

RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", *(lambda v: isinstance(v, int), "an integer")),
    ("data.batch_size", *_positive_int),
    ("train.steps", *_positive_int),
    ("train.cfg_dropout", *_prob),
    ("train.ema_decay", *_prob),
    ("optim.lr", *_positive),
    ("optim.grad_clip", *_nonneg),
    ("sample.num_steps", *_positive_int),
    ("sample.cfg_scale", *_nonneg),
    ("sample.shift", *_positive),
    ("rl.method", lambda v: v in ("nft", "awm", "dpo"), "one of nft, awm, dpo"),
    ("rl.group_size", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    ("rl.prompts_per_epoch", *_positive_int),
    ("rl.epochs", *_positive_int),
    ("rl.micro_batch", *_positive_int),
    ("rl.rollout.num_steps", *_positive_int),
    ("normguard.lam", *_nonneg),
    ("normguard.margin", *_nonneg),
    ("normguard.power", lambda v: v in (1, 2), "1 or 2"),
    ("normguard.relative", lambda v: isinstance(v, bool), "true or false"),
    ("lora.rank", *_nonneg),
    ("render", lambda v: v in ("clip", "soft", "headroom"), "\"clip\", \"soft\" or \"headroom\""),
    ("space", lambda v: v in ("pixel", "centred"), "\"pixel\" or \"centred\""),
    ("eval.norms", lambda v: v in NORMS_MODES, _NORMS_EXPECTED),
]


def get_dotted(config, dotted: str):
    """`config` at the dotted key ("loss.beta"), or MISSING when there is no such key."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return MISSING
        node = node[part]
    return node


MISSING = object()


def _cross_field_problems(config) -> list[str]:
    """Settings that are each valid but cannot work together."""
    out = []
    for block in ("eval", "sample"):
        rescale, scale = get_dotted(config, f"{block}.cfg_rescale"), get_dotted(config, f"{block}.cfg_scale")
        if rescale is not MISSING and scale is not MISSING and rescale and float(scale) == 1.0:
            out.append(f"{block}.cfg_rescale={rescale} acts only on a guided velocity, but {block}.cfg_scale=1 "
                       f"(CFG-free); set {block}.cfg_scale (e.g. 4.5) or {block}.cfg_rescale=0")
    variants = get_dotted(config, "eval.variants")
    for name, overrides in ({} if variants is MISSING else variants).items():
        if "norms" in overrides and (problem := norms_problem(f"eval.variants.{name}.norms", overrides["norms"])):
            out.append(problem)
    return out


def check_config(config) -> None:
    """Raise ValueError naming the first bad setting."""
    for key, ok, expected in RULES:
        value = get_dotted(config, key)
        if value is MISSING:
            continue
        if not ok(value):
            raise ValueError(f"{key}={value!r}: expected {expected}")
    mesh = get_dotted(config, "mesh.shape")
    if mesh is not MISSING and len(tuple(mesh)) != 3:
        raise ValueError(f"mesh.shape={tuple(mesh)!r}: expected 3 entries (data, fsdp, tensor)")
    for problem in _cross_field_problems(config):
        raise ValueError(problem)
    _check_real_model(config)
    _check_clip_reward_dirs(config)


def _check_real_model(config) -> None:
    """A real-model config (model.family sd3 / sd35 / flux1_dev) needs an existing model.weights_dir."""
    family = get_dotted(config, "model.family")
    if family is MISSING or family == "toy_mmdit":
        return
    path = get_dotted(config, "model.weights_dir")
    problem = weights_dir_problem(family, "" if path is MISSING else path)
    if problem:
        raise ValueError(problem)


def weights_dir_problem(family: str, path) -> str | None:
    """One line saying what is wrong with `model.weights_dir` (empty, not a directory), or None."""
    hint = f"python -m ng_jax.tools.check_weights --family {family} --weights_dir DIR"
    if not path:
        return (f"model.weights_dir is required for model.family={family!r}: pass --config.model.weights_dir=DIR, "
                f"a local diffusers save (validate it with: {hint})")
    if not os.path.isdir(str(path)):
        return f"model.weights_dir={str(path)!r} is not a directory (validate one with: {hint})"
    return None


def _check_clip_reward_dirs(config) -> None:
    """CLIP-based rewards (ng_jax.rewards.clip) read local weights: rewards.<name>_dir must be a directory."""
    weights = get_dotted(config, "rewards.weights")
    if weights is MISSING:
        return
    for name in ("clip_score", "pickscore", "hpsv2"):
        if name not in weights:
            continue
        path = get_dotted(config, f"rewards.{name}_dir")
        if path is MISSING or not path:
            raise ValueError(f"rewards.{name}_dir is required for the {name!r} reward: pass "
                             f"--config.rewards.{name}_dir=DIR, a local transformers CLIPModel directory")
        if not os.path.isdir(str(path)):
            raise ValueError(f"rewards.{name}_dir={str(path)!r} is not a directory")
