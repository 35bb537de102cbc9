"""diffusers `SD3Transformer2DModel` checkpoints -> the Flax MMDiT (families "sd3" / "sd35").

    cfg = model_config_from_diffusers("WEIGHTS_DIR/transformer")   # config.json -> model config
    params = load_sd3_transformer("WEIGHTS_DIR", cfg)               # strict, sharded-aware

The key map is written out from the architecture (not a generic renaming), so `check_map`
catches any disagreement between the model, the map and the checkpoint. Layout rules
(torch -> Flax): Linear `weight [out, in]` -> Dense `kernel [in, out]`; Conv2d
`[out, in, kh, kw]` -> `[kh, kw, in, out]`; `to_out.0` -> `to_out_0`, `ff.net.0.proj` ->
`ff/net_0/proj`, `transformer_blocks.{i}` -> `transformer_blocks_{i}`.

Scanned runs (`scan_blocks`, `transformer_blocks_{a}_to_{b}/block/...`, leading layer axis) read
virtual keys `transformer_blocks.{a..b}.<rest>`: `StackedReader` stacks the per-layer tensors
`a..b` on read. The strict check always runs first on the per-layer keys, so an error names the
real checkpoint tensor.

The persistent buffer `pos_embed.pos_embed` (the sin-cos table, saved when pos_embed_max_size is
set) is not a parameter: it is checked against the table the Flax model computes.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from ng_jax.models.weights.safetensors import (SafetensorsDir, Source, WeightsError, check_map, conv2d, flatten_map, linear,
                                   load_params)

CLASS_NAME = "SD3Transformer2DModel"
# Architecture keys shared by diffusers' config.json and our model config.
ARCH_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
             "pos_embed_max_size", "qk_norm", "dual_attention_layers")
POS_EMBED_BUFFER = "pos_embed.pos_embed"
_RUN = re.compile(r"^transformer_blocks_(\d+)_to_(\d+)$")
_ONE = re.compile(r"^transformer_blocks_(\d+)$")
_VIRTUAL = re.compile(r"^transformer_blocks\.\{(\d+)\.\.(\d+)\}\.(.+)$")


def transformer_dir(weights_dir: str) -> str:
    """WEIGHTS_DIR/transformer, or `weights_dir` itself when it already is a transformer directory."""
    sub = os.path.join(weights_dir, "transformer")
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(weights_dir, "config.json")):
        return weights_dir
    raise WeightsError(f"{weights_dir}: no transformer/ directory (expected a diffusers SD3 / SD3.5 save)")


def _read_config(tdir: str) -> dict:
    path = os.path.join(tdir, "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{tdir}: no config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None
    name = raw.get("_class_name")
    if name not in (None, CLASS_NAME):
        raise WeightsError(f"{path}: _class_name is {name!r}, expected {CLASS_NAME!r}")
    return raw


def model_config_from_diffusers(path: str, family: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """A diffusers transformer config.json (path: WEIGHTS_DIR or WEIGHTS_DIR/transformer) -> model config.

    Missing keys take diffusers' `SD3Transformer2DModel` defaults. family defaults to "sd35" when the
    checkpoint has qk-norm or dual-attention layers, else "sd3". `overrides` set dtype, remat, ...
    """
    tdir = transformer_dir(path)
    raw = _read_config(tdir)
    defaults = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
                    num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, qk_norm=None,
                    dual_attention_layers=())
    arch = {k: raw.get(k, defaults[k]) for k in ARCH_KEYS}
    arch["dual_attention_layers"] = tuple(int(i) for i in (arch["dual_attention_layers"] or ()))
    arch["qk_norm"] = arch["qk_norm"] or ""
    arch["pos_embed_max_size"] = arch["pos_embed_max_size"] or 0
    arch["out_channels"] = arch["out_channels"] or arch["in_channels"]
    c = ml_collections.ConfigDict()
    c.family = family or ("sd35" if arch["qk_norm"] or arch["dual_attention_layers"] else "sd3")
    for k, v in arch.items():
        setattr(c, k, v)
    c.dtype = "float32"
    c.remat = False
    c.scan_blocks = False
    c.latent_size = 0  # 0: sample_size
    c.weights_dir = os.path.dirname(tdir) if os.path.basename(os.path.normpath(tdir)) == "transformer" else tdir
    c.update(overrides)
    return c


def config_mismatches(cfg, raw: Mapping[str, Any]) -> list[str]:
    """Architecture keys where our config and a diffusers config.json disagree ("" / 0 / None / () equal)."""
    out = []
    for k in ARCH_KEYS:
        if k not in raw:
            continue
        ours, theirs = cfg.get(k), raw[k]
        if k == "dual_attention_layers":
            ours, theirs = tuple(ours or ()), tuple(theirs or ())
        elif k == "out_channels":
            ours, theirs = ours or cfg.get("in_channels"), theirs or raw.get("in_channels")
        else:
            ours, theirs = ours or None, theirs or None
        if ours != theirs:
            out.append(f"{k}: model config {ours!r}, checkpoint {theirs!r}")
    return out


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


def _stacked(src: Source, first: int, last: int) -> Source:
    """A per-layer Source of block `first` -> the Source of the stacked run `first..last`."""
    rest = src.key.split(".", 2)[2]  # "transformer_blocks.{i}.<rest>"
    key = f"transformer_blocks.{{{first}..{last}}}.{rest}"
    if src.transform is None:
        return Source(key)
    # Only Linear weights are transformed inside blocks: transpose the last two axes of [L, out, in].
    return Source(key, lambda w: np.swapaxes(w, -1, -2), lambda s: tuple(s[:-2]) + (s[-1], s[-2]))


def _flags(cfg) -> tuple[int, set, bool]:
    layers = int(cfg.num_layers)
    return layers, {int(i) for i in (cfg.get("dual_attention_layers") or ())}, bool(cfg.get("qk_norm"))


def sd3_keymap(params_abstract, cfg) -> dict[tuple[str, ...], Source]:
    """{flax path: Source} for every parameter of an sd3/sd35 MMDiT tree (unrolled or scanned)."""
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
        elif (m := _RUN.match(name)) is not None:
            a, b = int(m.group(1)), int(m.group(2))
            per_layer = flatten_map(block_map(f"transformer_blocks.{a}", a in dual, a == layers - 1, qk))
            out.update({(name, "block") + p: _stacked(s, a, b) for p, s in per_layer.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Stacked (scanned) layout


def _run_names(tree) -> dict[str, tuple[int, int]]:
    return {n: (int(m.group(1)), int(m.group(2))) for n in tree if (m := _RUN.match(n)) is not None}


def unstack_blocks(params):
    """A tree with scanned runs `transformer_blocks_{a}_to_{b}/block` -> per-layer `transformer_blocks_{i}`.

    Works on arrays and on ShapeDtypeStructs (abstract trees)."""
    out = {k: v for k, v in params.items() if k not in _run_names(params)}
    for name, (a, b) in _run_names(params).items():
        for j in range(b - a + 1):
            out[f"transformer_blocks_{a + j}"] = jax.tree.map(
                lambda x, j=j: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                else x[j], params[name]["block"])
    return out


def stack_blocks(params, abstract):
    """Per-layer params -> the layout of `abstract` (which names the scanned runs)."""
    out = {k: params[k] for k in abstract if k not in _run_names(abstract)}
    for name, (a, b) in _run_names(abstract).items():
        layers = [params[f"transformer_blocks_{i}"] for i in range(a, b + 1)]
        out[name] = {"block": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}
    return out


class StackedReader:
    """A SafetensorsDir view that adds virtual keys `transformer_blocks.{a..b}.<rest>` (the per-layer
    tensors a..b stacked on a new leading axis) and hides the per-layer tensors they consume."""

    def __init__(self, reader: SafetensorsDir, virtual_keys):
        self.reader, self.directory = reader, reader.directory
        self.key_file = dict(reader.key_file)
        for key in virtual_keys:
            members = self._members(key)
            if members and all(k in reader.key_file for k in members):
                for k in members:
                    self.key_file.pop(k, None)
                self.key_file[key] = "<stacked>"

    @staticmethod
    def _members(key: str) -> list[str]:
        m = _VIRTUAL.match(key)
        if m is None:
            return []
        return [f"transformer_blocks.{i}.{m.group(3)}" for i in range(int(m.group(1)), int(m.group(2)) + 1)]

    def keys(self) -> list[str]:
        return sorted(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        members = self._members(key)
        if not members:
            return self.reader.shape(key)
        shapes = {self.reader.shape(k) for k in members}
        if len(shapes) != 1:
            raise WeightsError(f"{self.directory}: layers of {key} differ in shape: {sorted(shapes)}")
        return (len(members),) + shapes.pop()

    def get(self, key: str) -> np.ndarray:
        members = self._members(key)
        return np.stack([self.reader.get(k) for k in members]) if members else self.reader.get(key)


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
    from ng_jax.models.nets.mmdit import sincos_pos_table

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
    from ng_jax.models.velocity import make_velocity_model

    tdir = transformer_dir(weights_dir)
    raw = _read_config(tdir)
    bad = config_mismatches(cfg, raw)
    if bad:
        raise WeightsError(f"{tdir}/config.json disagrees with the model config: {'; '.join(bad)}")
    reader = SafetensorsDir(tdir)
    model = make_velocity_model(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    ignore = (POS_EMBED_BUFFER,)
    flat_abstract = unstack_blocks(abstract)
    check_map(sd3_keymap(flat_abstract, cfg), flat_abstract, reader, ignore_unused=ignore)  # names real keys
    check_pos_embed(reader, cfg)
    keymap = sd3_keymap(abstract, cfg)
    source = StackedReader(reader, {s.key for s in keymap.values()}) if _run_names(abstract) else reader
    return load_params(keymap, abstract, source, dtype=dtype, shardings=shardings, ignore_unused=ignore)
