"""A self-describing model bundle on disk: `config.json` + `params.msgpack`.

This is how the shipped reference model travels (ng_jax/assets/reference): the text encoder and
velocity-model configs, the sampling defaults it was validated with, and the parameters
`{"text": ..., "velocity": ...}`. Loading checks every tensor's path and shape against the
config's freshly initialised abstract tree and names every mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from ng_jax import storage
from ng_jax.errors import UserError
from ng_jax.models.jsonfile import read_json
from ng_jax.models.nets.text import make_text_encoder
from ng_jax.models.velocity import make_velocity_model

BUNDLE_VERSION = 1
DEFAULT_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "reference")


class BundleError(UserError, RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    model_cfg: ml_collections.ConfigDict
    text_cfg: ml_collections.ConfigDict
    sampling: dict
    params: Any  # {"text": ..., "velocity": ...}
    info: dict = dataclasses.field(default_factory=dict)


def _flat_shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


STORAGE_DTYPES = ("float32", "float16")


def save_bundle(directory: str, bundle: ModelBundle, storage_dtype: str = "float32") -> str:
    """Write a bundle. `storage_dtype="float16"` halves the file (the shipped reference); loading always
    gives float32, so what a bundle computes is what its stored (rounded) weights compute."""
    if storage_dtype not in STORAGE_DTYPES:
        raise BundleError(f"storage dtype {storage_dtype!r}; expected one of {STORAGE_DTYPES}")
    storage.makedirs(directory)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32).astype(storage_dtype), bundle.params)
    blob = serialization.to_bytes(params)
    meta = {
        "version": BUNDLE_VERSION,
        "params_dtype": storage_dtype,
        "model": bundle.model_cfg.to_dict(),
        "text": bundle.text_cfg.to_dict(),
        "sampling": dict(bundle.sampling),
        "info": dict(bundle.info),
        "params_sha256": hashlib.sha256(blob).hexdigest(),
    }
    storage.write_bytes(os.path.join(directory, "params.msgpack"), blob)
    storage.write_text(os.path.join(directory, "config.json"),
                       json.dumps(meta, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    return directory


def bundle_fingerprint(directory: str | None = None) -> str:
    """The parameter checksum recorded in a bundle's config.json (default: the shipped reference): which
    weights a run started from, without reading them."""
    path = os.path.join(directory or DEFAULT_REFERENCE, "config.json")
    try:
        sha = json.loads(storage.path(path).read_text()).get("params_sha256")
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"model bundle {directory or DEFAULT_REFERENCE}: cannot read config.json ({err})") from None
    if not sha:
        raise BundleError(f"model bundle {directory or DEFAULT_REFERENCE}: config.json records no params_sha256")
    return str(sha)


def load_bundle(directory: str | None = None) -> ModelBundle:
    """Load and validate a bundle (default: the shipped reference)."""
    directory = directory or DEFAULT_REFERENCE
    cfg_path, params_path = os.path.join(directory, "config.json"), os.path.join(directory, "params.msgpack")
    for path in (cfg_path, params_path):
        if not storage.is_file(path):
            raise BundleError(f"model bundle {directory}: missing {os.path.basename(path)}")
    meta = read_json(directory, error=BundleError, where=f"model bundle {directory}")
    if meta.get("version") != BUNDLE_VERSION:
        raise BundleError(f"model bundle {directory}: version {meta.get('version')}, expected {BUNDLE_VERSION}")
    blob = storage.path(params_path).read_bytes()
    if meta.get("params_sha256") and hashlib.sha256(blob).hexdigest() != meta["params_sha256"]:
        raise BundleError(f"model bundle {directory}: params.msgpack checksum mismatch (corrupt or replaced)")
    model_cfg = ml_collections.ConfigDict(meta["model"])
    text_cfg = ml_collections.ConfigDict(meta["text"])
    text = make_text_encoder(text_cfg)
    model = make_velocity_model(model_cfg)
    target = jax.eval_shape(lambda: {"text": text.init(jax.random.key(0)), "velocity": model.init(jax.random.key(0))})
    try:
        raw = serialization.msgpack_restore(blob)
    except Exception as err:
        raise BundleError(f"model bundle {directory}: cannot decode params.msgpack ({err})") from None
    want, got = _flat_shapes(target), _flat_shapes(raw)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or shape:
        raise BundleError(
            f"model bundle {directory} does not match its config: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"mis-shaped {[(k, got[k], want[k]) for k in shape[:5]]}")
    raw = jax.tree.map(lambda x: np.asarray(x, np.float32) if isinstance(x, np.ndarray) else x, raw)
    params = serialization.from_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target), raw)
    return ModelBundle(model_cfg=model_cfg, text_cfg=text_cfg, sampling=meta.get("sampling", {}),
                       params=params, info=meta.get("info", {}))
