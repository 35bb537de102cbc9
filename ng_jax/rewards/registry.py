"""Rewards by name: the `rewards.weights` names a config may use, and the weighted total they make.

    build_rewards(config.rewards) -> WeightedRewards   # name -> weight, timeout, retries

Built in: the shapes world's `verifier` and `preference` (a Bradley-Terry model of synthetic human
preferences that, like PickScore / HPSv2, also favours vivid, high-contrast colour), `colourfulness`
(Hasler-Suesstrunk, for composites such as `{"verifier": 1, "colourfulness": 0.01}`), JPEG
(in)compressibility, the CLIP-family reward models from local weights (`clip_score`, `pickscore`,
`hpsv2`) and a `remote` reward server. More names
can be added with `register_reward(name, factory)`; `registered(name, factory)` does it for a
`with` block only (tests), restoring the registry afterwards.
"""

from __future__ import annotations

import contextlib

from ng_jax.config.checks import ConfigError
from ng_jax.rewards.clip import ClipScore, HPSv2, PickScore
from ng_jax.rewards.colour import Colourfulness
from ng_jax.rewards.host import WeightedRewards
from ng_jax.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from ng_jax.rewards.preference import PreferenceReward
from ng_jax.rewards.remote import RemoteReward
from ng_jax.rewards.verifier import VerifierReward

CLIP_REWARDS = {"clip_score": ClipScore, "pickscore": PickScore, "hpsv2": HPSv2}  # from local CLIP weights


def _clip(name: str):
    def make(cfg):
        if cfg is None or not cfg.get(f"{name}_dir"):
            raise ValueError(f"reward {name!r} needs rewards.{name}_dir (a local CLIPModel directory)")
        kw = dict(backend=cfg.get("clip_backend", "auto"), device=cfg.get("clip_device", "cpu"))
        if name == "pickscore" and cfg.get("pickscore_tokenizer_dir"):
            kw["tokenizer_dir"] = cfg.pickscore_tokenizer_dir
        return CLIP_REWARDS[name](cfg[f"{name}_dir"], **kw)
    return make


def _remote(cfg):
    if cfg is None or not cfg.get("remote_url"):
        raise ValueError("reward 'remote' needs rewards.remote_url")
    try:
        return RemoteReward(cfg.remote_url, name="remote", timeout_s=float(cfg.get("timeout_s") or 60),
                            protocol=str(cfg.get("remote_protocol", "ng_jax")),
                            allow_pickle=bool(cfg.get("remote_allow_pickle", False)),
                            score_key=str(cfg.get("remote_score_key", "") or ""),
                            options=dict(cfg.get("remote_options") or {}))
    except ValueError as err:
        raise ConfigError(f"reward 'remote': {err}") from None


# name -> factory(rewards_cfg) -> Reward (a callable `(uint8 images [B, H, W, 3], prompts) -> float32 [B]`)
BUILT_IN = {
    "verifier": lambda cfg: VerifierReward(),
    "preference": lambda cfg: PreferenceReward(),
    "colourfulness": lambda cfg: Colourfulness(),
    "jpeg_compressibility": lambda cfg: JpegCompressibility(),
    "jpeg_incompressibility": lambda cfg: JpegIncompressibility(),
    "remote": _remote,
    **{name: _clip(name) for name in CLIP_REWARDS},
}
REWARD_NAMES = tuple(BUILT_IN)
EXTRA_REWARDS: dict = {}


def register_reward(name: str, factory) -> None:
    """Make `rewards.weights.<name>` usable: `factory(rewards_cfg)` returns the Reward. Built-in names
    cannot be replaced."""
    if name in BUILT_IN:
        raise ValueError(f"reward {name!r} is built in; register another name")
    if not callable(factory):
        raise ValueError(f"the factory of reward {name!r} must be callable, got {type(factory).__name__}")
    EXTRA_REWARDS[name] = factory


@contextlib.contextmanager
def registered(name: str, factory):
    """`register_reward` for the duration of a `with` block; the registry is restored afterwards."""
    before = dict(EXTRA_REWARDS)
    register_reward(name, factory)
    try:
        yield
    finally:
        EXTRA_REWARDS.clear()
        EXTRA_REWARDS.update(before)


def make_reward(name: str, cfg=None):
    """One reward model by name (REWARD_NAMES and the registered ones)."""
    factory = EXTRA_REWARDS.get(name) or BUILT_IN.get(name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; expected one of {REWARD_NAMES + tuple(EXTRA_REWARDS)}")
    return factory(cfg)


def build_rewards(rewards_cfg) -> WeightedRewards:
    """WeightedRewards from `rewards.weights` (name -> weight), `timeout_s`, `retries`, and `placement`
    (name -> "host" | "device": the CLIP-family rewards can run jitted on the devices in the rollout)."""
    weights = {str(k): float(v) for k, v in rewards_cfg.weights.items()}
    if not weights:
        raise ValueError("rewards.weights is empty: configure at least one reward")
    rewards = {name: make_reward(name, rewards_cfg) for name in weights}
    weighted = WeightedRewards(rewards, weights, timeout_s=rewards_cfg.get("timeout_s") or None,
                               retries=int(rewards_cfg.get("retries", 0)))
    for name, place in (rewards_cfg.get("placement") or {}).items():
        if place not in ("host", "device"):
            raise ConfigError(f"rewards.placement.{name}={place!r}: expected 'host' or 'device'")
        if name not in weights:
            raise ConfigError(f"rewards.placement.{name}: no such reward in rewards.weights {sorted(weights)}")
        if place == "device":
            try:
                weighted.place_on_device(name)
            except ValueError as err:
                raise ConfigError(f"rewards.placement.{name}='device': {err}") from None
    return weighted
