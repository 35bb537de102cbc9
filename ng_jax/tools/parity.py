"""Numerical parity of the Flax ports against diffusers (PyTorch) on a local weights directory.

    python -m ng_jax.tools.parity --family sd3 --weights_dir WEIGHTS_DIR [--seed 0] [--tol 1e-4]

Loads WEIGHTS_DIR (a diffusers save: WEIGHTS_DIR/transformer/...) into both implementations, runs
identical random inputs and prints ONE JSON line `{"family", "max_abs_err", "params", ...}`.
Exit status: 0 within `--tol`, 1 above it, 2 when the directory cannot be loaded (a one-line
`parity: error: ...` on stderr). Needs the test extra (torch + diffusers); float32 throughout.

Families live in `PARITY`: `name -> fn(weights_dir, seed, **options) -> dict` with at least
"max_abs_err" and "params". Others add theirs there (e.g. "flux", "vae").
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import numpy as np

DEFAULT_TOL = 1e-4


def parity_sd3(weights_dir: str, seed: int = 0, latent_size: int | None = None, batch: int = 2,
               text_tokens: int = 8) -> dict:
    """diffusers `SD3Transformer2DModel` vs the Flax MMDiT (families sd3 / sd35) on random inputs.

    latent_size defaults to min(sample_size, 32) (smaller grids use the cropped position table,
    and keep a CPU run of a full-size checkpoint short)."""
    import jax
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    from ng_jax.models.weights.sd3 import load_sd3_transformer, model_config_from_diffusers, transformer_dir
    from ng_jax.models.nets.text import TextCond
    from ng_jax.models.velocity import make_velocity_model

    cfg = model_config_from_diffusers(weights_dir)
    params = load_sd3_transformer(weights_dir, cfg, dtype=np.float32)
    model = make_velocity_model(cfg)
    diffusers_logging.set_verbosity_error()  # the one-JSON-line contract: no loader chatter
    torch_model = SD3Transformer2DModel.from_pretrained(transformer_dir(weights_dir), torch_dtype=torch.float32).eval()

    size = int(latent_size or min(int(cfg.sample_size), 32))
    size -= size % int(cfg.patch_size)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, int(cfg.in_channels))).astype(np.float32)
    tokens = rng.standard_normal((batch, text_tokens, int(cfg.joint_attention_dim))).astype(np.float32)
    pooled = rng.standard_normal((batch, int(cfg.pooled_projection_dim))).astype(np.float32)
    sigma = rng.uniform(0.02, 1.0, (batch,)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
                          encoder_hidden_states=torch.from_numpy(tokens),
                          pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(1000.0 * sigma),
                          return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    out = np.asarray(jax.jit(model.apply)(params, x, sigma, TextCond(tokens, pooled, np.ones(tokens.shape[:2], bool))))
    return {"family": "sd3", "variant": str(cfg.family), "max_abs_err": float(np.max(np.abs(out - ref))),
            "params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
            "ref_max_abs": float(np.max(np.abs(ref))), "latent_size": size}


def parity_flux(weights_dir: str, seed: int = 0, latent_size: int | None = None, **options) -> dict:
    from ng_jax.models.weights.flux import parity_flux as _parity_flux

    if latent_size:
        options["latent_size"] = latent_size
    return _parity_flux(weights_dir, seed, **options)


def parity_vae(weights_dir: str, seed: int = 0, latent_size: int | None = None, **options) -> dict:
    from ng_jax.models.weights.vae import parity_vae as _parity_vae

    del latent_size  # the VAE works on images (default 32x32 or 4x its downsampling)
    return _parity_vae(weights_dir, seed, **options)


PARITY: dict[str, Callable[..., dict]] = {"sd3": parity_sd3, "sd35": parity_sd3, "flux": parity_flux,
                                          "vae": parity_vae}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ng_jax.tools.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(PARITY))
    ap.add_argument("--weights_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=DEFAULT_TOL)
    ap.add_argument("--latent_size", type=int, default=0, help="sd3/sd35: latent side (default min(sample_size, 32))")
    args = ap.parse_args(argv)
    options = {"latent_size": args.latent_size} if args.latent_size else {}
    from ng_jax.models.weights.safetensors import WeightsError

    try:
        result = PARITY[args.family](args.weights_dir, args.seed, **options)
    except (WeightsError, OSError, ValueError) as err:
        print(f"parity: error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    result = {"family": args.family, **{k: v for k, v in result.items() if k != "family"}, "tol": args.tol}
    print(json.dumps(result))
    return 0 if result["max_abs_err"] <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
