"""Prompt embeddings of fixed prompt sets, computed once: `PromptEmbeddingCache`, keyed by prompt text
and encoder identity (`HFTextEncoders.identity`), in memory and optionally as an .npz file in a
directory (the workdir).

    enc, params = load_text_encoders(WEIGHTS_DIR, "sd3", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cache = PromptEmbeddingCache(functools.partial(enc.encode_prompts, params), enc.identity, workdir)
    cond = cache.get(prompts)                                          # TextCond of numpy arrays
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.models.nets.text import TextCond

__all__ = ["PromptEmbeddingCache"]


def _to_storable(x: np.ndarray) -> tuple[np.ndarray, str]:
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        return x.view(np.uint16), "bfloat16"
    return x, x.dtype.name


def _from_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(jnp.bfloat16) if dtype == "bfloat16" else x


class PromptEmbeddingCache:
    """Prompt embeddings of fixed prompt sets, computed once.

    `encode_fn(list of prompts) -> TextCond` (e.g. `functools.partial(enc.encode_prompts, params)`)
    is called only for prompts not yet cached, in batches of `batch_size` (unique prompts, in
    order of first appearance). Entries are keyed by the prompt text under one `identity` (say
    `HFTextEncoders.identity`); with `directory`, they are stored in
    `directory/prompt_embeds-<sha256(identity)[:16]>.npz` (written atomically after each miss
    batch, bf16 kept as bf16) and read back by a later cache with the same identity. `get`
    returns a TextCond of numpy arrays (the caller places them, e.g. with the batch sharding).
    `hits` / `misses` count prompts looked up.
    """

    def __init__(self, encode_fn: Callable[[list[str]], TextCond], identity: str, directory: str | None = None,
                 batch_size: int = 16):
        if not identity:
            raise ValueError("PromptEmbeddingCache needs a non-empty encoder identity")
        self.encode_fn, self.identity, self.batch_size = encode_fn, identity, int(batch_size)
        self.path = None
        if directory:
            tag = hashlib.sha256(identity.encode()).hexdigest()[:16]
            self.path = os.path.join(directory, f"prompt_embeds-{tag}.npz")
        self.entries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.hits = self.misses = 0
        if self.path and os.path.isfile(self.path):
            self._read()

    def _read(self) -> None:
        with np.load(self.path) as z:
            if str(z["identity"]) != self.identity:
                raise ValueError(f"{self.path} holds embeddings of encoder {str(z['identity'])!r}, not "
                                 f"{self.identity!r}; delete it or use another directory")
            tokens = _from_stored(z["tokens"], str(z["tokens_dtype"]))
            pooled = _from_stored(z["pooled"], str(z["pooled_dtype"]))
            for i, prompt in enumerate(z["prompts"].tolist()):
                self.entries[prompt] = (tokens[i], pooled[i], z["mask"][i])

    def _write(self) -> None:
        prompts = list(self.entries)
        tokens, tokens_dtype = _to_storable(np.stack([self.entries[p][0] for p in prompts]))
        pooled, pooled_dtype = _to_storable(np.stack([self.entries[p][1] for p in prompts]))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp.npz"
        np.savez(tmp, identity=np.asarray(self.identity), prompts=np.asarray(prompts, dtype=np.str_),
                 tokens=tokens, tokens_dtype=np.asarray(tokens_dtype), pooled=pooled,
                 pooled_dtype=np.asarray(pooled_dtype), mask=np.stack([self.entries[p][2] for p in prompts]))
        os.replace(tmp, self.path)

    def get(self, prompts: Sequence[str]) -> TextCond:
        if isinstance(prompts, str):
            raise TypeError("get expects a sequence of prompts, not a single string")
        prompts = [str(p) for p in prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        self.misses += sum(p in missing for p in prompts)
        self.hits += len(prompts) - sum(p in missing for p in prompts)
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            cond = jax.device_get(self.encode_fn(chunk))
            for j, prompt in enumerate(chunk):
                self.entries[prompt] = (np.asarray(cond.tokens[j]), np.asarray(cond.pooled[j]),
                                        np.asarray(cond.mask[j], bool))
        if missing and self.path:
            self._write()
        rows = [self.entries[p] for p in prompts]
        return TextCond(tokens=np.stack([r[0] for r in rows]), pooled=np.stack([r[1] for r in rows]),
                        mask=np.stack([r[2] for r in rows]))
