"""diffusers `SD3Transformer2DModel` checkpoints -> the Flax MMDiT (families "sd3" / "sd35").

    cfg = transformer.model_config_from_diffusers(WEIGHTS_DIR)    # config.json -> model config
    params = load_sd3_transformer(WEIGHTS_DIR, cfg)                # strict, sharded-aware

The key map is written out from the architecture (not a generic renaming), so `check_map`
catches any disagreement between the model, the map and the checkpoint. Layout rules
(torch -> Flax): Linear `weight [out, in]` -> Dense `kernel [in, out]`; Conv2d
`[out, in, kh, kw]` -> `[kh, kw, in, out]`; `to_out.0` -> `to_out_0`, `ff.net.0.proj` ->
`ff/net_0/proj`, `transformer_blocks.{i}` -> `transformer_blocks_{i}`.

Scanned runs (`scan_blocks`: `transformer_blocks_{a}_to_{b}/block/...`, leading layer axis) are
`weights.stacked` runs: they read the per-layer tensors `a..b` stacked, after a strict check of the
per-layer keys (so an error names the real checkpoint tensor).

The persistent buffer `pos_embed.pos_embed` (the sin-cos table, saved when pos_embed_max_size is
set) is not a parameter: it is checked against the table the Flax model computes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from ng_jax.models.nets.mmdit import sincos_pos_table
from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights import stacked
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError, conv2d, flatten_map, linear
from ng_jax.models.weights.transformer import check_config, transformer_dir

POS_EMBED_BUFFER = "pos_embed.pos_embed"
_RUN = re.compile(r"^transformer_blocks_(\d+)_to_(\d+)$")
_ONE = re.compile(r"^transformer_blocks_(\d+)$")


# ----------------------------------------------------------------------------------------------
# The key map


def _attn_map(prefix: str, joint: bool, pre_only: bool, qk_norm: bool) -> dict:
    m = {n: linear(f"{prefix}.{n}") for n in ("to_q", "to_k", "to_v")}
    m["to_out_0"] = linear(f"{prefix}.to_out.0")
    norms = ["norm_q", "norm_k"]
    if joint:
        m.update({n: linear(f"{prefix}.{n}") for n in ("add_q_proj", "add_k_proj", "add_v_proj")})
        if not pre_only:
            m["to_add_out"] = linear(f"{prefix}.to_add_out")
        norms += ["norm_added_q", "norm_added_k"]
    if qk_norm:
        m.update({n: {"weight": Source(f"{prefix}.{n}.weight")} for n in norms})
    return m


def _ff_map(prefix: str) -> dict:
    return {"net_0": {"proj": linear(f"{prefix}.net.0.proj")}, "net_2": linear(f"{prefix}.net.2")}


def block_map(prefix: str, dual: bool, pre_only: bool, qk_norm: bool) -> dict:
    """The nested map of one `JointTransformerBlock` whose torch keys start with `prefix`."""
    m = {"norm1": {"linear": linear(f"{prefix}.norm1.linear")},
         "norm1_context": {"linear": linear(f"{prefix}.norm1_context.linear")},
         "attn": _attn_map(f"{prefix}.attn", True, pre_only, qk_norm),
         "ff": _ff_map(f"{prefix}.ff")}
    if dual:
        m["attn2"] = _attn_map(f"{prefix}.attn2", False, False, qk_norm)
    if not pre_only:
        m["ff_context"] = _ff_map(f"{prefix}.ff_context")
    return m


def _flags(cfg) -> tuple[int, set, bool]:
    layers = int(cfg.num_layers)
    return layers, {int(i) for i in (cfg.get("dual_attention_layers") or ())}, bool(cfg.get("qk_norm"))


def runs(tree) -> list[stacked.Run]:
    """The scanned runs `transformer_blocks_{a}_to_{b}/block` of an MMDiT parameter tree."""
    return [stacked.Run(n, "transformer_blocks", int(m.group(1)), int(m.group(2)), ("block",))
            for n in tree if (m := _RUN.match(n)) is not None]


def sd3_keymap(params_abstract, cfg) -> dict[tuple[str, ...], Source]:
    """{flax path: Source} for every parameter of an sd3/sd35 MMDiT tree (unrolled or scanned)."""
    return stacked.stacked_keymap(lambda tree: _per_layer_keymap(tree, cfg), params_abstract, runs(params_abstract))


def _per_layer_keymap(params_abstract, cfg) -> dict[tuple[str, ...], Source]:
    layers, dual, qk = _flags(cfg)
    nested: dict[str, Any] = {
        "pos_embed": {"proj": conv2d("pos_embed.proj")},
        "time_text_embed": {e: {n: linear(f"time_text_embed.{e}.{n}") for n in ("linear_1", "linear_2")}
                            for e in ("timestep_embedder", "text_embedder")},
        "context_embedder": linear("context_embedder"),
        "norm_out": {"linear": linear("norm_out.linear")},
        "proj_out": linear("proj_out"),
    }
    out = flatten_map(nested)
    for name in params_abstract:
        if (m := _ONE.match(name)) is not None:
            i = int(m.group(1))
            out.update(flatten_map(block_map(f"transformer_blocks.{i}", i in dual, i == layers - 1, qk), (name,)))
    return out


# ----------------------------------------------------------------------------------------------
# Loading


# Tolerance of the stored position table (values in [-1, 1]) by stored dtype: about one rounding step.
_TABLE_ATOL = {"F32": 1e-5, "F64": 1e-5, "F16": 1e-3, "BF16": 4e-3}


def check_pos_embed(reader: SafetensorsDir, cfg) -> None:
    """The checkpoint's `pos_embed.pos_embed` buffer (if saved) equals the table the model computes
    (up to the rounding of its stored dtype)."""
    if POS_EMBED_BUFFER not in reader.key_file:
        return
    atol = _TABLE_ATOL.get(reader.dtype(POS_EMBED_BUFFER), 1e-2)
    mx = int(cfg.get("pos_embed_max_size") or 0)
    hidden = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    if not mx:
        raise WeightsError(f"{reader.directory}: checkpoint has {POS_EMBED_BUFFER} but pos_embed_max_size is unset")
    if reader.shape(POS_EMBED_BUFFER) != (1, mx * mx, hidden):
        raise WeightsError(f"{reader.directory}: {POS_EMBED_BUFFER} has shape {reader.shape(POS_EMBED_BUFFER)}, the "
                           f"model's table {(1, mx * mx, hidden)} (pos_embed_max_size={mx}, hidden={hidden})")
    # Every row and column index appears among these grid cells (a diagonal band, plus the corners),
    # so any error in base size, order or orientation shows, at a cost of O(mx) table rows.
    rows = np.concatenate([np.arange(mx), np.arange(mx), [0, mx - 1]])
    cols = np.concatenate([np.arange(mx), (np.arange(mx) * 7 + 3) % mx, [mx - 1, 0]])
    ours = np.stack([sincos_pos_table(hidden, mx, mx, int(cfg.sample_size) // int(cfg.patch_size), [r], [c])[0]
                     for r, c in zip(rows, cols)])
    stored = np.asarray(reader.get(POS_EMBED_BUFFER)[0, rows * mx + cols], np.float32)
    err = float(np.max(np.abs(stored - ours)))
    if err > atol:
        raise WeightsError(f"{reader.directory}: {POS_EMBED_BUFFER} differs from the model's sin-cos table "
                           f"(max abs {err:.3g}); sample_size / patch_size / pos_embed_max_size disagree")


def load_sd3_transformer(weights_dir: str, cfg, dtype=None, shardings=None):
    """Strictly load WEIGHTS_DIR/transformer (single or sharded safetensors) into the params tree of
    `make_velocity_model(cfg)` (unrolled or scanned). Raises WeightsError naming every problem."""
    tdir = transformer_dir(weights_dir)
    check_config(cfg, tdir)
    reader = SafetensorsDir(tdir)
    model = make_velocity_model(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    check_pos_embed(reader, cfg)
    return stacked.load(lambda tree: _per_layer_keymap(tree, cfg), abstract, runs(abstract), reader, dtype=dtype,
                        shardings=shardings, ignore_unused=(POS_EMBED_BUFFER,))
