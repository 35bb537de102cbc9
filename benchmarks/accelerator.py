"""An SD3.5-Medium-shaped train step and rollout on one accelerator: ng_jax (XLA and cuDNN attention) against
diffusers / PyTorch (SDPA), bf16, side by side in one run, with model FLOP utilisation.

    python benchmarks/accelerator.py --out benchmarks/accelerator_results.json   # a GPU machine (jax[cuda12], torch CUDA)
    python benchmarks/accelerator.py --tiny                                       # CPU smoke run (tiny, float32)

The network is diffusers' `SD3Transformer2DModel` with SD3.5-Medium's released shapes (24 MMDiT-X blocks,
width 1536, 24 heads, qk RMS-norm, dual attention in blocks 0-12; `--layers` fewer), random weights, saved
once and loaded strictly into ng_jax. At `--resolution 512` (64 x 64 latents, 1024 image tokens) it times:

- train: one optimizer step of AWM (full fine-tuning: float32 master weights over the bf16 base; LoRA rank
  32 on the attention projections), ng_jax's jitted step with each attention implementation, and in
  PyTorch the same network's flow-matching loss, backward and AdamW step (the loss arithmetic is
  negligible next to the network; PEFT LoRA for the LoRA row);
- rollout: a 10-step Euler rollout, CFG-free, ng_jax's jitted scan against a PyTorch loop.

MFU = the compiled ng_jax computation's FLOPs (XLA's cost analysis) / time / the card's dense bf16 peak;
the PyTorch rows divide the same FLOP count (the same work) by their time. Medians of interleaved repeats
after warm-up. Nothing here runs in the test suite at full size; `--tiny` is the tests' smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/accelerator.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import device_string, git_commit  # noqa: E402
from benchmarks.run import make_inputs, step_spec  # noqa: E402
from ng_jax import flow  # noqa: E402
from ng_jax.config import blocks  # noqa: E402
from ng_jax.config.methods import SD3_LORA_TARGETS  # noqa: E402
from ng_jax.models.stack import trainable_init  # noqa: E402
from ng_jax.models.velocity import make_velocity_model  # noqa: E402
from ng_jax.models.weights.sd3 import load_sd3_transformer  # noqa: E402
from ng_jax.models.weights.transformer import model_config_from_diffusers  # noqa: E402
from ng_jax.rl.step import make_train_step  # noqa: E402
from ng_jax.sampling import make_sampler  # noqa: E402
from ng_jax.state import TrainState, make_optimizer  # noqa: E402

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
TINY = dict(SD35M, sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=(0,))


def kept_blocks(dims: dict, layers: int | None) -> dict:
    """`dims` cut to its first `layers` blocks (all when None), the dual-attention layers among them kept."""
    if not layers:
        return dict(dims)
    return dict(dims, num_layers=layers, dual_attention_layers=tuple(i for i in dims["dual_attention_layers"]
                                                                     if i < layers))


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16 FLOP/s
LORA = {"rank": 32, "alpha": 32.0}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def timed(fns: dict, repeats: int, warmup: int) -> dict:
    """Interleaved repeats (A, B, ..., B, A) after warm-up; name -> median seconds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def jax_train(directory, res, dtype, attention, lora: bool, batch, prof):
    """(run, FLOPs) of one jitted AWM step with `attention`."""
    cfg = model_config_from_diffusers(directory, latent_size=res // 8, dtype=dtype, attention=attention)
    model = make_velocity_model(cfg)
    ref = load_sd3_transformer(directory, cfg, dtype=jnp.dtype(dtype))
    lora_cfg = mlc.ConfigDict(dict(LORA, targets=SD3_LORA_TARGETS)) if lora else None
    trainable = trainable_init(ref, lora_cfg, jax.random.key(1))
    optimizer = make_optimizer(blocks.optim_config(lr=1e-5))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema=jax.tree.map(jnp.copy, trainable),
                       opt_state=optimizer.init(trainable), rng=jax.random.key(0))
    spec = step_spec("awm", prof["micro_batch"], num_timesteps=prof["timesteps"])
    compiled = jax.jit(make_train_step(model.apply, optimizer, spec, lora_cfg), donate_argnums=(0,)).lower(
        state, ref, batch).compile()
    box = [state]

    def run():
        box[0], m = compiled(box[0], ref, batch)
        jax.block_until_ready(m)
    return run, _flops(compiled), model, ref


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def jax_rollout(model, ref, batch, steps: int):
    sample = jax.jit(make_sampler(model.apply, num_steps=steps))
    noise = jax.random.normal(jax.random.key(2), batch.x0.shape, jnp.float32)
    compiled = sample.lower(ref, noise, batch.cond).compile()
    return (lambda: jax.block_until_ready(compiled(ref, noise, batch.cond).x0)), _flops(compiled)


