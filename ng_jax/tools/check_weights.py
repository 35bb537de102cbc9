"""Validate a local weights directory against a model family's key map, without loading it.

    python -m ng_jax.tools.check_weights --family sd3 --weights_dir WEIGHTS_DIR
    python -m ng_jax.tools.check_weights --family sd35 --weights_dir WEIGHTS_DIR        # SD3.5 (the transformer)
    python -m ng_jax.tools.check_weights --family flux1_dev --weights_dir WEIGHTS_DIR   # FLUX.1 transformer
    python -m ng_jax.tools.check_weights --family vae --weights_dir WEIGHTS_DIR         # WEIGHTS_DIR/vae

Reads only the safetensors headers and config.json; prints a summary (files, tensor and parameter
counts, stored dtypes, and every missing / unexpected / mis-shaped key) and exits 0 when the
directory would load strictly, 1 when it would not, 2 when it cannot be read at all. The last line
is a JSON summary for scripts. Families live in `CHECKERS`: `name -> fn(weights_dir) -> dict`
with the keys of `summary_dict`. The text encoders are checked when they load (strictly, naming
every problem); the RL configs load all components at start-up.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable, Sequence

import jax

from ng_jax.models.nets.vae import make_vae
from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights.flux import flux_keymap
from ng_jax.models.weights.safetensors import SafetensorsDir, WeightsError
from ng_jax.models.weights.sd3 import POS_EMBED_BUFFER, check_pos_embed, sd3_keymap
from ng_jax.models.weights.transformer import model_config_from_diffusers, transformer_dir
from ng_jax.models.weights.vae import vae_config_from_diffusers, vae_keymap


def summary_dict(family: str, directory: str, reader, keymap, want_shapes: dict, ignore: Sequence[str] = (),
                 extra_problems: Sequence[str] = (), info: dict | None = None) -> dict:
    """Compare a key map ({flax path: Source}) and the model's shapes with a SafetensorsDir's headers."""
    used = {s.key for p, s in keymap.items() if p in want_shapes}
    missing = sorted({s.key for p, s in keymap.items() if p in want_shapes and s.key not in reader.key_file})
    unmapped = sorted("/".join(p) for p in want_shapes if p not in keymap)
    unexpected = sorted(k for k in reader.key_file if k not in used and not k.startswith(tuple(ignore)))
    mis_shaped = []
    for p, s in keymap.items():
        if p in want_shapes and s.key in reader.key_file:
            stored = reader.shape(s.key)
            got = tuple(s.shape_fn(stored) if s.shape_fn else stored)
            if got != tuple(want_shapes[p]):
                mis_shaped.append(f"{s.key}: checkpoint {tuple(stored)}, model wants {tuple(want_shapes[p])} "
                                  f"(as {'/'.join(p)})")
    dtypes = collections.Counter(reader.dtype(k) for k in reader.key_file)
    n_params = sum(int(_prod(reader.shape(k))) for k in reader.key_file if k in used)
    problems = list(extra_problems)
    for label, items in (("missing", missing), ("unmapped", unmapped), ("unexpected", unexpected),
                         ("mis_shaped", mis_shaped)):
        problems += [f"{label}: {x}" for x in items]
    return {"family": family, "weights_dir": directory, "files": sorted(set(reader.key_file.values())),
            "tensors": len(reader.key_file), "params": n_params, "dtypes": dict(sorted(dtypes.items())),
            "missing": missing, "unmapped": unmapped, "unexpected": unexpected, "mis_shaped": mis_shaped,
            "info": info or {}, "ok": not problems, "problems": problems}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _want(abstract) -> dict:
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def check_sd3(weights_dir: str) -> dict:
    tdir = transformer_dir(weights_dir)
    cfg = model_config_from_diffusers(tdir)
    if cfg.family not in ("sd3", "sd35"):
        raise WeightsError(f"{tdir}: config.json describes a {cfg.family} transformer, not SD3 / SD3.5")
    reader = SafetensorsDir(tdir)
    abstract = jax.eval_shape(make_velocity_model(cfg).init, jax.random.key(0))  # unrolled: per-layer keys
    extra = []
    try:
        check_pos_embed(reader, cfg)
    except WeightsError as err:
        extra.append(f"pos_embed: {err}")
    info = {"variant": str(cfg.family), "num_layers": int(cfg.num_layers),
            "hidden": int(cfg.num_attention_heads) * int(cfg.attention_head_dim), "qk_norm": cfg.qk_norm or None,
            "dual_attention_layers": list(cfg.dual_attention_layers),
            "pos_embed_max_size": cfg.pos_embed_max_size or None}
    return summary_dict("sd3", tdir, reader, sd3_keymap(abstract, cfg), _want(abstract), ignore=(POS_EMBED_BUFFER,),
                        extra_problems=extra, info=info)


def check_flux(weights_dir: str) -> dict:
    """FLUX.1 (dev / schnell-like) WEIGHTS_DIR/transformer against the unrolled Flax tree."""
    tdir = transformer_dir(weights_dir)
    cfg = model_config_from_diffusers(tdir, family="flux1_dev")
    reader = SafetensorsDir(tdir)
    abstract = jax.eval_shape(make_velocity_model(cfg).init, jax.random.key(0))
    info = {"num_layers": int(cfg["num_layers"]), "num_single_layers": int(cfg["num_single_layers"]),
            "hidden": int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
            "guidance_embeds": bool(cfg["guidance_embeds"])}
    return summary_dict("flux1_dev", tdir, reader, flux_keymap(abstract), _want(abstract), info=info)


def check_vae(weights_dir: str) -> dict:
    """The AutoencoderKL in WEIGHTS_DIR/vae (SD3 / FLUX / SD1 layouts)."""
    vdir = os.path.join(weights_dir, "vae") if os.path.isdir(os.path.join(weights_dir, "vae")) else weights_dir
    cfg = vae_config_from_diffusers(vdir)
    reader = SafetensorsDir(vdir)
    abstract = jax.eval_shape(make_vae(cfg).init, jax.random.key(0))
    info = {"latent_channels": cfg.latent_channels, "downsample_factor": cfg.downsample_factor,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor}
    return summary_dict("vae", vdir, reader, vae_keymap(abstract, cfg, reader.keys()), _want(abstract), info=info)


CHECKERS: dict[str, Callable[[str], dict]] = {"sd3": check_sd3, "sd35": check_sd3, "flux1_dev": check_flux,
                                              "vae": check_vae}


def format_summary(s: dict) -> str:
    lines = [f"weights_dir: {s['weights_dir']}",
             f"family: {s['family']} {json.dumps(s['info'])}" if s["info"] else f"family: {s['family']}",
             f"files: {len(s['files'])} ({', '.join(s['files'][:4])}{', ...' if len(s['files']) > 4 else ''})",
             f"tensors: {s['tensors']}  parameters (mapped): {s['params']:,}",
             f"dtypes: {', '.join(f'{k} x{v}' for k, v in s['dtypes'].items())}"]
    for label in ("missing", "unmapped", "unexpected", "mis_shaped"):
        items = s[label]
        lines.append(f"{label}: {len(items)}" + "".join(f"\n  {x}" for x in items[:50])
                     + (f"\n  ... {len(items) - 50} more" if len(items) > 50 else ""))
    lines += [f"problem: {p}" for p in s["problems"] if p.startswith("pos_embed")]
    lines.append("OK" if s["ok"] else f"FAILED: {len(s['problems'])} problem(s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ng_jax.tools.check_weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(CHECKERS))
    ap.add_argument("--weights_dir", required=True)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.weights_dir):
        print(f"check_weights: error: weights directory not found: {args.weights_dir}", file=sys.stderr)
        return 2
    try:
        summary = CHECKERS[args.family](args.weights_dir)
    except (WeightsError, OSError, ValueError) as err:
        print(f"check_weights: error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(json.dumps({k: summary[k] for k in ("family", "ok", "params", "tensors", "dtypes", "missing", "unmapped",
                                              "unexpected", "mis_shaped")}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
