"""Prompt and image sources for training: prompt files, and deterministic, resumable batch streams.

    prompts = read_prompt_file("prompts.txt")          # or .jsonl with {"prompt": ..., "category": ...}
    stream = PromptStream(prompts, seed=0)
    batch = stream.next_batch(16)
    saved = stream.state()                              # JSON-serialisable; PromptStream(...).restore(saved)

A stream's order depends only on (seed, epoch): epoch e is the permutation
`np.random.default_rng([seed, e]).permutation(n)`, and batches run on across epoch boundaries.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from ng_jax.data.prompts import stable_hash
from ng_jax.data.world import PromptError, parse_prompt

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _check_prompt(prompt: str, where: str) -> str:
    try:
        parse_prompt(prompt)
    except PromptError as err:
        raise PromptError(f"{where}: {err}") from None
    return prompt


def read_prompt_file(path: str | os.PathLike, *, shapes_grammar: bool = True) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with '#' skipped) or a
    JSONL file (`{"prompt": ..., "category": ...}` per line, category optional and checked). JSONL is
    recognised by a .jsonl/.ndjson suffix or a first entry starting with '{'. With `shapes_grammar`
    (the toy world) every prompt must parse and categories are checked; without (free-form prompts
    for real models, e.g. Pick-a-Pic) any non-empty text is a prompt and a category is not checked.
    Raises FileNotFoundError, ValueError or PromptError (a ValueError) naming the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (or is not a file)")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    entries = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not entries:
        raise ValueError(f"prompt file {path!r} holds no prompts (only blank or '#' comment lines)")
    is_jsonl = path.lower().endswith(_JSONL_SUFFIXES) or entries[0][1].startswith("{")
    prompts = []
    for n, line in entries:
        where = f"{path}:{n}"
        if not is_jsonl:
            prompts.append(_check_prompt(line, where) if shapes_grammar else line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); expected one object like "
                             f'{{"prompt": "a red circle"}} per line') from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f'{where}: expected a JSON object with a "prompt" key, got {line[:80]!r}')
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f'{where}: "prompt" must be a string, got {type(prompt).__name__}')
        prompt = prompt.strip()
        if not shapes_grammar:
            if not prompt:
                raise ValueError(f'{where}: empty "prompt"')
            prompts.append(prompt)
            continue
        prompt = _check_prompt(prompt, where)
        if "category" in record:
            actual = parse_prompt(prompt).category
            if record["category"] != actual:
                raise ValueError(f"{where}: category {record['category']!r} does not match the prompt "
                                 f"{prompt!r}, whose category is {actual!r}")
        prompts.append(prompt)
    return prompts


def read_prompt_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """prompt -> the other fields of its line, for a JSONL prompt file (GenEval's
    `evaluation_metadata.jsonl` layout: {"tag", "include", "exclude", "prompt"}); {} for a text file or
    lines without other fields. Rewards that use metadata (e.g. a GenEval reward server) receive it with
    each image. Two lines with the same prompt and different metadata are a ValueError."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        entries = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    entries = [(n, line) for n, line in entries if line and not line.startswith("#")]
    if not entries or not (path.lower().endswith(_JSONL_SUFFIXES) or entries[0][1].startswith("{")):
        return {}
    out: dict[str, dict] = {}
    for n, line in entries:
        record = json.loads(line)  # read_prompt_file has validated the file
        prompt = str(record.pop("prompt")).strip()
        if not record:
            continue
        if prompt in out and out[prompt] != record:
            raise ValueError(f"{path}:{n}: prompt {prompt!r} appears again with other metadata; one prompt, one "
                             "metadata record")
        out[prompt] = record
    return out


