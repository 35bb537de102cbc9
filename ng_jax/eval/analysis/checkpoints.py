"""Naming the models an analysis compares.

A checkpoint list is a comma-separated string (or a sequence) of entries `[label=]path`:

- `reference` - the run's reference bundle (`config.reference`; "" is the shipped one);
- a model-bundle directory (`config.json` + `params.msgpack`, as `ng_jax.models.bundle` writes);
- an RL workdir: its `policy/` bundle, exported by the RL job when it finishes.

Labels default to the entry (the workdir's name for workdirs).
"""

from __future__ import annotations

import os
from typing import Sequence

from ng_jax import storage
from ng_jax.models.bundle import DEFAULT_REFERENCE, BundleError, ModelBundle, load_bundle

POLICY_DIR = "policy"  # where the RL job exports the final policy inside its workdir


def _is_bundle(path: str) -> bool:
    return all(storage.is_file(path, name) for name in ("config.json", "params.msgpack"))


def resolve(spec: str | Sequence[str], reference: str = "") -> list[tuple[str, str]]:
    """-> [(label, bundle_dir)]; BundleError naming every entry that is neither a bundle nor a finished
    RL workdir."""
    entries = [e.strip() for e in (spec.split(",") if isinstance(spec, str) else spec) if e and e.strip()]
    if not entries:
        raise BundleError("no checkpoints given (analysis.checkpoints is empty)")
    out, bad = [], []
    for entry in entries:
        label, _, path = entry.partition("=") if "=" in entry else ("", "", entry)
        path = path.strip()
        if path == "reference":
            out.append((label or "reference", reference or DEFAULT_REFERENCE))
            continue
        if _is_bundle(path):
            out.append((label or os.path.basename(os.path.normpath(path)), path))
        elif _is_bundle(os.path.join(path, POLICY_DIR)):
            out.append((label or os.path.basename(os.path.normpath(path)), os.path.join(path, POLICY_DIR)))
        else:
            bad.append(path)
    if bad:
        raise BundleError(f"not a model bundle nor a finished RL workdir (no {POLICY_DIR}/ bundle): {', '.join(bad)}")
    labels = [label for label, _ in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise BundleError(f"checkpoint labels must be unique, repeated: {dupes}; name them as label=path")
    return out


def load_matching(path: str, reference: ModelBundle) -> ModelBundle:
    """Load a bundle and check it is the reference's architecture (same model and text configs)."""
    bundle = load_bundle(path)
    if bundle.model_cfg.to_dict() != reference.model_cfg.to_dict() or \
            bundle.text_cfg.to_dict() != reference.text_cfg.to_dict():
        raise BundleError(f"model bundle {path} has another architecture than the reference; "
                          "analyses compare post-trained models with their own reference")
    return bundle
