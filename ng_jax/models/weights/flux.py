"""diffusers `FluxTransformer2DModel` checkpoints -> `ng_jax.models.nets.flux` parameters (strict).

    cfg = model_config_from_diffusers(WEIGHTS_DIR)      # config.json keys (+ sample_size, dtype, ...)
    model = make_flux_model(cfg)
    params = load_flux_transformer(WEIGHTS_DIR, cfg)   # reads WEIGHTS_DIR/transformer

The key map is mechanical (weights.py): the Flax path `transformer_blocks_3/attn/to_out_0/kernel`
is the tensor `transformer_blocks.3.attn.to_out.0.weight`, transposed; `net_0` / `net_2` are
`net.0` / `net.2`; RMS qk-norm `weight`s and biases are copied. With `scan_blocks` a stack's
parameter (leading layer axis) is the stack of its per-layer tensors: the checkpoint is first checked
strictly layer by layer against the unrolled layout (so an error names the real tensor, e.g.
`transformer_blocks.1.attn.to_q.weight`), then each stacked parameter is read as one virtual tensor
`transformer_blocks.*.attn.to_q.weight` (host memory: one stack of a tensor at a time).
`scan_params` / `unscan_params` convert loaded trees between the two layouts.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets import flux
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError, check_map, linear, load_params

CLASS_NAME = "FluxTransformer2DModel"
# The architecture keys of diffusers' config.json and their defaults (FluxTransformer2DModel.__init__).
ARCH_DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
                 "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                 "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": False,
                 "axes_dims_rope": (16, 56, 56)}
_STACKS = ("transformer_blocks", "single_transformer_blocks")
_RENAME = {"to_out_0": "to_out.0", "net_0": "net.0", "net_2": "net.2"}


def transformer_dir(weights_dir: str) -> str:
    """WEIGHTS_DIR/transformer when it exists, else weights_dir itself (a bare transformer directory)."""
    sub = os.path.join(weights_dir, "transformer")
    return sub if os.path.isdir(sub) else weights_dir


def model_config_from_diffusers(transformer_dir_or_weights_dir: str, **overrides) -> dict:
    """config.json of a FluxTransformer2DModel -> a `make_flux_model` cfg dict (architecture keys as
    diffusers names them, plus sample_size=128 latent pixels (1024 px), max_sequence_length=512,
    guidance 3.5 for guidance_embeds models, dtype float32, remat/scan_blocks off); `overrides` win."""
    reader_dir = transformer_dir(transformer_dir_or_weights_dir)
    path = os.path.join(reader_dir, "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{reader_dir}: no config.json")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise WeightsError(f"{reader_dir}/config.json describes a {raw['_class_name']}, not a {CLASS_NAME}")
    cfg: dict[str, Any] = {k: raw.get(k, v) for k, v in ARCH_DEFAULTS.items()}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    cfg.update(sample_size=128, max_sequence_length=512, guidance=3.5 if cfg["guidance_embeds"] else None,
               dtype="float32", remat=False, scan_blocks=False)
    cfg.update(overrides)
    return cfg


def _check_config(cfg, directory: str) -> None:
    stored = model_config_from_diffusers(directory)
    bad = []
    for key, default in ARCH_DEFAULTS.items():
        want, have = cfg.get(key, default), stored[key]
        if key == "out_channels":
            want = want or cfg.get("in_channels")
            have = have or stored["in_channels"]
        if key == "axes_dims_rope":
            want, have = tuple(want), tuple(have)
        if want != have:
            bad.append(f"{key}: model {want!r} vs checkpoint {have!r}")
    if bad:
        raise WeightsError(f"{directory}/config.json disagrees with the model config: {bad}")


# ----------------------------------------------------------------------------------------------
# Scanned <-> unrolled parameter layouts


def scan_params(params: dict, num_layers: int, num_single_layers: int) -> dict:
    """Unrolled parameters (`transformer_blocks_{i}`) -> the scan_blocks layout (one stacked tree)."""
    out = {k: v for k, v in params.items() if not any(k.startswith(s + "_") for s in _STACKS)}
    for name, n in zip(_STACKS, (num_layers, num_single_layers)):
        if n:
            layers = [params[f"{name}_{i}"] for i in range(n)]
            out[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unscan_params(params: dict) -> dict:
    """The scan_blocks layout -> unrolled parameters (e.g. for LoRA, whose targets are 2-D kernels)."""
    out = {k: v for k, v in params.items() if k not in _STACKS}
    for name in _STACKS:
        if name in params:
            n = jax.tree_util.tree_leaves(params[name])[0].shape[0]
            for i in range(n):
                out[f"{name}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params[name])
    return out


# ----------------------------------------------------------------------------------------------
# Key map


def _torch_prefix(path: tuple[str, ...]) -> str:
    parts = []
    for seg in path:
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)", seg)
        if m:
            parts.append(f"{m[1]}.{m[2]}")
        elif seg in _STACKS:
            parts.append(f"{seg}.*")  # a scanned stack: one virtual tensor per stacked parameter
        else:
            parts.append(_RENAME.get(seg, seg))
    return ".".join(parts)


def _leaf_source(path: tuple[str, ...]) -> Source:
    prefix, leaf = _torch_prefix(path[:-1]), path[-1]
    if leaf in ("kernel", "bias"):
        return linear(prefix)[leaf]
    if leaf == "weight":  # RMSNorm scale (norm_q / norm_k / norm_added_q / norm_added_k)
        return Source(f"{prefix}.weight")
    raise WeightsError(f"no FLUX key rule for the parameter {'/'.join(path)}")


def _stacked(src: Source) -> Source:
    """A per-layer Source lifted to a [n, ...] stack (the transform applied layer by layer)."""
    t, f = src.transform, src.shape_fn
    return Source(src.key,
                  None if t is None else (lambda w: np.stack([t(x) for x in w])),
                  None if f is None else (lambda s: (s[0],) + tuple(f(tuple(s[1:])))))


def _paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in p), leaf) for p, leaf in flat]


def flux_keymap(params_abstract, cfg) -> dict[tuple[str, ...], Source]:
    """{flax path: Source} for every parameter of `params_abstract` (unrolled or scanned layout)."""
    counts = {"transformer_blocks": int(cfg.get("num_layers", ARCH_DEFAULTS["num_layers"])),
              "single_transformer_blocks": int(cfg.get("num_single_layers", ARCH_DEFAULTS["num_single_layers"]))}
    out = {}
    for path, leaf in _paths(params_abstract):
        src = _leaf_source(path)
        if path[0] in _STACKS:
            if leaf.shape[:1] != (counts[path[0]],):
                raise WeightsError(f"{'/'.join(path)} has shape {leaf.shape}; a scanned stack of "
                                   f"{counts[path[0]]} layers was expected")
            src = _stacked(src)
        out[path] = src
    return out


class _StackedReader:
    """A `SafetensorsDir` view in which each complete per-layer family `stack.{0..n-1}.rest` is one
    virtual tensor `stack.*.rest` of shape [n, ...]; what is incomplete stays as is (and is then
    reported by check_map)."""

    def __init__(self, reader: SafetensorsDir, counts: Mapping[str, int]):
        self.directory = reader.directory
        self._reader = reader
        self.key_file: dict[str, str] = {}
        self._stacks: dict[str, list[str]] = {}
        groups: dict[str, dict[int, str]] = {}
        for key in reader.key_file:
            m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", key)
            if m and counts.get(m[1]):
                groups.setdefault(f"{m[1]}.*.{m[3]}", {})[int(m[2])] = key
            else:
                self.key_file[key] = reader.key_file[key]
        for vkey, members in groups.items():
            n = counts[vkey.split(".")[0]]
            keys = [members.get(i) for i in range(n)]
            shapes = {reader.shape(k) for k in keys if k is not None}
            if None in keys or len(shapes) != 1 or len(members) != n:
                self.key_file.update({k: reader.key_file[k] for k in members.values()})
            else:
                self.key_file[vkey] = "(stacked)"
                self._stacks[vkey] = keys

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._stacks:
            keys = self._stacks[key]
            return (len(keys),) + self._reader.shape(keys[0])
        return self._reader.shape(key)

    def get(self, key: str) -> np.ndarray:
        if key in self._stacks:
            return np.stack([self._reader.get(k) for k in self._stacks[key]])
        return self._reader.get(key)


def load_flux_transformer(weights_dir: str, cfg, dtype=None, shardings=None):
    """Strictly load WEIGHTS_DIR/transformer (or a bare transformer directory) into the parameter
    tree of `make_flux_model(cfg)`; raises WeightsError naming every unmapped, unexpected or
    mis-shaped tensor (and any disagreement between cfg and config.json) before reading any tensor.
    dtype / shardings as `weights.load_params` (None: float32 on the default device)."""
    directory = transformer_dir(weights_dir)
    reader = SafetensorsDir(directory)
    _check_config(cfg, directory)
    model = flux.make_flux_model(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    if not bool(cfg.get("scan_blocks", False)):
        return load_params(flux_keymap(abstract, cfg), abstract, reader, dtype=dtype, shardings=shardings)
    unrolled = jax.eval_shape(unscan_params, abstract)
    check_map(flux_keymap(unrolled, cfg), unrolled, reader)  # names the real per-layer tensors
    counts = {"transformer_blocks": int(cfg["num_layers"]), "single_transformer_blocks": int(cfg["num_single_layers"])}
    return load_params(flux_keymap(abstract, cfg), abstract, _StackedReader(reader, counts), dtype=dtype,
                       shardings=shardings)


# ----------------------------------------------------------------------------------------------
# Parity against diffusers (test extra: torch + diffusers)


def parity_flux(weights_dir: str, seed: int = 0, latent_size: int | None = None, *, batch: int = 2,
                height: int = 8, width: int = 12, text_len: int = 8) -> dict:
    """Load WEIGHTS_DIR/transformer into diffusers (torch, float32) and into ours, run the same random
    inputs (latents [batch, height, width, C] NHWC, or latent_size x latent_size; T5-like tokens,
    pooled, sigma, guidance) and return {"family": "flux", "max_abs_err": max |v_ours - v_diffusers|,
    "params": parameter count, "ref_max_abs": max |v_diffusers|}."""
    if latent_size:
        height = width = int(latent_size)
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from ng_jax.models.nets.text import TextCond

    directory = transformer_dir(weights_dir)
    cfg = model_config_from_diffusers(directory, sample_size=(height, width), max_sequence_length=text_len)
    model = flux.make_flux_model(cfg)
    params = load_flux_transformer(directory, cfg)
    ref = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.float32).eval()

    rng = np.random.default_rng(seed)
    ch = model.sample_shape[-1]
    x = rng.standard_normal((batch, height, width, ch)).astype(np.float32)
    tokens = rng.standard_normal((batch, text_len, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32)
    sigma = rng.uniform(0.05, 1.0, batch).astype(np.float32)
    guidance = rng.uniform(1.0, 5.0, batch).astype(np.float32) if cfg["guidance_embeds"] else None

    cond = TextCond(tokens=tokens, pooled=pooled, mask=np.ones((batch, text_len), bool))
    ours = np.asarray(jax.jit(model.apply)(params, x, sigma, cond, guidance))
    with torch.no_grad():
        packed = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), batch, ch, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        out = ref(hidden_states=packed, encoder_hidden_states=torch.from_numpy(tokens),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma), img_ids=img_ids,
                  txt_ids=torch.zeros(text_len, 3), guidance=None if guidance is None else torch.from_numpy(guidance),
                  return_dict=False)[0]
        theirs = FluxPipeline._unpack_latents(out, height * 8, width * 8, 8).numpy().transpose(0, 2, 3, 1)
    n_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
    n_ref = int(sum(p.numel() for p in ref.parameters()))
    if n_params != n_ref:
        raise WeightsError(f"parameter count differs: ours {n_params}, diffusers {n_ref}")
    return {"family": "flux", "max_abs_err": float(np.max(np.abs(ours - theirs))), "params": n_params,
            "ref_max_abs": float(np.max(np.abs(theirs)))}
