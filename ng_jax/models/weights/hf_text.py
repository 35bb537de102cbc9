"""Loading the real text encoders (ng_jax.models.nets.hf_text) from a diffusers model directory.

    enc, params = load_text_encoders(WEIGHTS_DIR, "sd3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

Loading is the project's own strict loader (`ng_jax.models.weights.safetensors`) rather than
`from_pretrained(from_pt=True)`: that path cannot read sharded safetensors (T5-XXL is sharded),
puts every tensor on the default device, and only warns on missing keys. Here the Flax parameter
tree comes from `jax.eval_shape` of the module's init; every leaf names its checkpoint tensor by
the transformers naming rule (`a/b/kernel` <- `a.b.weight` transposed, `scale`/`embedding` <-
`weight`); unmapped / unused / mis-shaped tensors raise; tensors are read one at a time (numpy,
bf16 via ml_dtypes) into optional target shardings. No torch is needed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from safetensors import safe_open

from ng_jax.models.jsonfile import read_json
from ng_jax.models.nets.hf_text import FAMILIES, HFTextEncoders, patch_flax_t5_clip
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError, load_params

def hf_keymap(abstract_params, shared_key: str | None = None) -> dict[tuple[str, ...], Source]:
    """{flax path: Source} for a transformers Flax model from its PyTorch checkpoint names.

    The rule transformers' own converter applies: `a/b/kernel` <- `a.b.weight` transposed (2-D
    only), `a/b/{scale,embedding,weight}` <- `a.b.weight`, `a/b/bias` <- `a.b.bias`. T5's
    `shared/embedding` comes from `shared_key` (`shared.weight` or its tied copy
    `encoder.embed_tokens.weight`, whichever the checkpoint kept)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        p = tuple(str(getattr(k, "key", k)) for k in path)
        prefix, name = ".".join(p[:-1]), p[-1]
        if name == "kernel":
            if len(leaf.shape) != 2:
                raise WeightsError(f"hf_keymap: {'/'.join(p)} has shape {leaf.shape}; only 2-D kernels are mapped")
            out[p] = Source(f"{prefix}.weight", lambda w: w.T, lambda s: tuple(s[::-1]))
        elif name in ("scale", "embedding", "weight"):
            out[p] = Source(shared_key if p == ("shared", "embedding") and shared_key else f"{prefix}.weight")
        elif name == "bias":
            out[p] = Source(f"{prefix}.bias")
        else:
            raise WeightsError(f"hf_keymap: no naming rule for parameter {'/'.join(p)}")
    return out


class _SafetensorsFile(SafetensorsDir):
    """One file of a directory that holds precision variants side by side (model.safetensors,
    model.fp16.safetensors, as diffusers repos ship CLIP encoders)."""

    def __init__(self, path: str):
        self.directory = path
        self._file = safe_open(path, framework="numpy")
        self.key_file = {k: os.path.basename(path) for k in self._file.keys()}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._file.get_tensor(key)


def _reader(directory: str, variant: str | None) -> SafetensorsDir:
    """The checkpoint of `directory`: its index's shards, its only file, or model[.variant].safetensors."""
    names = os.listdir(directory)
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if any(n.endswith(".safetensors.index.json") for n in names) or len(files) <= 1:
        return SafetensorsDir(directory, prefix="model")
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    if name not in files:
        raise WeightsError(f"{directory}: several safetensors files {files} and no {name}; pick one with variant=")
    return _SafetensorsFile(os.path.join(directory, name))


