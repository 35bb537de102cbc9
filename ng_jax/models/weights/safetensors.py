"""Loading diffusers/transformers-format weights from a local directory into Flax parameter trees.

The layout a user points `model.weights_dir` at (as diffusers saves it):

    WEIGHTS_DIR/transformer/{config.json, diffusion_pytorch_model.safetensors
                             | diffusion_pytorch_model-0000K-of-0000N.safetensors + *.safetensors.index.json}
    WEIGHTS_DIR/vae/..., WEIGHTS_DIR/text_encoder*/..., WEIGHTS_DIR/tokenizer*/...

A family's key map is a dict `{flax path (tuple of str): Source(key, transform)}`: every
parameter of the Flax tree names the checkpoint tensor it comes from and how it is transformed
(e.g. a Linear weight `[out, in]` transposed to a Dense kernel `[in, out]`). `load_params` is
strict: it raises `WeightsError` naming every Flax parameter without a source, every checkpoint
tensor nothing uses, and every shape mismatch, before loading anything. Tensors are then read one
at a time (safetensors memory maps), cast by the dtype policy and placed directly into their
target sharding (`jax.make_array_from_callback`: only the slices of this host's devices are
copied to devices), so the whole model never sits on one device, and a host holds at most one
full tensor in memory beyond its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from ng_jax.errors import UserError

Path = tuple[str, ...]


class WeightsError(UserError, RuntimeError):
    """A weights directory that cannot be loaded (missing files, unmapped / missing / mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class Source:
    key: str                                                    # tensor name in the checkpoint
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied after reading (numpy)
    shape_fn: Callable[[tuple], tuple] | None = None             # the transformed shape, from the stored one
    inverse: Callable[[np.ndarray], np.ndarray] | None = None    # transform's inverse (exports back to the layout)


def linear(key_prefix: str) -> dict[str, Source]:
    """torch Linear `{prefix}.weight [out, in]`, `.bias` -> Dense `kernel [in, out]`, `bias`."""
    return {"kernel": Source(f"{key_prefix}.weight", lambda w: w.T, lambda s: s[::-1], lambda k: k.T),
            "bias": Source(f"{key_prefix}.bias")}


def conv2d(key_prefix: str) -> dict[str, Source]:
    """torch Conv2d `weight [out, in, kh, kw]` -> Flax Conv `kernel [kh, kw, in, out]`."""
    return {"kernel": Source(f"{key_prefix}.weight", lambda w: w.transpose(2, 3, 1, 0),
                             lambda s: (s[2], s[3], s[1], s[0]), lambda k: k.transpose(3, 2, 0, 1)),
            "bias": Source(f"{key_prefix}.bias")}


def norm(key_prefix: str, scale: str = "weight", bias: str | None = "bias") -> dict[str, Source]:
    out = {"scale": Source(f"{key_prefix}.{scale}")}
    if bias:
        out["bias"] = Source(f"{key_prefix}.{bias}")
    return out


def flatten_map(nested: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Source]:
    """Nested dicts of Sources (as `linear`/`conv2d` build them) -> {flax path: Source}."""
    out: dict[Path, Source] = {}
    for k, v in nested.items():
        if isinstance(v, Source):
            out[prefix + (k,)] = v
        else:
            out.update(flatten_map(v, prefix + (k,)))
    return out


class SafetensorsDir:
    """The tensors of one component directory (e.g. WEIGHTS_DIR/transformer), single file or sharded."""

    def __init__(self, directory: str, prefix: str = "diffusion_pytorch_model"):
        self.directory = directory
        if not os.path.isdir(directory):
            raise WeightsError(f"weights directory not found: {directory}")
        index = [f for f in os.listdir(directory) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(directory, index[0])) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{os.path.join(directory, index[0])}: no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise WeightsError(f"{directory}: no *.safetensors files (expected {prefix}.safetensors or a "
                                   "sharded set with its index JSON)")
            weight_map = None
        self._handles = {}
        self.key_file: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise WeightsError(f"{directory}: the index names {name}, which is missing")
            handle = safe_open(path, framework="numpy")
            self._handles[name] = handle
            for key in handle.keys():
                self.key_file[key] = name
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.key_file)
            if missing:
                raise WeightsError(f"{directory}: tensors listed in the index but absent from the shards: {missing[:10]}")

    def keys(self) -> list[str]:
        return sorted(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.key_file[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it ("F32", "BF16", "F16", ...)."""
        return self._handles[self.key_file[key]].get_slice(key).get_dtype()

    def get(self, key: str) -> np.ndarray:
        handle = self._handles[self.key_file[key]]
        if self.dtype(key) == "BF16":
            # safetensors' numpy backend cannot build bfloat16 arrays (most released diffusion
            # checkpoints are bf16): read the raw bytes and view them as ml_dtypes.bfloat16.
            return self._read_raw(self.key_file[key], key)
        return handle.get_tensor(key)

    def _read_raw(self, name: str, key: str) -> np.ndarray:
        path = os.path.join(self.directory, name)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(header_len))[key]
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            raw = f.read(end - start)
        return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def _flat(tree) -> dict[Path, Any]:
    return {tuple(str(getattr(k, "key", k)) for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_map(keymap: Mapping[Path, Source], target, reader: SafetensorsDir,
              ignore_unused: Iterable[str] = ()) -> None:
    """Raise WeightsError naming every unmapped parameter, unused tensor and shape mismatch."""
    want = _flat(target)
    problems = []
    unmapped = sorted("/".join(p) for p in want if p not in keymap)
    extra_map = sorted("/".join(p) for p in keymap if p not in want)
    absent = sorted({s.key for p, s in keymap.items() if p in want and s.key not in reader.key_file})
    used = {s.key for s in keymap.values()}
    ignore = tuple(ignore_unused)
    unused = sorted(k for k in reader.key_file if k not in used and not k.startswith(ignore))
    shapes = []
    for p, s in keymap.items():
        if p in want and s.key in reader.key_file:
            stored = reader.shape(s.key)
            got = s.shape_fn(stored) if s.shape_fn else stored
            if tuple(got) != tuple(want[p].shape):
                shapes.append(f"{'/'.join(p)} <- {s.key}: checkpoint {stored} gives {tuple(got)}, model wants "
                              f"{tuple(want[p].shape)}")
    for label, items in (("parameters with no source in the key map", unmapped),
                         ("key-map entries for parameters the model does not have", extra_map),
                         ("tensors missing from the checkpoint", absent),
                         ("checkpoint tensors nothing uses (unexpected)", unused), ("mis-shaped", shapes)):
        if items:
            problems.append(f"{len(items)} {label}: {items[:20]}{' ...' if len(items) > 20 else ''}")
    if problems:
        raise WeightsError(f"{reader.directory}: " + "; ".join(problems))


def load_params(keymap: Mapping[Path, Source], target, reader: SafetensorsDir, *, dtype=None, shardings=None,
                ignore_unused: Iterable[str] = ()):
    """Strictly load a parameter tree shaped like `target` (arrays or ShapeDtypeStructs).

    dtype: None keeps the target's dtypes; else every parameter is cast to it (e.g. bf16 frozen base).
    shardings: None (default device) or a tree of Shardings like `target`; each tensor goes straight
    into its sharding, read slice by slice, one tensor at a time.
    """
    check_map(keymap, target, reader, ignore_unused)
    flat_sh = _flat(shardings) if shardings is not None else {}
    leaves_with_path = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for path, leaf in leaves_with_path[0]:
        p = tuple(str(getattr(k, "key", k)) for k in path)
        src = keymap[p]
        value = reader.get(src.key)
        if src.transform is not None:
            value = src.transform(value)
        value = np.ascontiguousarray(value, dtype=np.dtype(dtype or leaf.dtype))
        sh = flat_sh.get(p)
        if sh is None:
            out.append(jax.device_put(value))
        else:
            out.append(jax.make_array_from_callback(value.shape, sh, lambda idx, v=value: v[idx]))
        del value
    return jax.tree_util.tree_unflatten(leaves_with_path[1], out)
