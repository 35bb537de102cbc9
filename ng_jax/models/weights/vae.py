"""diffusers `AutoencoderKL` weights (WEIGHTS_DIR/vae) -> the Flax VAE of ng_jax.models.nets.vae, strictly.

    vae, params = load_vae(WEIGHTS_DIR)                      # config from WEIGHTS_DIR/vae/config.json
    vae, params = load_vae(WEIGHTS_DIR, dtype="bfloat16")    # frozen bf16 VAE computing in bf16

The key map is written out from the config (the structure diffusers builds), not derived from the
Flax tree, so a naming slip on either side shows up as an unmapped parameter or an unused tensor.
Attention projections are Linear `[out, in]` in diffusers-format checkpoints; `[out, in, 1, 1]`
(1x1-conv layout of LDM checkpoints) is accepted too, as are the pre-0.14 names
`query`/`key`/`value`/`proj_attn` that diffusers still renames on load.
"""

from __future__ import annotations

import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.models.jsonfile import read_json
from ng_jax.models.nets.vae import VAE, VAEConfig, make_vae
from ng_jax.models.weights.safetensors import (Path, SafetensorsDir, Source, WeightsError, check_map, conv2d,
                                               flatten_map, load_params, norm)

ENCODER_BLOCK = "DownEncoderBlock2D"
DECODER_BLOCK = "UpDecoderBlock2D"
_LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def vae_config_from_diffusers(vae_dir: str) -> VAEConfig:
    """VAEConfig from a diffusers `AutoencoderKL` config.json; raises WeightsError on a layout we do not port."""
    path = os.path.join(vae_dir, "config.json")
    raw = read_json(vae_dir, error=WeightsError, hint=" (expected a diffusers AutoencoderKL directory)")
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise WeightsError(f"{path}: _class_name {cls!r}, expected 'AutoencoderKL'")
    blocks = tuple(raw.get("block_out_channels", (64,)))
    down = tuple(raw.get("down_block_types", (ENCODER_BLOCK,)))
    up = tuple(raw.get("up_block_types", (DECODER_BLOCK,)))
    problems = []
    if set(down) != {ENCODER_BLOCK} or len(down) != len(blocks):
        problems.append(f"down_block_types {down} (want {len(blocks)} x {ENCODER_BLOCK})")
    if set(up) != {DECODER_BLOCK} or len(up) != len(blocks):
        problems.append(f"up_block_types {up} (want {len(blocks)} x {DECODER_BLOCK})")
    if raw.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn {raw['act_fn']!r} (only silu)")
    if problems:
        raise WeightsError(f"{path}: unsupported AutoencoderKL layout: " + "; ".join(problems))
    try:
        return VAEConfig(
            in_channels=int(raw.get("in_channels", 3)), out_channels=int(raw.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in blocks), layers_per_block=int(raw.get("layers_per_block", 1)),
            latent_channels=int(raw.get("latent_channels", 4)), norm_num_groups=int(raw.get("norm_num_groups", 32)),
            scaling_factor=float(raw.get("scaling_factor", 0.18215)),
            shift_factor=float(raw.get("shift_factor") or 0.0),
            use_quant_conv=bool(raw.get("use_quant_conv", True)),
            use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(raw.get("mid_block_add_attention", True)))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def _attn_linear(key_prefix: str) -> dict[str, Source]:
    """Linear `[out, in]` (or a 1x1 conv `[out, in, 1, 1]`) -> Dense kernel `[in, out]`."""
    return {"kernel": Source(f"{key_prefix}.weight", lambda w: w.reshape(w.shape[0], -1).T,
                             lambda s: (int(np.prod(s[1:])), s[0])),
            "bias": Source(f"{key_prefix}.bias")}


def _resnet(prefix: str, cin: int, cout: int) -> dict:
    out = {"norm1": norm(f"{prefix}.norm1"), "conv1": conv2d(f"{prefix}.conv1"),
           "norm2": norm(f"{prefix}.norm2"), "conv2": conv2d(f"{prefix}.conv2")}
    if cin != cout:
        out["conv_shortcut"] = conv2d(f"{prefix}.conv_shortcut")
    return out


