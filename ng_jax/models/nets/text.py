"""Toy text conditioning shaped like SD3's: a word-level tokenizer and a small transformer encoder.

The encoder returns what an SD3-style velocity model consumes: per-token embeddings (`tokens`,
the role of CLIP+T5 hidden states), a pooled embedding (`pooled`, the role of CLIP's pooled
output) and the token mask. The tokenizer is a `transformers.PreTrainedTokenizerFast` built from
a `tokenizers` WordLevel model over the shapes world's vocabulary, so it behaves like any
Hugging Face tokenizer (`[BOS] ... [EOS]`, padding to `max_length`). The empty prompt `""` is the
unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from ng_jax.data import world
from ng_jax.errors import UserError
from ng_jax.models.nets.layers import MultiHeadAttention, TransformerMLP

EMPTY_PROMPT = ""
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID = 0


@flax.struct.dataclass
class TextCond:
    """What the velocity model is conditioned on (all with a leading batch dimension)."""

    tokens: jax.Array  # [B, L, context_dim]
    pooled: jax.Array  # [B, pooled_dim]
    mask: jax.Array    # bool [B, L]; False = padding


def vocabulary() -> list[str]:
    """Every word of the shapes-world grammar (colours, shapes, plurals, sizes, numbers, relations)."""
    words = set(world.COLORS) | set(world.SHAPES) | set(world.SIZES)
    words |= {"circles", "squares", "triangles", "crosses"}
    words |= {"a", "an", "and", "one", "two", "three", "four", "1", "2", "3", "4", "of", "the", "to", "on", "top"}
    words |= {"left", "right", "above", "below", "over", "under", "beneath", "underneath"}
    words |= {"photo", "image", "picture", "drawing", "rendering", "render", ","}
    return list(SPECIAL_TOKENS) + sorted(words)


@functools.lru_cache(maxsize=None)
def build_tokenizer(max_length: int):
    """A `PreTrainedTokenizerFast` (WordLevel, lower-cased, [BOS]/[EOS] added, padded to max_length)."""
    # Deferred: importing transformers takes seconds, and only building a tokenizer needs it.
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", model_max_length=max_length)


class TokenizeError(UserError, ValueError):
    """A prompt the toy tokenizer cannot represent faithfully (unknown word, too long)."""


def tokenize(tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [B, L], mask bool [B, L]). Unknown words and over-long prompts raise:
    silently dropping words would train and evaluate on a different prompt than the one named."""
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a sequence of prompts, not a single string")
    max_length = tokenizer.model_max_length
    enc = tokenizer(list(prompts), padding="max_length", truncation=False, max_length=max_length)
    ids = enc["input_ids"]
    unk = tokenizer.unk_token_id
    for prompt, row in zip(prompts, ids):
        if len(row) > max_length:
            raise TokenizeError(f"prompt {prompt!r} has {len(row)} tokens; the text encoder takes at most "
                                f"{max_length} (text.max_length)")
        if unk in row:
            words = [w for w, i in zip(tokenizer.convert_ids_to_tokens(row), row) if i == unk]
            bad = [w for w in prompt.lower().replace(",", " , ").split() if w not in tokenizer.get_vocab()]
            raise TokenizeError(f"prompt {prompt!r}: word(s) {bad or words} are not in the toy vocabulary")
    return np.asarray(ids, np.int32), np.asarray(enc["attention_mask"], bool)


class _EncoderBlock(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(epsilon=1e-5, name="layer_norm1")(x)
        x = x + MultiHeadAttention(self.width, self.heads, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=1e-5, name="layer_norm2")(x)
        return x + TransformerMLP(self.width, 4 * self.width, name="mlp")(h)


class ToyTextEncoder(nn.Module):
    vocab_size: int
    width: int
    depth: int
    heads: int
    max_length: int
    pooled_dim: int

    @nn.compact
    def __call__(self, ids, mask) -> TextCond:
        x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(ids)
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (self.max_length, self.width))
        x = x + pos[None, : ids.shape[1]]
        for i in range(self.depth):
            x = _EncoderBlock(self.width, self.heads, name=f"layers_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=1e-5, name="final_layer_norm")(x)
        m = mask.astype(x.dtype)[..., None]
        mean = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        pooled = nn.Dense(self.pooled_dim, name="text_projection")(mean)
        return TextCond(tokens=x, pooled=pooled, mask=mask)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """tokenizer + `init(rng) -> params` + `encode(params, ids, mask) -> TextCond` (pure, jittable)."""

    module: ToyTextEncoder
    tokenizer: object

    def init(self, rng) -> dict:
        ids = jnp.zeros((1, self.module.max_length), jnp.int32)
        return self.module.init(rng, ids, jnp.ones(ids.shape, bool))["params"]

    def encode(self, params, ids, mask) -> TextCond:
        return self.module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))

    def encode_prompts(self, params, prompts: Sequence[str]) -> TextCond:
        return self.encode(params, *tokenize(self.tokenizer, prompts))


def make_text_encoder(cfg) -> TextEncoder:
    tokenizer = build_tokenizer(int(cfg.max_length))
    module = ToyTextEncoder(vocab_size=len(tokenizer.get_vocab()), width=int(cfg.width), depth=int(cfg.depth),
                            heads=int(cfg.heads), max_length=int(cfg.max_length), pooled_dim=int(cfg.pooled_dim))
    return TextEncoder(module=module, tokenizer=tokenizer)
