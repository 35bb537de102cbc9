"""CLIP weights on disk for the CLIP rewards (ng_jax.rewards.clip): a transformers `CLIPModel`
directory's config and tensors (model.safetensors, a sharded set, or pytorch_model.bin with torch),
read as float32 numpy and checked strictly against the shapes its config implies.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from ng_jax.errors import UserError

_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


class ClipWeightsError(UserError, ValueError):
    """A CLIP weights directory or checkpoint that cannot be used (missing, wrong kind, keys, shapes)."""



def expected_clip_shapes(config) -> dict[str, tuple]:
    """Every tensor of a transformers CLIPModel checkpoint and its shape, from a CLIPConfig."""
    t, v, e = config.text_config, config.vision_config, config.projection_dim
    shapes = {"logit_scale": (), "text_projection.weight": (e, t.hidden_size),
              "visual_projection.weight": (e, v.hidden_size),
              "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
              "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
              "vision_model.embeddings.class_embedding": (v.hidden_size,),
              "vision_model.embeddings.patch_embedding.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
              "vision_model.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2 + 1,
                                                                    v.hidden_size)}
    for tower, c, norms in (("text_model", t, ("final_layer_norm",)),
                            ("vision_model", v, ("pre_layrnorm", "post_layernorm"))):
        d, f = c.hidden_size, c.intermediate_size
        for n in norms:
            shapes.update({f"{tower}.{n}.weight": (d,), f"{tower}.{n}.bias": (d,)})
        for i in range(c.num_hidden_layers):
            p = f"{tower}.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes.update({f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)})
            for n in ("layer_norm1", "layer_norm2"):
                shapes.update({f"{p}{n}.weight": (d,), f"{p}{n}.bias": (d,)})
            shapes.update({f"{p}mlp.fc1.weight": (f, d), f"{p}mlp.fc1.bias": (f,),
                           f"{p}mlp.fc2.weight": (d, f), f"{p}mlp.fc2.bias": (d,)})
    return shapes


def check_clip_tensors(tensors: Mapping[str, tuple | np.ndarray], config, where: str) -> None:
    """Raise ClipWeightsError naming missing, unexpected and mis-shaped tensors."""
    want = expected_clip_shapes(config)
    got = {k: tuple(np.shape(x)) if not isinstance(x, tuple) else x for k, x in tensors.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(k for k in set(got) - set(want) if k not in _BUFFERS)
    shaped = sorted(f"{k}: {got[k]} (config wants {want[k]})" for k in set(want) & set(got) if got[k] != want[k])
    problems = [f"{len(x)} {label}: {x[:8]}{' ...' if len(x) > 8 else ''}" for label, x in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped", shaped)) if x]
    if problems:
        raise ClipWeightsError(f"{where} does not hold the CLIPModel its config describes: " + "; ".join(problems))


def read_clip_config(directory: str):
    from transformers import CLIPConfig

    if os.path.isfile(directory):
        raise ClipWeightsError(f"{directory} is a file; expected a transformers CLIPModel directory (an open_clip "
                               "checkpoint such as HPS_v2.1_compressed.pt must first be converted with "
                               "`python -m ng_jax.rewards.clip CHECKPOINT --tokenizer DIR --out DIR`)")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ClipWeightsError(f"CLIP weights directory {directory}: no config.json (missing directory or not a "
                               "transformers CLIPModel save_pretrained directory)")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != "clip":
        raise ClipWeightsError(f"{directory}: config.json has model_type {raw.get('model_type')!r}; a CLIP reward "
                               "needs a full two-tower CLIPModel (model_type 'clip')")
    return CLIPConfig.from_dict(raw)


def _safetensors_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(directory, index[0])) as f:
            return [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(files) > 1:
        raise ClipWeightsError(f"{directory}: several unindexed safetensors files {files}; keep exactly one")
    if not files and "pytorch_model.bin" not in names:
        raise ClipWeightsError(f"{directory}: no model.safetensors (or sharded set, or pytorch_model.bin)")
    return [os.path.join(directory, n) for n in files]


def read_clip_tensors(directory: str, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """float32 numpy tensors (all, or `keys`) of model.safetensors / a sharded set / pytorch_model.bin
    (the last needs torch)."""
    from safetensors import safe_open

    files, out = _safetensors_files(directory), {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if keys is None or key in keys:
                    out[key] = np.asarray(f.get_tensor(key), np.float32)
    if not files:
        state = _torch_load(os.path.join(directory, "pytorch_model.bin"))
        out = {k: v.float().numpy() for k, v in state.items() if keys is None or k in keys}
    return out


def clip_tensor_shapes(directory: str) -> dict[str, tuple]:
    """Tensor shapes from the safetensors headers (nothing is read), or from pytorch_model.bin."""
    from safetensors import safe_open

    files, out = _safetensors_files(directory), {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out if files else {k: v.shape for k, v in read_clip_tensors(directory).items()}


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ClipWeightsError(f"reading {path} needs torch; convert it to safetensors elsewhere") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj
