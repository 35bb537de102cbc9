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
models). Loading them (strictly, sharded, no torch) is `ng_jax.models.weights.hf_text`.

The T5 shim: `FlaxT5Attention._relative_position_bucket` calls `jnp.clip(x, a_max=...)`, which
jax 0.10 no longer accepts. `patch_flax_t5_clip` replaces only that static method with the same
code using `jnp.minimum` (identical for these arguments), and only when `jnp.clip` lacks `a_max`.

`HFTextEncoders.identity` names the weights and tokenizers (a fingerprint of their files): the key of
`ng_jax.models.text_cache.PromptEmbeddingCache`.

    enc, params = weights.hf_text.load_text_encoders(WEIGHTS_DIR, "sd3", dtype=jnp.bfloat16,
                                                     param_dtype=jnp.bfloat16)
    cond = enc.encode_prompts(params, ["a photo of a cat", ""])        # TextCond, jitted
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets.text import TextCond

CLIP_LENGTH = 77
FAMILIES = {  # family -> (role -> (encoder dir, tokenizer dir)), default max_sequence_length
    "sd3": ({"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
             "t5": ("text_encoder_3", "tokenizer_3")}, 256),
    "flux": ({"clip_l": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")}, 512),
}


def patch_flax_t5_clip() -> None:
    """Make transformers' Flax T5 run on jax >= 0.7 (see the module docstring); idempotent."""
    if "a_max" in inspect.signature(jnp.clip).parameters:
        return
    # Deferred: transformers takes seconds to import; only loading a T5 encoder needs it.
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
