"""Take a trained real-model policy out of ng_jax, into diffusers.

    python -m ng_jax.tools.export WORKDIR --out DIR                      # DIR/transformer: diffusers, full weights
    python -m ng_jax.tools.export WORKDIR --out DIR --format peft        # DIR/pytorch_lora_weights.safetensors
    python -m ng_jax.tools.export WORKDIR --out DIR --dtype bfloat16     # stored dtype ("original": the base's)

WORKDIR is a finished RL run on SD3 / SD3.5 / FLUX.1 (`WORKDIR/policy_params`: the trainable tree and
`policy_params.json`, which names the base weights directory and the LoRA settings). WORKDIR and DIR may
be local directories or in a bucket (gs://bucket/path); the base weights directory is read locally.

- `--format diffusers` (default): a full fine-tune, or a LoRA run merged into the base
  (`kernel + alpha / r * a @ b`), written as a diffusers transformer directory (config.json +
  safetensors, the base checkpoint's buffers kept): `SD3Transformer2DModel.from_pretrained(DIR/transformer)`
  (or FluxTransformer2DModel); swap it into the base pipeline with `transformer=`.
- `--format peft` (LoRA runs): the adapters in PEFT's layout, for
  `pipe.load_lora_weights(DIR, weight_name="pytorch_lora_weights.safetensors")`; the scale alpha / r is
  folded into lora_B.

The toy world's policy is a model bundle already (`WORKDIR/policy`); there is nothing to convert.
Exit status: 0 written, 1 a problem with the workdir or the weights (one line), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import ml_collections as mlc
import numpy as np

from ng_jax.errors import UserError, one_line
from ng_jax.models.nets.lora import lora_merge
from ng_jax.models.stack import load_transformer, velocity_config
from ng_jax.models.weights.export import DTYPES, host_tree, write_peft_lora, write_transformer
from ng_jax.models.weights.vae import vae_config_from_diffusers
from ng_jax.rl.export import ExportError, read_policy

FORMATS = ("diffusers", "peft")
PEFT_FILE = "pytorch_lora_weights.safetensors"


def export(workdir: str, out: str, fmt: str = "diffusers", dtype: str = "original") -> str:
    """Write the policy of `workdir` to `out` in `fmt`; returns what was written."""
    note, trainable = read_policy(workdir)
    mcfg = mlc.ConfigDict(note["model"])
    family, weights_dir = str(note["family"]), str(mcfg.weights_dir)
    factor = vae_config_from_diffusers(os.path.join(weights_dir, "vae")).downsample_factor
    vcfg = velocity_config(mcfg, int(mcfg.resolution) // factor)
    lora = note.get("lora")
    if fmt == "peft":
        if not lora:
            raise ExportError(f"{workdir} fine-tuned every weight (no LoRA adapters); export it with --format diffusers")
        base = host_tree(load_transformer(vcfg, dtype=np.float32))
        n = write_peft_lora(family, vcfg, trainable, base, float(lora["alpha"]), int(lora["rank"]),
                            os.path.join(out, PEFT_FILE))
        print(f"{n} LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']}) -> {os.path.join(out, PEFT_FILE)}")
        return os.path.join(out, PEFT_FILE)
    params = trainable
    if lora:
        base = host_tree(load_transformer(vcfg, dtype=np.float32))
        params = host_tree(lora_merge(base, trainable, alpha=float(lora["alpha"]), rank=int(lora["rank"])))
    tdir = write_transformer(family, vcfg, params, weights_dir, out, dtype)
    print(f"{'LoRA merged into the base' if lora else 'full fine-tune'} ({family}) -> {tdir}")
    return tdir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ng_jax.tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a finished RL run on a real model")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="diffusers", choices=FORMATS)
    parser.add_argument("--dtype", default="original", choices=DTYPES, help="stored dtype of --format diffusers")
    args = parser.parse_args(argv)
    try:
        export(args.workdir, args.out, args.format, args.dtype)
    except (UserError, OSError, ValueError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