def _mid_block(prefix: str, ch: int, cfg: VAEConfig, legacy: bool) -> dict:
    out = {"resnets_0": _resnet(f"{prefix}.resnets.0", ch, ch), "resnets_1": _resnet(f"{prefix}.resnets.1", ch, ch)}
    if cfg.mid_block_add_attention:
        a = f"{prefix}.attentions.0"
        name = (lambda n: _LEGACY_ATTN[n]) if legacy else (lambda n: n)  # noqa: E731
        out["attentions_0"] = {"group_norm": norm(f"{a}.group_norm"),
                               **{flax: _attn_linear(f"{a}.{name(torch)}") for flax, torch in
                                  (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out_0", "to_out.0"))}}
    return out


def _legacy_attention(stored_keys: Iterable[str] | None) -> bool:
    return stored_keys is not None and "encoder.mid_block.attentions.0.query.weight" in set(stored_keys)


def vae_keymap(params_abstract, cfg: VAEConfig, stored_keys: Iterable[str] | None = None) -> dict[Path, Source]:
    """{flax path: Source} for every parameter of `make_vae(cfg)`. `stored_keys` (the checkpoint's tensor
    names) only selects the legacy attention names when the checkpoint uses them. If `params_abstract` is
    given, raises WeightsError when its paths and the config's structure disagree (wrong config for the tree)."""
    legacy = _legacy_attention(stored_keys)
    blocks = cfg.block_out_channels
    enc: dict = {"conv_in": conv2d("encoder.conv_in")}
    cin = blocks[0]
    for i, ch in enumerate(blocks):
        blk = {f"resnets_{j}": _resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else ch, ch)
               for j in range(cfg.layers_per_block)}
        if i != len(blocks) - 1:
            blk["downsamplers_0"] = {"conv": conv2d(f"encoder.down_blocks.{i}.downsamplers.0.conv")}
        enc[f"down_blocks_{i}"] = blk
        cin = ch
    enc["mid_block"] = _mid_block("encoder.mid_block", blocks[-1], cfg, legacy)
    enc["conv_norm_out"] = norm("encoder.conv_norm_out")
    enc["conv_out"] = conv2d("encoder.conv_out")

    chans = tuple(reversed(blocks))
    dec: dict = {"conv_in": conv2d("decoder.conv_in"),
                 "mid_block": _mid_block("decoder.mid_block", chans[0], cfg, legacy)}
    cin = chans[0]
    for i, ch in enumerate(chans):
        blk = {f"resnets_{j}": _resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else ch, ch)
               for j in range(cfg.layers_per_block + 1)}
        if i != len(chans) - 1:
            blk["upsamplers_0"] = {"conv": conv2d(f"decoder.up_blocks.{i}.upsamplers.0.conv")}
        dec[f"up_blocks_{i}"] = blk
        cin = ch
    dec["conv_norm_out"] = norm("decoder.conv_norm_out")
    dec["conv_out"] = conv2d("decoder.conv_out")

    nested: dict = {"encoder": enc, "decoder": dec}
    if cfg.use_quant_conv:
        nested["quant_conv"] = conv2d("quant_conv")
    if cfg.use_post_quant_conv:
        nested["post_quant_conv"] = conv2d("post_quant_conv")
    keymap = flatten_map(nested)

    if params_abstract is not None:
        have = {tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
            params_abstract)[0]}
        missing, extra = sorted("/".join(p) for p in have - keymap.keys()), sorted(
            "/".join(p) for p in keymap.keys() - have)
        if missing or extra:
            raise WeightsError(f"the VAE parameter tree does not match its config: parameters the config does not "
                               f"build {missing[:20]}, config entries absent from the tree {extra[:20]}")
    return keymap


def load_vae(weights_dir: str, cfg: VAEConfig | None = None, dtype=None, shardings=None,
             remat: bool = False) -> tuple[VAE, dict]:
    """(VAE, params) from WEIGHTS_DIR/vae. dtype (e.g. "bfloat16") casts the parameters and sets the
    compute dtype; None keeps float32. shardings: a tree like the parameters (or None)."""
    vae_dir = os.path.join(weights_dir, "vae")
    reader = SafetensorsDir(vae_dir)
    cfg = cfg or vae_config_from_diffusers(vae_dir)
    compute = jnp.dtype(dtype) if dtype is not None else jnp.float32
    vae = make_vae(cfg, dtype=compute, remat=remat)
    abstract = jax.eval_shape(vae.init, jax.random.PRNGKey(0))
    keymap = vae_keymap(abstract, cfg, reader.keys())
    params = load_params(keymap, abstract, reader, dtype=dtype and jnp.dtype(dtype), shardings=shardings)
    return vae, params


def check_vae_dir(weights_dir: str, cfg: VAEConfig | None = None) -> None:
    """Raise WeightsError naming every mismatch of WEIGHTS_DIR/vae without reading any tensor."""
    vae_dir = os.path.join(weights_dir, "vae")
    reader = SafetensorsDir(vae_dir)
    cfg = cfg or vae_config_from_diffusers(vae_dir)
    abstract = jax.eval_shape(make_vae(cfg).init, jax.random.PRNGKey(0))
    check_map(vae_keymap(abstract, cfg, reader.keys()), abstract, reader)
