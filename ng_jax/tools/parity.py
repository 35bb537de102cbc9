"""Numerical parity of the Flax ports against diffusers (PyTorch) on a local weights directory.

    python -m ng_jax.tools.parity --family sd3 --weights_dir WEIGHTS_DIR [--seed 0] [--tol 1e-4]

Loads WEIGHTS_DIR (a diffusers save: WEIGHTS_DIR/transformer/..., WEIGHTS_DIR/vae/...) into both
implementations, runs identical random inputs and prints ONE JSON line `{"family", "max_abs_err",
"params", ...}`. Exit status: 0 within `--tol`, 1 above it, 2 when the directory cannot be loaded (a
one-line `parity: error: ...` on stderr). Needs the test extra (torch + diffusers); float32 throughout.

Families live in `PARITY`: `name -> fn(weights_dir, seed, **options) -> dict` with at least
"max_abs_err" and "params". torch and diffusers are imported inside each function: they are the
optional test extra, and the production modules never import them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from ng_jax.models.nets.text import TextCond
from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights.flux import load_flux_transformer
from ng_jax.models.weights.safetensors import WeightsError
from ng_jax.models.weights.sd3 import load_sd3_transformer
from ng_jax.models.weights.transformer import model_config_from_diffusers, transformer_dir
from ng_jax.models.weights.vae import load_vae

DEFAULT_TOL = 1e-4


def _n_params(tree) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(tree)))


def parity_sd3(weights_dir: str, seed: int = 0, latent_size: int | None = None, batch: int = 2,
               text_tokens: int = 8) -> dict:
    """diffusers `SD3Transformer2DModel` vs the Flax MMDiT (families sd3 / sd35) on random inputs.

    latent_size defaults to min(sample_size, 32) (smaller grids use the cropped position table,
    and keep a CPU run of a full-size checkpoint short)."""
    # Deferred: torch and diffusers are the optional test extra.
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

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
            "params": _n_params(params), "ref_max_abs": float(np.max(np.abs(ref))), "latent_size": size}


def parity_flux(weights_dir: str, seed: int = 0, latent_size: int | None = None, *, batch: int = 2,
                height: int = 8, width: int = 12, text_len: int = 8) -> dict:
    """diffusers `FluxTransformer2DModel` (float32) vs ours on the same random inputs (latents
    [batch, height, width, C] NHWC, or latent_size x latent_size; T5-like tokens, pooled, sigma,
    guidance). Returns {"family": "flux", "max_abs_err", "params", "ref_max_abs"}."""
    # Deferred: torch and diffusers are the optional test extra.
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    if latent_size:
        height = width = int(latent_size)
    directory = transformer_dir(weights_dir)
    cfg = model_config_from_diffusers(directory, sample_size=(height, width), max_sequence_length=text_len)
    model = make_velocity_model(cfg)
    params = load_flux_transformer(directory, cfg)
    ref = FluxTransformer2DModel.from_pretrained(directory, torch_dtype=torch.float32).eval()

    rng = np.random.default_rng(seed)
    ch = model.sample_shape[-1]
    x = rng.standard_normal((batch, height, width, ch)).astype(np.float32)
    tokens = rng.standard_normal((batch, text_len, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, cfg["pooled_projection_dim"])).astype(np.float32)
    sigma = rng.uniform(0.05, 1.0, batch).astype(np.float32)
    guidance = rng.uniform(1.0, 5.0, batch).astype(np.float32) if cfg["guidance_embeds"] else None

    cond = TextCond(tokens=tokens, pooled=pooled, mask=np.ones((batch, text_len), bool))
    ours = np.asarray(jax.jit(model.apply)(params, x, sigma, cond, guidance=guidance))
    with torch.no_grad():
        packed = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), batch, ch, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        out = ref(hidden_states=packed, encoder_hidden_states=torch.from_numpy(tokens),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma), img_ids=img_ids,
                  txt_ids=torch.zeros(text_len, 3), guidance=None if guidance is None else torch.from_numpy(guidance),
                  return_dict=False)[0]
        theirs = FluxPipeline._unpack_latents(out, height * 8, width * 8, 8).numpy().transpose(0, 2, 3, 1)
    n_params, n_ref = _n_params(params), int(sum(p.numel() for p in ref.parameters()))
    if n_params != n_ref:
        raise WeightsError(f"parameter count differs: ours {n_params}, diffusers {n_ref}")
    return {"family": "flux", "max_abs_err": float(np.max(np.abs(ours - theirs))), "params": n_params,
            "ref_max_abs": float(np.max(np.abs(theirs)))}


def parity_vae(weights_dir: str, seed: int = 0, latent_size: int | None = None, batch: int = 2,
               image_size: int | None = None) -> dict:
    """WEIGHTS_DIR/vae in diffusers (torch, fp32) and ours (fp32): encode (mean, logvar) on identical
    random images in [-1, 1] and decode on identical random latents (latent_size is not used: the
    images are image_size, default max(32, 4 x the downsampling)).

    Returns {"family": "vae", "max_abs_err", "params", "encode_mean_err", "encode_logvar_err", "decode_err"}."""
    # Deferred: torch and diffusers are the optional test extra.
    import torch
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    del latent_size
    vae, params = load_vae(weights_dir)
    cfg = vae.cfg
    diffusers_logging.set_verbosity_error()  # the one-JSON-line contract: no loader chatter
    ref = TorchAutoencoderKL.from_pretrained(os.path.join(weights_dir, "vae"), torch_dtype=torch.float32).eval()

    f = cfg.downsample_factor
    size = image_size or max(32, 4 * f)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, (batch, size, size, cfg.in_channels)).astype(np.float32)
    latents = rng.standard_normal((batch, size // f, size // f, cfg.latent_channels)).astype(np.float32)

    def nhwc(t):
        return t.detach().numpy().transpose(0, 2, 3, 1)

    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        ref_dec = nhwc(ref.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample)

    ours = jax.jit(vae.encode)(params, images)
    dec = jax.jit(vae.decode)(params, latents)
    errs = {"encode_mean_err": float(np.max(np.abs(np.asarray(ours.mean) - ref_mean))),
            "encode_logvar_err": float(np.max(np.abs(np.asarray(ours.logvar) - ref_logvar))),
            "decode_err": float(np.max(np.abs(np.asarray(dec) - ref_dec)))}
    return {"family": "vae", "max_abs_err": max(errs.values()), "params": _n_params(params), **errs}


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
