"""The real text encoders of SD3 / SD3.5 (CLIP-L + OpenCLIP bigG + T5-XXL) and FLUX (CLIP-L + T5-XXL).

They produce the project's `TextCond` exactly as diffusers 0.39 builds prompt embeddings:

- SD3 (`StableDiffusion3Pipeline._get_clip_prompt_embeds`, `_get_t5_prompt_embeds`,
  `encode_prompt`): both CLIPs read their prompt padded to 77 tokens with no attention mask; the
  per-token embedding is the penultimate hidden state (`hidden_states[-2]`, or
  `[-(clip_skip + 2)]`), the pooled one the projected `text_embeds`. CLIP-L and bigG states are
  concatenated on the feature axis (768 + 1280), zero-padded to T5's width (4096) and
  concatenated on the sequence axis before T5's last hidden state (prompt padded to
  `max_sequence_length`, default 256, no mask): tokens [B, 77 + L, 4096], pooled = [CLIP-L
  text_embeds, bigG text_embeds] [B, 2048]. Without T5 the T5 part is zeros
  [B, max_sequence_length, joint_attention_dim], as diffusers does.
- FLUX (`FluxPipeline.encode_prompt`): pooled = CLIP-L's `pooler_output` (final-layer-norm state
  at the EOS token, not projected) [B, 768]; tokens = T5's last hidden state [B, L, 4096]
  (L = `max_sequence_length`, default 512; 256 for schnell).

`TextCond.mask` is all True: neither pipeline passes an attention mask to its encoders or to the
transformer, so SD3 and FLUX attend to the padding tokens, and their outputs depend on them.

Why transformers' Flax classes (4.57.6, the last release that has them): `FlaxCLIPTextModel`,
`FlaxCLIPTextModelWithProjection` and `FlaxT5EncoderModel` are maintained ports of exactly the
torch modules the checkpoints were trained with, so parity is a matter of loading, not of
re-implementing. They run wherever the run's devices are, jitted, in `dtype` (bf16 for the real
models). Loading is the project's own strict loader (`ng_jax.models.weights.safetensors`) rather than
`from_pretrained(from_pt=True)`: that path cannot read sharded safetensors (T5-XXL is sharded),
puts every tensor on the default device, and only warns on missing keys. Here the Flax parameter
tree comes from `jax.eval_shape` of the module's init; every leaf names its checkpoint tensor by
the transformers naming rule (`a/b/kernel` <- `a.b.weight` transposed, `scale`/`embedding` <-
`weight`); unmapped / unused / mis-shaped tensors raise; tensors are read one at a time (numpy,
bf16 via ml_dtypes) into optional target shardings. No torch is needed.

The T5 shim: `FlaxT5Attention._relative_position_bucket` calls `jnp.clip(x, a_max=...)`, which
jax 0.10 no longer accepts. `_patch_flax_t5_clip` replaces only that static method with the same
code using `jnp.minimum` (identical for these arguments), and only when `jnp.clip` lacks `a_max`.

`HFTextEncoders.identity` names the weights and tokenizers (a fingerprint of their files): the key of
`ng_jax.models.text_cache.PromptEmbeddingCache`.

    enc, params = load_text_encoders(WEIGHTS_DIR, "sd3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cond = enc.encode_prompts(params, ["a photo of a cat", ""])        # TextCond, jitted
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets.text import TextCond
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError, load_params

__all__ = ["HFTextEncoders", "load_text_encoders", "hf_keymap", "CLIP_LENGTH"]

CLIP_LENGTH = 77
FAMILIES = {  # family -> (role -> (encoder dir, tokenizer dir)), default max_sequence_length
    "sd3": ({"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
             "t5": ("text_encoder_3", "tokenizer_3")}, 256),
    "flux": ({"clip_l": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")}, 512),
}


def _patch_flax_t5_clip() -> None:
    """Make transformers' Flax T5 run on jax >= 0.7 (see the module docstring); idempotent."""
    if "a_max" in inspect.signature(jnp.clip).parameters:
        return
    from transformers.models.t5 import modeling_flax_t5

    attn = modeling_flax_t5.FlaxT5Attention
    if getattr(attn._relative_position_bucket, "_ng_jax_shim", False):
        return

    def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
        # transformers 4.57.6 FlaxT5Attention._relative_position_bucket, jnp.clip(a_max=m) -> jnp.minimum(., m)
        relative_buckets = 0
        if bidirectional:
            num_buckets //= 2
            relative_buckets += (relative_position > 0) * num_buckets
            relative_position = jnp.abs(relative_position)
        else:
            relative_position = -jnp.minimum(relative_position, 0)
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            jnp.log(relative_position / max_exact) / jnp.log(max_distance / max_exact) * (num_buckets - max_exact))
        relative_position_if_large = jnp.minimum(relative_position_if_large, num_buckets - 1)
        relative_buckets += jnp.where(is_small, relative_position, relative_position_if_large)
        return relative_buckets.astype("i4")

    relative_position_bucket._ng_jax_shim = True
    attn._relative_position_bucket = staticmethod(relative_position_bucket)


