"""A diffusers transformer directory: where it is, its config.json, and the model config it gives.

    cfg = model_config_from_diffusers(WEIGHTS_DIR)          # or WEIGHTS_DIR/transformer
    make_velocity_model(cfg)                                # ng_jax.models.velocity

One reader for both real families: `SD3Transformer2DModel` (families "sd3" / "sd35") and
`FluxTransformer2DModel` ("flux1_dev"), told apart by config.json's `_class_name`. The model config
holds config.json's architecture keys under diffusers' names (missing keys take diffusers'
`__init__` defaults) plus the run's keys (dtype, remat, scan_blocks, weights_dir, and per family
latent_size / sample_size, max_sequence_length, guidance); `overrides` win. The loaders
(`weights.sd3`, `weights.flux`) check a config against its checkpoint with `check_config` first.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from ng_jax.models.jsonfile import read_json
from ng_jax.models.weights.safetensors import WeightsError

SD3_CLASS, FLUX_CLASS = "SD3Transformer2DModel", "FluxTransformer2DModel"
# Architecture keys of config.json and their defaults (the classes' __init__ in diffusers 0.39).
SD3_ARCH = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
            "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "qk_norm": None,
            "dual_attention_layers": ()}
FLUX_ARCH = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
             "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
             "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
_FAMILY_CLASS = {"sd3": SD3_CLASS, "sd35": SD3_CLASS, "flux1_dev": FLUX_CLASS}


def transformer_dir(weights_dir: str) -> str:
    """WEIGHTS_DIR/transformer, or `weights_dir` itself when it already is a transformer directory."""
    sub = os.path.join(weights_dir, "transformer")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(weights_dir, "config.json")):
        return weights_dir
    raise WeightsError(f"{weights_dir}: no transformer/ directory (expected a diffusers SD3 / SD3.5 / FLUX.1 save)")


def read_config(tdir: str) -> dict:
    """config.json of a transformer directory, with `_class_name` set (a save without one is read as
    FLUX when it has FLUX-only keys, else as SD3)."""
    raw = read_json(tdir, error=WeightsError)
    name = raw.get("_class_name") or (FLUX_CLASS if {"num_single_layers", "axes_dims_rope"} & set(raw) else SD3_CLASS)
    if name not in (SD3_CLASS, FLUX_CLASS):
        raise WeightsError(f"{tdir}/config.json: _class_name is {name!r}, expected {SD3_CLASS!r} or {FLUX_CLASS!r}")
    return {**raw, "_class_name": name}


def model_config_from_diffusers(path: str, **overrides) -> ml_collections.ConfigDict:
    """A transformer config.json (path: WEIGHTS_DIR or WEIGHTS_DIR/transformer) -> the model config.

    The family follows the class: "flux1_dev" for FLUX; "sd35" for SD3 checkpoints with qk-norm or
    dual-attention layers, else "sd3". FLUX configs also get sample_size=128 latent pixels (1024 px),
    max_sequence_length=512 and guidance 3.5 for guidance_embeds models; SD3 configs latent_size=0
    (= sample_size). `overrides` (dtype, remat, scan_blocks, latent_size, ...) win; an override
    `family` of the other class is a WeightsError."""
    tdir = transformer_dir(path)
    raw = read_config(tdir)
    family = overrides.get("family")
    if family is not None and _FAMILY_CLASS.get(str(family), raw["_class_name"]) != raw["_class_name"]:
        raise WeightsError(f"{tdir}/config.json describes a {raw['_class_name']}; model.family={family!r} needs a "
                           f"{_FAMILY_CLASS[str(family)]}")
    if raw["_class_name"] == FLUX_CLASS:
        c: dict[str, Any] = {k: raw.get(k, v) for k, v in FLUX_ARCH.items()}
        c["axes_dims_rope"] = tuple(c["axes_dims_rope"])
        c.update(family="flux1_dev", sample_size=128, max_sequence_length=512,
                 guidance=3.5 if c["guidance_embeds"] else None)
    else:
        c = {k: raw.get(k, v) for k, v in SD3_ARCH.items()}
        c.update(dual_attention_layers=tuple(int(i) for i in (c["dual_attention_layers"] or ())),
                 qk_norm=c["qk_norm"] or "", pos_embed_max_size=c["pos_embed_max_size"] or 0,
                 out_channels=c["out_channels"] or c["in_channels"])
        c.update(family="sd35" if c["qk_norm"] or c["dual_attention_layers"] else "sd3", latent_size=0)
    c.update(dtype="float32", remat=False, scan_blocks=False,
             weights_dir=os.path.dirname(tdir) if os.path.basename(os.path.normpath(tdir)) == "transformer" else tdir)
    c.update(overrides)
    return ml_collections.ConfigDict(c)


def _same(value):
    """Comparable form of a config value: sequences as tuples, and "" / 0 / None / () / False alike."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    return value or None


def config_mismatches(cfg, raw: Mapping[str, Any]) -> list[str]:
    """Architecture keys where a model config and a config.json (as `read_config` gives it) disagree;
    keys either side leaves out take diffusers' defaults, out_channels defaults to in_channels."""
    defaults = FLUX_ARCH if raw.get("_class_name") == FLUX_CLASS else SD3_ARCH
    out = []
    for k, default in defaults.items():
        ours, theirs = cfg.get(k, default), raw.get(k, default)
        if k == "out_channels":
            ours = ours or cfg.get("in_channels", defaults["in_channels"])
            theirs = theirs or raw.get("in_channels", defaults["in_channels"])
        if _same(ours) != _same(theirs):
            out.append(f"{k}: model config {_same(ours)!r}, checkpoint {_same(theirs)!r}")
    return out


def check_config(cfg, tdir: str) -> dict:
    """tdir's config.json, after checking that `cfg` describes the same architecture (else WeightsError)."""
    raw = read_config(tdir)
    bad = config_mismatches(cfg, raw)
    if bad:
        raise WeightsError(f"{tdir}/config.json disagrees with the model config: {'; '.join(bad)}")
    return raw