class EpochShuffler:
    """Endless, resumable index order over `num_items`: a fresh seeded permutation each epoch."""

    def __init__(self, num_items: int, seed: int = 0, fingerprint: int | None = None):
        if not isinstance(num_items, (int, np.integer)) or num_items < 1:
            raise ValueError(f"a stream needs at least one item, got num_items={num_items!r}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.fingerprint = fingerprint
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self, n: int) -> np.ndarray:
        """The next `n` indices, moving into the next epoch (a new permutation) when one runs out."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"batch size must be a positive integer, got {n!r}")
        out = []
        while n > 0:
            take = min(n, self.num_items - self.position)
            out.append(self._order[self.position:self.position + take])
            self.position += take
            n -= take
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(out)

    def state(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items}
        if self.fingerprint is not None:
            state["fingerprint"] = self.fingerprint
        return state

    def restore(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"stream state lacks {sorted(missing)}; expected the dict returned by state()")
        for key in ("seed", "num_items", "fingerprint"):
            mine = getattr(self, key)
            if key in state and mine is not None and state[key] != mine:
                raise ValueError(f"stream state was saved with {key}={state[key]!r} but this stream has "
                                 f"{key}={mine!r}; restore into a stream over the same items and seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"stream state epoch={epoch}, position={position} out of range for "
                             f"{self.num_items} items")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)


def _fingerprint(texts: Sequence[str]) -> int:
    return stable_hash("\n".join(texts))


class PromptStream:
    """Deterministic, resumable prompt batches for RL rollouts, reshuffled every epoch."""

    def __init__(self, prompts: Sequence[str], seed: int = 0):
        if isinstance(prompts, str):
            raise ValueError("PromptStream takes a sequence of prompts, got a single string")
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("PromptStream needs at least one prompt, got an empty list")
        self._order = EpochShuffler(len(self.prompts), seed, _fingerprint(self.prompts))

    def next_batch(self, n: int) -> list[str]:
        return [self.prompts[i] for i in self._order.next_indices(n)]

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def state(self) -> dict[str, int]:
        """JSON-serialisable position in the stream: epoch, position (plus seed and a fingerprint of the
        prompt list, checked by restore)."""
        return self._order.state()

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state()` was taken."""
        self._order.restore(state)


def as_text(value) -> str:
    """A text feature as a data source returns it (bytes or str) as str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class ImageTextStream:
    """Shuffled, deterministic, resumable numpy batches {"image": uint8 [B, H, W, 3], "prompt": [str] * B}
    from a random-access source (a tfds data source from `tfds_shapes.load_image_text`, or any sequence
    of {"image", "prompt"} records)."""

    def __init__(self, source, batch_size: int, seed: int = 0):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.source = source
        self.batch_size = int(batch_size)
        self._order = EpochShuffler(len(source), seed)

    def _records(self, indices: np.ndarray) -> list[dict]:
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            return list(getitems([int(i) for i in indices]))
        return [self.source[int(i)] for i in indices]

    def next_batch(self, n: int | None = None) -> dict[str, Any]:
        """The next `n` records (default: the stream's batch size)."""
        records = self._records(self._order.next_indices(self.batch_size if n is None else n))
        for key in ("image", "prompt"):
            if key not in records[0]:
                raise ValueError(f"source records need an {key!r} field, got fields {sorted(records[0])}")
        images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records])
        return {"image": images, "prompt": [as_text(r["prompt"]) for r in records]}

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def state(self) -> dict[str, int]:
        return self._order.state()

    def restore(self, state: dict[str, Any]) -> None:
        self._order.restore(state)


class MixtureStream:
    """Batches drawn from several named streams in fixed proportions (e.g. one per prompt category, so
    that 10 single-object prompts are not drowned by 500 colour-attribution prompts).

    Each batch takes `floor(w_i * B)` records from stream i and hands the remainder out by a seeded
    draw that depends only on (seed, batch index), so the order is deterministic and resumable."""

    def __init__(self, streams: dict[str, ImageTextStream], weights: dict[str, float], batch_size: int, seed: int = 0):
        if not streams:
            raise ValueError("MixtureStream needs at least one stream")
        if set(weights) != set(streams):
            raise ValueError(f"weights name {sorted(weights)}, streams name {sorted(streams)}; they must match")
        w = np.asarray([float(weights[k]) for k in streams], np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.names = list(streams)
        self.streams = streams
        self.probs = w / w.sum()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches = 0

    def _counts(self) -> np.ndarray:
        base = np.floor(self.probs * self.batch_size).astype(int)
        rest = self.batch_size - int(base.sum())
        if rest:
            rng = np.random.default_rng([self.seed, self.batches])
            base += rng.multinomial(rest, self.probs)
        return base

    def next_batch(self) -> dict[str, Any]:
        images, prompts = [], []
        for name, n in zip(self.names, self._counts()):
            if n:
                part = self.streams[name].next_batch(int(n))
                images.append(part["image"])
                prompts.extend(part["prompt"])
        self.batches += 1
        order = np.random.default_rng([self.seed, self.batches, 1]).permutation(self.batch_size)
        return {"image": np.concatenate(images)[order], "prompt": [prompts[i] for i in order]}

    def state(self) -> dict[str, Any]:
        return {"batches": self.batches, "streams": {k: s.state() for k, s in self.streams.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        if set(state.get("streams", {})) != set(self.streams):
            raise ValueError(f"mixture state names streams {sorted(state.get('streams', {}))}, this mixture "
                             f"has {sorted(self.streams)}")
        for k, s in self.streams.items():
            s.restore(state["streams"][k])
        self.batches = int(state["batches"])