# ------------------------------------------------------------------------------------------ loading


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


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsError(f"{os.path.dirname(path)}: no {os.path.basename(path)}")
    with open(path) as f:
        return json.load(f)


class _SafetensorsFile(SafetensorsDir):
    """One file of a directory that holds precision variants side by side (model.safetensors,
    model.fp16.safetensors, as diffusers repos ship CLIP encoders)."""

    def __init__(self, path: str):
        from safetensors import safe_open

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
    from transformers import (CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection,
                              FlaxT5EncoderModel, T5Config)

    if not os.path.isdir(directory):
        raise WeightsError(f"text encoder directory not found: {directory}")
    raw = _read_json(os.path.join(directory, "config.json"))
    want_type = "t5" if role == "t5" else "clip_text_model"
    if raw.get("model_type") != want_type:
        cls_name = "T5EncoderModel" if role == "t5" else "CLIPTextModel"
        raise WeightsError(f"{directory}: config.json has model_type {raw.get('model_type')!r}; the {role} encoder "
                           f"needs {want_type!r} (a transformers {cls_name} save_pretrained directory)")
    if role == "t5":
        _patch_flax_t5_clip()
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
    from flax.core import unfreeze

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


# ------------------------------------------------------------------------------------------ encoding


@dataclasses.dataclass(frozen=True, eq=False)
class HFTextEncoders:
    """tokenize(prompts) -> ids; encode(params, ids) -> TextCond (pure, jittable); encode_prompts."""

    family: str                       # "sd3" | "flux"
    models: Mapping[str, Any]         # role -> transformers Flax model (built with _do_init=False)
    tokenizers: Mapping[str, Any]     # role -> transformers tokenizer (CLIPTokenizer / T5TokenizerFast)
    max_sequence_length: int          # T5 tokens
    joint_attention_dim: int = 4096   # width of the zero T5 part when SD3 runs without T5
    clip_skip: int | None = None
    identity: str = ""                # what a PromptEmbeddingCache keys on
    dtype: Any = jnp.float32          # of the outputs (diffusers casts them to the encoders' dtype)

    def clip_length(self, role: str) -> int:
        tok = self.tokenizers[role]
        return min(int(tok.model_max_length), self.models[role].config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Prompts -> {role: int32 [B, length]}, padded to max length and truncated as diffusers does."""
        if isinstance(prompts, str):
            raise TypeError("tokenize expects a sequence of prompts, not a single string")
        prompts = [str(p) for p in prompts]
        out = {}
        for role, tok in self.tokenizers.items():
            length = self.max_sequence_length if role == "t5" else self.clip_length(role)
            enc = tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)
            out[role] = np.asarray(enc["input_ids"], np.int32)
        return out

    def _clip(self, role, params, ids):
        out = self.models[role](ids, params=params, output_hidden_states=True)
        hidden = out.hidden_states[-2 if self.clip_skip is None else -(self.clip_skip + 2)]
        return hidden, out.text_embeds

    def encode(self, params, ids: Mapping[str, jax.Array]) -> TextCond:
        """The diffusers prompt embedding of `ids` (see the module docstring); mask all True."""
        t5 = None
        if "t5" in self.models:
            t5 = self.models["t5"](ids["t5"], params=params["t5"]).last_hidden_state
        if self.family == "flux":
            pooled = self.models["clip_l"](ids["clip_l"], params=params["clip_l"]).pooler_output
            tokens = t5
        else:
            hl, pl = self._clip("clip_l", params["clip_l"], ids["clip_l"])
            hg, pg = self._clip("clip_g", params["clip_g"], ids["clip_g"])
            clip = jnp.concatenate([hl, hg], axis=-1)
            if t5 is None:
                t5 = jnp.zeros((clip.shape[0], self.max_sequence_length, self.joint_attention_dim), clip.dtype)
            if clip.shape[-1] > t5.shape[-1]:
                raise ValueError(f"CLIP width {clip.shape[-1]} exceeds T5 width {t5.shape[-1]}; cannot zero-pad")
            clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
            tokens = jnp.concatenate([clip.astype(t5.dtype), t5], axis=1)
            pooled = jnp.concatenate([pl, pg], axis=-1)
        return TextCond(tokens=tokens.astype(self.dtype), pooled=pooled.astype(self.dtype),
                        mask=jnp.ones(tokens.shape[:2], bool))

    @functools.cached_property
    def _encode_jit(self):
        return jax.jit(self.encode)

    def encode_prompts(self, params, prompts: Sequence[str]) -> TextCond:
        return self._encode_jit(params, {k: jnp.asarray(v) for k, v in self.tokenize(prompts).items()})
