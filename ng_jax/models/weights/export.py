"""Flax transformer parameters -> diffusers checkpoints: the loaders' key maps run backwards.

    write_transformer(family, vcfg, params, base_dir, out_dir)        # a full diffusers transformer directory
    write_peft_lora(family, vcfg, adapters, alpha, rank, out_file)    # LoRA adapters, PEFT layout

Every parameter goes back to the tensor its `Source` reads, through the inverse of its transform
(Dense kernel [in, out] -> Linear weight [out, in], ...). `write_transformer` starts from the base
checkpoint (`base_dir`'s transformer: its config.json, its persistent buffers such as SD3's position
table) and replaces every mapped tensor, so `from_pretrained` loads the result strictly. A LoRA adapter
`{lora_a [in, r], lora_b [r, out]}` on a kernel whose torch weight is `X.weight` becomes PEFT's
`transformer.X.lora_A.weight = a.T [r, in]` and `transformer.X.lora_B.weight = (alpha / r) b.T [out, r]`:
the scale is folded into B, so the file means the same with PEFT's default `lora_alpha = r`
(diffusers' `load_lora_weights` / `load_lora_adapter(..., prefix="transformer")`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import storage
from ng_jax.models.weights import flux, sd3, stacked
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError
from ng_jax.models.weights.transformer import transformer_dir

DTYPES = ("original", "float32", "bfloat16", "float16")


def _per_layer(family: str, vcfg, tree):
    """(per-layer tree, its key map) of a parameter tree of `family` (scanned stacks unstacked)."""
    if family == "flux1_dev":
        flat = stacked.unstack(tree, flux.runs(tree))
        return flat, flux._per_layer_keymap(flat)
    flat = stacked.unstack(tree, sd3.runs(tree))
    return flat, sd3._per_layer_keymap(flat, vcfg)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def to_checkpoint(src: Source, value) -> np.ndarray:
    """The checkpoint tensor a parameter is read from, from the parameter (float32 numpy)."""
    value = np.asarray(value, np.float32)
    if src.transform is None:
        return value
    if src.inverse is None:
        raise WeightsError(f"{src.key}: its transform has no inverse; cannot export it")
    return np.ascontiguousarray(src.inverse(value))


def write_transformer(family: str, vcfg, params, base_dir: str, out_dir: str, dtype: str = "original") -> str:
    """A diffusers transformer directory `out_dir/transformer` holding `params` (a Flax tree of `family`,
    unrolled or scanned) on top of the base checkpoint in `base_dir`. Returns the transformer directory.
    `out_dir` may be a bucket (gs://...): the file is then built in memory and uploaded whole."""
    from safetensors.flax import save, save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    src_dir = transformer_dir(base_dir)
    reader = SafetensorsDir(src_dir)
    flat, keymap = _per_layer(family, vcfg, params)
    tensors = {k: reader.get(k) for k in reader.keys()}
    stored = {k: reader.dtype(k) for k in reader.keys()}
    for path, src in keymap.items():
        if src.key not in tensors:
            raise WeightsError(f"{src_dir}: no tensor {src.key} for the parameter {'/'.join(path)}")
        value = to_checkpoint(src, _get(flat, path))
        if value.shape != tuple(tensors[src.key].shape):
            raise WeightsError(f"{src.key}: exported shape {value.shape}, the base checkpoint's "
                               f"{tuple(tensors[src.key].shape)}")
        tensors[src.key] = value
    names = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16, "F64": jnp.float64}
    out = {}
    for k, v in tensors.items():
        target = names.get(stored[k], jnp.float32) if dtype == "original" else jnp.dtype(dtype)
        out[k] = jnp.asarray(np.asarray(v, np.float32)).astype(target)
    tdir = os.path.join(out_dir, "transformer")
    storage.makedirs(tdir)
    weights = os.path.join(tdir, "diffusion_pytorch_model.safetensors")
    if storage.is_remote(weights):
        storage.write_bytes(weights, save(out))
    else:
        save_file(out, weights)
    storage.write_bytes(os.path.join(tdir, "config.json"),
                        storage.path(os.path.join(src_dir, "config.json")).read_bytes())
    return tdir


def _adapters(tree, prefix=()):
    """(path of the adapted kernel's module, {"lora_a", "lora_b"}) for every adapter of a LoRA tree."""
    if isinstance(tree, dict) and "lora_a" in tree and "lora_b" in tree:
        yield prefix, tree
        return
    for k, v in (tree.items() if isinstance(tree, dict) else ()):
        yield from _adapters(v, prefix + (k,))


def write_peft_lora(family: str, vcfg, adapters, base_params, alpha: float, rank: int, out_file: str) -> int:
    """The LoRA `adapters` (ng_jax.models.nets.lora layout, over `base_params`' tree) as a PEFT-layout
    safetensors file for diffusers (a local path or in a bucket, gs://...); returns the number of adapted modules."""
    from safetensors.numpy import save

    base_runs = flux.runs(base_params) if family == "flux1_dev" else sd3.runs(base_params)
    flat_adapters = stacked.unstack(adapters, [r for r in base_runs if r.name in adapters])
    _, keymap = _per_layer(family, vcfg, base_params)
    scale = float(alpha) / float(rank)
    out = {}
    for path, ab in _adapters(flat_adapters):
        src = keymap.get(path + ("kernel",))
        if src is None or not src.key.endswith(".weight"):
            raise WeightsError(f"LoRA adapter on {'/'.join(path)}: no Linear weight in the key map")
        module = src.key[: -len(".weight")]
        out[f"transformer.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["lora_a"], np.float32).T)
        out[f"transformer.{module}.lora_B.weight"] = np.ascontiguousarray(scale * np.asarray(ab["lora_b"], np.float32).T)
    if not out:
        raise WeightsError("the trainable tree holds no LoRA adapters")
    storage.write_bytes(out_file, save(out, metadata={"format": "pt", "ng_jax": json.dumps(
        {"rank": rank, "alpha": alpha, "scale_folded_into_B": scale})}))
    return len(out) // 2


def host_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)
