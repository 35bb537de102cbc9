"""Scanned blocks <-> per-layer checkpoints, for every family with scanned blocks (SD3/SD3.5, FLUX).

With `scan_blocks` a run of identical blocks is one `nn.scan` whose parameters carry a leading layer
axis, while a checkpoint stores each layer's tensors (`transformer_blocks.3.attn.to_q.weight`). A
`Run` names one scanned subtree and the layers it stacks; a family says where its runs are
(`weights.sd3.runs`, `weights.flux.runs`) and writes its key map for per-layer trees only:

- `unstack` / `stack` convert parameter trees (arrays or ShapeDtypeStructs) between the layouts;
- `stacked_keymap` lifts a per-layer key map to the scanned tree: each stacked parameter reads the
  virtual tensor `transformer_blocks.{a..b}.<rest>` (layers a..b stacked, the per-layer transform
  applied to each);
- `StackedReader` is the checkpoint view in which those virtual tensors exist;
- `load` checks the checkpoint strictly against the per-layer layout first (so an error names the
  real tensor, e.g. `transformer_blocks.1.attn.to_q.weight`), then reads one stack at a time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from ng_jax.models.weights.safetensors import Path, SafetensorsDir, Source, WeightsError, check_map, load_params

_VIRTUAL = re.compile(r"^(?P<layer>[A-Za-z_]+)\.\{(?P<a>\d+)\.\.(?P<b>\d+)\}\.(?P<rest>.+)$")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                    # the scanned subtree: "transformer_blocks_0_to_3" (SD3), "transformer_blocks" (FLUX)
    layer: str                   # per-layer name: params `{layer}_{i}`, checkpoint keys `{layer}.{i}.<rest>`
    first: int
    last: int                    # inclusive
    inner: tuple[str, ...] = ()  # path from `name` to the block's parameters (SD3's scan body: ("block",))

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def _members(runs: Sequence[Run]) -> set[str]:
    return {f"{r.layer}_{i}" for r in runs for i in r.layers}


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def unstack(params, runs: Sequence[Run]):
    """The scanned tree -> per-layer subtrees `{layer}_{i}` (arrays are sliced, ShapeDtypeStructs lose
    their leading axis)."""
    names = {r.name for r in runs}
    out = {k: v for k, v in params.items() if k not in names}
    for r in runs:
        for j, i in enumerate(r.layers):
            out[f"{r.layer}_{i}"] = jax.tree.map(
                lambda x, j=j: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                else x[j], _get(params[r.name], r.inner))
    return out


def stack(params, runs: Sequence[Run]):
    """Per-layer parameters -> the scanned layout of `runs` (numpy stacks on the host)."""
    out = {k: v for k, v in params.items() if k not in _members(runs)}
    for r in runs:
        block = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                             *[params[f"{r.layer}_{i}"] for i in r.layers])
        for p in reversed(r.inner):
            block = {p: block}
        out[r.name] = block
    return out


def stacked_source(src: Source, run: Run) -> Source:
    """The Source of layer `run.first` -> the Source of the stack `run.first..run.last`."""
    prefix = f"{run.layer}.{run.first}."
    if not src.key.startswith(prefix):
        raise WeightsError(f"{src.key}: a parameter of {run.layer}_{run.first} must read a {prefix}* tensor")
    key = f"{run.layer}.{{{run.first}..{run.last}}}.{src.key[len(prefix):]}"
    t, f = src.transform, src.shape_fn
    return Source(key, None if t is None else (lambda w: np.stack([t(x) for x in w])),
                  None if f is None else (lambda s: (s[0],) + tuple(f(tuple(s[1:])))))


def stacked_keymap(keymap_fn: Callable, abstract, runs: Sequence[Run]) -> dict[Path, Source]:
    """{flax path: Source} for the (possibly scanned) tree `abstract`, from `keymap_fn(per-layer tree)`."""
    flat = keymap_fn(unstack(abstract, runs))
    first = {f"{r.layer}_{r.first}": r for r in runs}
    members = _members(runs)
    out = {}
    for path, src in flat.items():
        if path[0] in first:
            r = first[path[0]]
            out[(r.name,) + r.inner + path[1:]] = stacked_source(src, r)
        elif path[0] not in members:
            out[path] = src
    return out


class StackedReader:
    """A SafetensorsDir view that adds the virtual keys `layer.{a..b}.<rest>` (the per-layer tensors a..b
    stacked on a new leading axis) and hides the per-layer tensors they consume. A virtual key whose
    layers are not all in the checkpoint is left out (and its layers stay visible), so `check_map`
    reports it."""

    def __init__(self, reader: SafetensorsDir, virtual_keys: Iterable[str]):
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
        return [f"{m['layer']}.{i}.{m['rest']}" for i in range(int(m["a"]), int(m["b"]) + 1)]

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


def load(keymap_fn: Callable, abstract, runs: Sequence[Run], reader: SafetensorsDir, *, dtype=None, shardings=None,
         ignore_unused: Iterable[str] = ()):
    """Strictly load the tree `abstract` (scanned where `runs` say) with the per-layer `keymap_fn`;
    dtype / shardings as `safetensors.load_params`."""
    ignore = tuple(ignore_unused)
    if not runs:
        return load_params(keymap_fn(abstract), abstract, reader, dtype=dtype, shardings=shardings,
                           ignore_unused=ignore)
    flat = unstack(abstract, runs)
    check_map(keymap_fn(flat), flat, reader, ignore_unused=ignore)  # names the real per-layer tensors
    keymap = stacked_keymap(keymap_fn, abstract, runs)
    return load_params(keymap, abstract, StackedReader(reader, {s.key for s in keymap.values()}), dtype=dtype,
                       shardings=shardings, ignore_unused=ignore)