def torch_fns(directory, dtype: str, lora: bool, host_batch, steps: int, prof):
    """(train step, rollout) of the same network in PyTorch (SDPA attention), on CUDA when there is one."""
    import torch
    from diffusers import SD3Transformer2DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    net = SD3Transformer2DModel.from_pretrained(os.path.join(directory, "transformer"), torch_dtype=tdtype).to(device)
    if lora:
        from peft import LoraConfig

        net.add_adapter(LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                   "add_v_proj", "to_add_out"]))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device, tdtype)  # noqa: E731
    x0 = to(host_batch.x0.transpose(0, 3, 1, 2))
    tokens, pooled, adv = to(host_batch.cond.tokens), to(host_batch.cond.pooled), to(host_batch.advantages)
    mb, t = prof["micro_batch"], prof["timesteps"]

    def train():
        opt.zero_grad(set_to_none=True)
        for i in range(0, x0.shape[0], mb):
            for _ in range(t):
                s = torch.rand(min(mb, x0.shape[0] - i), device=device, dtype=tdtype)
                eps = torch.randn_like(x0[i:i + mb])
                xt = (1 - s)[:, None, None, None] * x0[i:i + mb] + s[:, None, None, None] * eps
                v = net(hidden_states=xt, encoder_hidden_states=tokens[i:i + mb], pooled_projections=pooled[i:i + mb],
                        timestep=1000 * s, return_dict=False)[0]
                err = (v - (eps - x0[i:i + mb])).float().pow(2).mean(dim=(1, 2, 3))
                (adv[i:i + mb].float() * err).mean().backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    grid = [float(x) for x in np.asarray(flow.sigma_grid(steps))]

    @torch.no_grad()
    def rollout():
        x = torch.randn_like(x0)
        for a, b in zip(grid[:-1], grid[1:]):
            s = torch.full((x.shape[0],), a, device=device, dtype=tdtype)
            x = x + (b - a) * net(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                  timestep=1000 * s, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
    return train, rollout


def run(tiny: bool = False, layers: int | None = None, resolution: int = 512, out: str | None = None, log=print) -> dict:
    dims = kept_blocks(TINY if tiny else SD35M, layers)
    res = 128 if tiny else resolution  # tiny: 16 x 16 latents
    dtype = "float32" if tiny else "bfloat16"
    prof = dict(batch=2 if tiny else 8, micro_batch=2 if tiny else 4, timesteps=1 if tiny else 2,
                rollout_batch=2 if tiny else 8, steps=2 if tiny else 10, repeats=1 if tiny else 5, warmup=0 if tiny else 1)
    attentions = ["xla"] + (["cudnn"] if jax.devices()[0].platform == "gpu" else [])
    results = {"device": device_string(), "commit": git_commit(), "dims": dims, "resolution": res, "dtype": dtype,
               "profile": prof, "peak_flops": peak_flops(), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        import diffusers
        import torch

        torch.manual_seed(0)
        diffusers.SD3Transformer2DModel(**dims).save_pretrained(os.path.join(tmp, "transformer"))
        latent = res // 8
        host = make_inputs("awm", prof["batch"], (latent, latent, dims["in_channels"]), 16 if not tiny else 4,
                           dims["joint_attention_dim"], dims["pooled_projection_dim"])
        batch = jax.device_put(host)
        for lora in (False, True):
            fns, flops = {}, {}
            for attn in attentions:
                fns[f"ng_jax_{attn}"], flops[attn], model, ref = jax_train(tmp, res, dtype, attn, lora, batch, prof)
            fns["pytorch_sdpa"], _ = torch_fns(tmp, dtype, lora, host, prof["steps"], prof)
            t = timed(fns, prof["repeats"], prof["warmup"])
            key = "train_lora" if lora else "train_full"
            results["rows"][key] = {k: {"seconds": v, "mfu": _mfu(flops["xla"], v, results["peak_flops"])}
                                    for k, v in t.items()}
            results["rows"][key]["flops"] = flops["xla"]
            log(f"{key}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()))
        roll_batch = jax.tree.map(lambda x: x[: prof["rollout_batch"]], batch)
        fns, flops = {}, {}
        for attn in attentions:
            cfg = model_config_from_diffusers(tmp, latent_size=latent, dtype=dtype, attention=attn)
            model = make_velocity_model(cfg)
            ref = load_sd3_transformer(tmp, cfg, dtype=jnp.dtype(dtype))
            fns[f"ng_jax_{attn}"], flops[attn] = jax_rollout(model, ref, roll_batch, prof["steps"])
        host_roll = jax.tree.map(lambda x: x[: prof["rollout_batch"]], host)
        _, fns["pytorch_sdpa"] = torch_fns(tmp, dtype, False, host_roll, prof["steps"], prof)
        t = timed(fns, prof["repeats"], prof["warmup"])
        results["rows"]["rollout"] = {k: {"seconds": v, "mfu": _mfu(flops["xla"], v, results["peak_flops"])}
                                      for k, v in t.items()}
        results["rows"]["rollout"]["flops"] = flops["xla"]
        log("rollout: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items()))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _mfu(flops: float, seconds: float, peak: float | None):
    return None if not peak or not flops else flops / seconds / peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes (numbers meaningless)")
    parser.add_argument("--layers", type=int, default=None, help="fewer MMDiT blocks than SD3.5-Medium's 24")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run(args.tiny, args.layers, args.resolution, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