def _load_component(directory: str, role: str, dtype, param_dtype, shardings, variant=None, projection=True):
    """One encoder: (Flax model object built with _do_init=False, parameter tree). role "t5" is a T5
    encoder, any other a CLIP text encoder, with the text projection (SD3) or without (FLUX)."""
    # Deferred: transformers takes seconds to import; only loading the real encoders needs it.
    from transformers import (CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection,
                              FlaxT5EncoderModel, T5Config)

    if not os.path.isdir(directory):
        raise WeightsError(f"text encoder directory not found: {directory}")
    raw = read_json(directory, error=WeightsError)
    want_type = "t5" if role == "t5" else "clip_text_model"
    if raw.get("model_type") != want_type:
        cls_name = "T5EncoderModel" if role == "t5" else "CLIPTextModel"
        raise WeightsError(f"{directory}: config.json has model_type {raw.get('model_type')!r}; the {role} encoder "
                           f"needs {want_type!r} (a transformers {cls_name} save_pretrained directory)")
    if role == "t5":
        patch_flax_t5_clip()
        model = FlaxT5EncoderModel(T5Config.from_dict(raw), dtype=dtype, _do_init=False)
    else:
        cls = FlaxCLIPTextModelWithProjection if projection else FlaxCLIPTextModel
        model = cls(CLIPTextConfig.from_dict(raw), dtype=dtype, _do_init=False)
    init = functools.partial(model.init_weights, input_shape=(1, 1))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                            _plain(jax.eval_shape(init, jax.random.PRNGKey(0))))
    if callable(shardings):  # a rule applied to the abstract tree (in the dtype the parameters will have)
        shardings = shardings(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype or s.dtype), abstract))
    reader = _reader(directory, variant)
    shared, ignore = None, ("text_model.embeddings.position_ids",)  # a buffer older checkpoints stored
    if role == "t5":
        shared = "shared.weight" if "shared.weight" in reader.key_file else "encoder.embed_tokens.weight"
        ignore = ("encoder.embed_tokens.weight",) if shared == "shared.weight" else ()
    params = load_params(hf_keymap(abstract, shared), abstract, reader, dtype=param_dtype, shardings=shardings,
                         ignore_unused=ignore)
    return model, params


def _plain(tree):
    return unfreeze(tree)


def _fingerprint(directory: str) -> str:
    """config, tokenizer files and weight file names + sizes (weight values are not hashed: too slow for T5-XXL)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(path)};".encode())
        elif name.endswith((".json", ".txt", ".model")):
            with open(path, "rb") as f:
                h.update(name.encode() + b":" + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def load_text_encoders(weights_dir: str, family: str = "sd3", *, max_sequence_length: int | None = None,
                       dtype=jnp.float32, param_dtype=None, with_t5: bool = True, joint_attention_dim: int = 4096,
                       clip_skip: int | None = None, shardings: Mapping[str, Any] | None = None,
                       variant: str | None = None):
    """(HFTextEncoders, params {"clip_l", "clip_g"?, "t5"?}) from a diffusers model directory.

    dtype: computation dtype; param_dtype: None keeps float32 parameters, else they are cast
    (e.g. jnp.bfloat16 for the frozen encoders). shardings: optional {role: tree of shardings}, or a
    callable `abstract parameter tree -> tree of shardings` applied to every encoder (e.g. the run's
    rule table, `lambda tree: parallel.param_shardings(tree, mesh, rules)`), so each tensor is read
    straight into its sharding.
    with_t5=False (SD3 only) drops T5; its part of the tokens is then zeros, as diffusers does.
    variant: in an unindexed directory with several files, read model.{variant}.safetensors
    instead of model.safetensors (sharded encoders always read the files of their
    model.safetensors.index.json).
    """
    # Deferred: transformers takes seconds to import; only loading the real encoders needs it.
    from transformers import CLIPTokenizer, T5TokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown text-encoder family {family!r}; expected one of {sorted(FAMILIES)}")
    layout, default_len = FAMILIES[family]
    if not with_t5 and family != "sd3":
        raise ValueError("with_t5=False is only meaningful for SD3 (FLUX's tokens are T5's)")
    models, params, tokenizers, prints = {}, {}, {}, []
    for role, (enc_dir, tok_dir) in layout.items():
        if role == "t5" and not with_t5:
            continue
        role_sh = shardings if callable(shardings) else (shardings or {}).get(role)
        models[role], params[role] = _load_component(os.path.join(weights_dir, enc_dir), role, dtype, param_dtype,
                                                     role_sh, variant, projection=family == "sd3")
        tok_path = os.path.join(weights_dir, tok_dir)
        if not os.path.isdir(tok_path):
            raise WeightsError(f"tokenizer directory not found: {tok_path}")
        tokenizers[role] = (T5TokenizerFast if role == "t5" else CLIPTokenizer).from_pretrained(tok_path)
        prints.append(f"{role}={_fingerprint(os.path.join(weights_dir, enc_dir))}/{_fingerprint(tok_path)}")
    length = int(max_sequence_length or default_len)
    identity = (f"{family}|len={length}|t5={with_t5}|clip_skip={clip_skip}|dtype={jnp.dtype(dtype).name}|"
                f"params={jnp.dtype(param_dtype or jnp.float32).name}|variant={variant}|" + "|".join(prints))
    enc = HFTextEncoders(family=family, models=models, tokenizers=tokenizers, max_sequence_length=length,
                         joint_attention_dim=joint_attention_dim, clip_skip=clip_skip, identity=identity,
                         dtype=dtype)
    return enc, params
