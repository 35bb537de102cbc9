"""ng_jax against PyTorch eager, NormGuard's overhead and the train step's roofline, side by side in one run.

    cd /work/main && .venv/bin/python benchmarks/run.py --quick   # about 10 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/run.py                              # more repeats, a larger scaling table
    .venv/bin/python benchmarks/run.py --tiny --out /tmp/r.json     # micro-config smoke run (the tests)

One diffusers `SD3Transformer2DModel` (random weights; the default configuration has 2.3M parameters:
16x16x4 latent, patch 2 -> 64 image tokens + 16 text tokens, 4 layers of width 128) is saved with
`save_pretrained` and loaded strictly into ng_jax's sd3 family, so both sides run the same network in
float32 on the same inputs with every CPU core (`torch.set_num_threads(os.cpu_count())`; XLA's CPU
client uses every core by default). Measured:

1. train: one optimizer step of NFT, AWM and Flow-DPO (batch 32, micro-batch 16, the shipped configs'
   timesteps per sample) as ng_jax's jitted fused step (`make_train_step`, donated state) with and
   without NormGuard, and as the same step in eager PyTorch (`benchmarks.torch_reference`);
2. rollout: an N-step Euler rollout with and without CFG, `make_sampler`'s jitted scan vs the
   PyTorch loop (their outputs are compared as a parity check);
3. NormGuard's overhead: step(base + NormGuard) / step(base) per method;
4. roofline: the achieved FLOP/s of a train step (XLA's cost analysis of the compiled step, which
   has no loops at num_timesteps = 1 and one micro-batch) over this machine's dense fp32 matmul
   FLOP/s (a large `jnp.dot`), timed interleaved with the step;
5. scaling: step time against batch size and model width.

Second opinions in the same rounds: torch with ONE thread (on cores shared with other jobs, OpenMP
threads wait on each other and eager torch can slow down tenfold; XLA's pool degrades gracefully),
and the NFT step traced with the model code before the optimisations this benchmark led to
(flax's `nn.Dense` instead of `ng_jax.models.nets.layers.Dense`, the old attention layout): before vs
after in the same rounds. Docs: docs/PERFORMANCE.md.

Every comparison is timed interleaved after compilation and warm-up (A, B, C, C, B, A, ...), so
drift and background load hit all variants alike; medians are the headline, minima a second
opinion. Prints markdown tables and writes `benchmarks/results.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.model_code import BEFORE, model_code, optimisations  # noqa: E402
from benchmarks.report import METHODS, device_string, git_commit, markdown, targets  # noqa: E402
from ng_jax import flow
from ng_jax.config import blocks, methods  # noqa: E402
from ng_jax.models.weights.sd3 import load_sd3_transformer  # noqa: E402
from ng_jax.models.weights.transformer import model_config_from_diffusers  # noqa: E402
from ng_jax.models.nets.text import TextCond  # noqa: E402
from ng_jax.models.velocity import make_velocity_model  # noqa: E402
from ng_jax.sampling import make_sampler  # noqa: E402
from ng_jax.state import TrainState, make_optimizer  # noqa: E402
from ng_jax.rl.step import StepSpec, TrainBatch, make_train_step  # noqa: E402

# --tiny: semantics, not speed (unoptimised code, the legacy fusion emitters): ~2 s per compile, not ~7 s.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")

# diffusers SD3Transformer2DModel keyword arguments.
BASE_MODEL = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
                  pooled_projection_dim=64, pos_embed_max_size=None)
TINY_MODEL = dict(BASE_MODEL, sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16)

# Run profiles: sizes and repeats. Scaling rows are (batch, heads) at head_dim 32 (width = 32 * heads);
# the roofline is read at `roofline` (one of the rows).
PROFILES = {
    "full": dict(model=BASE_MODEL, text_tokens=16, batch=32, micro_batch=16, rollout_batch=32, rollout_steps=10,
                 repeats=10, warmup=2, rollout_repeats=8,
                 scaling=((8, 4), (16, 4), (32, 4), (64, 4), (32, 2), (32, 8), (32, 12)), roofline=(32, 12),
                 scaling_repeats=6, matmul=2048, fast_compile=False),
    "quick": dict(model=BASE_MODEL, text_tokens=16, batch=32, micro_batch=16, rollout_batch=32, rollout_steps=10,
                  repeats=7, warmup=1, rollout_repeats=6, scaling=((16, 4), (32, 4), (64, 4), (32, 8)),
                  roofline=(32, 8), scaling_repeats=4, matmul=2048, fast_compile=False),
    # Seconds of compilation, numbers meaningless: one timestep per sample, one micro-batch, one scaling row.
    "tiny": dict(model=TINY_MODEL, text_tokens=4, batch=4, micro_batch=4, num_timesteps=1, rollout_batch=2,
                 rollout_steps=2, repeats=1, warmup=0, rollout_repeats=1, scaling=((4, 2),), roofline=(4, 2),
                 scaling_repeats=1, matmul=128, fast_compile=True, before_after=False, second_opinion=False),
}


# ----------------------------------------------------------------------------------------------
# Timing


def interleaved(fns: dict, repeats: int, warmup: int) -> dict:
    """{name: [seconds]} of zero-argument callables that block until done, timed round-robin with
    the order reversed every round (A B C, C B A, ...) after `warmup` untimed rounds."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(a, b) -> float:
    """Median over rounds of a[i] / b[i]: neighbours in one round share the machine's load of the moment."""
    return statistics.median(x / y for x, y in zip(a, b))


def summary(seconds) -> dict:
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3, "n": len(seconds)}


# ----------------------------------------------------------------------------------------------
# Models and data


def build_models(model_kw: dict, directory: str, seed: int = 0):
    """(diffusers model, ng_jax VelocityModel, its params): one random diffusers checkpoint, saved and
    loaded strictly into the Flax port (the parity tests' recipe)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    tm = diffusers.SD3Transformer2DModel(**model_kw).eval()
    with torch.no_grad():  # perturb every weight, as the parity tests do
        for p in tm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tm.save_pretrained(os.path.join(directory, "transformer"))
    cfg = model_config_from_diffusers(directory)
    model = make_velocity_model(cfg)
    return tm, model, load_sd3_transformer(directory, cfg)


def make_inputs(method: str, n: int, sample_shape, text_tokens: int, context_dim: int, pooled_dim: int, seed=0):
    """A host TrainBatch (NHWC) of random clean samples, text conditioning and advantages."""
    rng = np.random.default_rng(seed)
    shape = (n,) + tuple(sample_shape)
    cond = TextCond(tokens=rng.standard_normal((n, text_tokens, context_dim)).astype(np.float32),
                    pooled=rng.standard_normal((n, pooled_dim)).astype(np.float32),
                    mask=np.ones((n, text_tokens), bool))
    return TrainBatch(x0=rng.standard_normal(shape).astype(np.float32), cond=cond,
                      advantages=rng.standard_normal(n).astype(np.float32),
                      x0_l=rng.standard_normal(shape).astype(np.float32) if method == "dpo" else None)


def step_spec(method: str, micro_batch: int, lam: float = 0.0, num_timesteps: int | None = None) -> StepSpec:
    """The shipped RL config's step (methods.METHODS) at this micro-batch and NormGuard weight."""
    m = methods.METHODS[method]
    grid = np.asarray(flow.sigma_grid(int(m["num_steps"])))[:-1]
    ng = blocks.normguard_config(lam)
    return StepSpec(method=method, micro_batch=micro_batch, num_timesteps=int(num_timesteps or m["num_timesteps"]),
                    grid=tuple(float(s) for s in grid), grid_fraction=float(m["grid_fraction"]),
                    loss_kwargs=dict(m["loss"]), lam=float(lam), margin=float(ng.margin), power=int(ng.power),
                    relative=bool(ng.relative))


def jax_step(model, ref, spec: StepSpec, batch: TrainBatch, fast_compile: bool = False):
    """(run: a zero-argument callable doing one blocking step, compiled, compile seconds)."""
    optimizer = make_optimizer(blocks.optim_config(lr=float(methods.METHODS[spec.method]["lr"])))
    params, ema = jax.tree.map(jnp.copy, ref), jax.tree.map(jnp.copy, ref)  # distinct buffers: both donated
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=ema, opt_state=optimizer.init(params),
                       rng=jax.random.key(0))
    t0 = time.perf_counter()
    lowered = jax.jit(make_train_step(model.apply, optimizer, spec), donate_argnums=(0,)).lower(state, ref, batch)
    compiled = lowered.compile(FAST_COMPILE if fast_compile else None)
    seconds = time.perf_counter() - t0
    box = [state]

    def run():
        box[0], metrics = compiled(box[0], ref, batch)
        jax.block_until_ready((box[0], metrics))
    return run, compiled, seconds


def torch_step(tm, spec: StepSpec, batch: TrainBatch):
    """A zero-argument callable doing one eager PyTorch step on copies of `tm` (policy, old, ref)."""
    import torch

    from benchmarks.torch_reference import TorchStepSpec, TorchTrainStep

    tspec = TorchStepSpec(method=spec.method, micro_batch=spec.micro_batch, num_timesteps=spec.num_timesteps,
                          grid=spec.grid, grid_fraction=spec.grid_fraction, loss_kwargs=spec.loss_kwargs,
                          lam=spec.lam, margin=spec.margin, power=spec.power, relative=spec.relative,
                          lr=float(methods.METHODS[spec.method]["lr"]))
    step = TorchTrainStep(copy.deepcopy(tm), copy.deepcopy(tm), copy.deepcopy(tm), tspec)
    nchw = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa
    args = (nchw(batch.x0), torch.from_numpy(batch.cond.tokens), torch.from_numpy(batch.cond.pooled),
            torch.from_numpy(batch.advantages), nchw(batch.x0_l))
    return lambda: step(*args)


def with_torch_threads(n: int, fn):
    """`fn` run with `torch.set_num_threads(n)` (restored after): the one-thread second opinion."""
    import torch

    def run():
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(saved)
    return run


def one_thread_opinion(prof) -> bool:
    """Also time torch with one thread? (Shared cores make torch's OpenMP threads wait on each other.)"""
    return prof.get("second_opinion", True) and (os.cpu_count() or 1) > 1


def flops_of(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def matmul_runner(n: int):
    """(run, flops): one blocking `jnp.dot` of two n x n float32 matrices."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    dot(a, b).block_until_ready()
    return (lambda: dot(a, b).block_until_ready()), 2.0 * n ** 3


# ----------------------------------------------------------------------------------------------
# The benchmarks


def bench_train(tm, model, ref, prof, log) -> dict:
    out = {}
    sample_shape, ctx, pooled = model.sample_shape, model.context_shape[1], model.pooled_dim
    for method in METHODS:
        batch = make_inputs(method, prof["batch"], sample_shape, prof["text_tokens"], ctx, pooled)
        spec_b, spec_n = (step_spec(method, prof["micro_batch"], lam, prof.get("num_timesteps")) for lam in (0.0, 1.0))
        jb, comp_b, cb = jax_step(model, ref, spec_b, jax.device_put(batch), prof["fast_compile"])
        jn, comp_n, cn = jax_step(model, ref, spec_n, jax.device_put(batch), prof["fast_compile"])
        log(f"train {method}: compiled base {cb:.1f}s, normguard {cn:.1f}s; micro-batch {spec_b.micro_batch}, "
            f"{spec_b.num_timesteps} timesteps/sample")
        fns = {"jax_base": jb, "jax_normguard": jn, "torch_base": torch_step(tm, spec_b, batch)}
        if method == "nft" and one_thread_opinion(prof):
            fns["torch_base_1thread"] = with_torch_threads(1, torch_step(tm, spec_b, batch))
        if method == "nft" and prof.get("before_after", True):  # the model-code optimisations, before
            for key, kw in BEFORE:
                with model_code(**kw):
                    fns[key], _, _ = jax_step(model, ref, spec_b, jax.device_put(batch), prof["fast_compile"])
        t = interleaved(fns, prof["repeats"], prof["warmup"])
        res = {k: summary(v) for k, v in t.items()}
        res["speedup_vs_torch"] = res["torch_base"]["median_ms"] / res["jax_base"]["median_ms"]
        res["speedup_vs_torch_min"] = res["torch_base"]["min_ms"] / res["jax_base"]["min_ms"]
        res["ng_overhead"] = res["jax_normguard"]["median_ms"] / res["jax_base"]["median_ms"]
        res["ng_overhead_min"] = res["jax_normguard"]["min_ms"] / res["jax_base"]["min_ms"]
        res["ng_overhead_paired"] = paired_ratio(t["jax_normguard"], t["jax_base"])
        # Noise-free: XLA's FLOP count of the two compiled steps (loop bodies counted once in both).
        res["ng_flops_ratio"] = flops_of(comp_n) / max(flops_of(comp_b), 1.0)
        res.update(batch=prof["batch"], micro_batch=spec_b.micro_batch, num_timesteps=spec_b.num_timesteps)
        out[method] = res
        log(f"train {method}: jax {res['jax_base']['median_ms']:.0f} ms, +NormGuard "
            f"{res['jax_normguard']['median_ms']:.0f} ms, torch {res['torch_base']['median_ms']:.0f} ms")
    return out


def bench_rollout(tm, model, ref, prof, log) -> dict:
    import torch

    from benchmarks.torch_reference import torch_euler_sample

    n, steps = prof["rollout_batch"], prof["rollout_steps"]
    b = make_inputs("nft", n, model.sample_shape, prof["text_tokens"], model.context_shape[1], model.pooled_dim, 1)
    noise = b.x0
    uncond = TextCond(np.zeros_like(b.cond.tokens), np.zeros_like(b.cond.pooled), b.cond.mask)
    grid = [float(s) for s in np.asarray(flow.sigma_grid(steps))]
    t_noise = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    t_tok, t_pool = torch.from_numpy(b.cond.tokens), torch.from_numpy(b.cond.pooled)
    t_utok, t_upool = torch.from_numpy(uncond.tokens), torch.from_numpy(uncond.pooled)
    out = {}
    for cfg in (1.0, 4.5):
        sample = jax.jit(make_sampler(model.apply, num_steps=steps, cfg_scale=cfg))
        args = (ref, jax.device_put(noise), jax.device_put(b.cond), jax.device_put(uncond) if cfg != 1 else None)
        compiled = sample.lower(*args).compile(FAST_COMPILE if prof["fast_compile"] else None)
        x_jax = np.asarray(compiled(*args).x0)
        x_torch = torch_euler_sample(tm, t_noise, t_tok, t_pool, grid, cfg, t_utok, t_upool)
        err = float(np.max(np.abs(x_jax - x_torch.permute(0, 2, 3, 1).numpy())))

        def run_jax():
            jax.block_until_ready(compiled(*args).x0)

        def run_torch():
            torch_euler_sample(tm, t_noise, t_tok, t_pool, grid, cfg, t_utok, t_upool)

        fns = {"jax": run_jax, "torch": run_torch}
        if cfg == 1.0 and one_thread_opinion(prof):
            fns["torch_1thread"] = with_torch_threads(1, run_torch)
        t = interleaved(fns, prof["rollout_repeats"], prof["warmup"])
        res = {k: summary(v) for k, v in t.items()}
        res.update(speedup_vs_torch=res["torch"]["median_ms"] / res["jax"]["median_ms"],
                   speedup_vs_torch_min=res["torch"]["min_ms"] / res["jax"]["min_ms"], max_abs_diff=err,
                   batch=n, steps=steps, cfg_scale=cfg)
        out[f"cfg{cfg:g}"] = res
        log(f"rollout cfg {cfg:g}: jax {res['jax']['median_ms']:.0f} ms, torch {res['torch']['median_ms']:.0f} ms, "
            f"max |x_jax - x_torch| {err:.2e}")
    return out


def bench_scaling(prof, directory, log) -> dict:
    """NFT base step (one micro-batch = the batch, one timestep per sample: no loops, so XLA's cost
    analysis counts every FLOP) against batch and width, each row timed interleaved with the matmul."""
    mm_run, mm_flops = matmul_runner(prof["matmul"])
    rows, models = [], {}
    for batch_size, heads in prof["scaling"]:
        if heads not in models:
            kw = dict(prof["model"], num_attention_heads=heads, caption_projection_dim=heads * prof["model"][
                "attention_head_dim"])
            sub = os.path.join(directory, f"width{heads}")
            _, model, ref = build_models(kw, sub)
            models[heads] = (model, ref, sum(x.size for x in jax.tree.leaves(ref)))
        model, ref, nparams = models[heads]
        batch = make_inputs("nft", batch_size, model.sample_shape, prof["text_tokens"], model.context_shape[1],
                            model.pooled_dim)
        run, compiled, _ = jax_step(model, ref, step_spec("nft", batch_size, num_timesteps=1), jax.device_put(batch),
                                    prof["fast_compile"])
        t = interleaved({"step": run, "matmul": mm_run}, prof["scaling_repeats"], max(prof["warmup"], 1))
        step_s, mm_s = statistics.median(t["step"]), statistics.median(t["matmul"])
        flops = flops_of(compiled)
        row = dict(batch=batch_size, width=heads * prof["model"]["attention_head_dim"], params=int(nparams),
                   step_ms=step_s * 1e3, step_min_ms=min(t["step"]) * 1e3, samples_per_s=batch_size / step_s,
                   step_gflop=flops / 1e9, achieved_gflops=flops / step_s / 1e9, matmul_gflops=mm_flops / mm_s / 1e9,
                   matmul_best_gflops=mm_flops / min(t["matmul"]) / 1e9)
        row["roofline_fraction"] = row["achieved_gflops"] / row["matmul_gflops"]
        rows.append(row)
        log(f"scaling batch {batch_size} width {row['width']}: {row['step_ms']:.0f} ms, "
            f"{row['achieved_gflops']:.1f} GFLOP/s of {row['matmul_gflops']:.1f} ({row['roofline_fraction']:.0%})")
    return {"rows": rows, "matmul_n": prof["matmul"]}


def run(profile: str = "quick", out: str | None = DEFAULT_OUT, log=print, torch_threads: int | None = None) -> dict:
    import torch

    prof = PROFILES[profile]
    torch.set_num_threads(torch_threads or os.cpu_count())
    t_start, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        tm, model, ref = build_models(prof["model"], os.path.join(directory, "main"))
        nparams = sum(x.size for x in jax.tree.leaves(ref))
        tokens = (model.sample_shape[0] // prof["model"]["patch_size"]) ** 2 + prof["text_tokens"]
        log(f"{device_string()}; model {nparams / 1e6:.2f}M params, {tokens} tokens; profile {profile}")
        train = bench_train(tm, model, ref, prof, log)
        rollout = bench_rollout(tm, model, ref, prof, log)
        scaling = bench_scaling(prof, directory, log)
    roof = next(r for r in scaling["rows"] if (r["batch"], r["width"]) == (
        prof["roofline"][0], prof["roofline"][1] * prof["model"]["attention_head_dim"]))
    results = {
        "ng_overhead": {m: train[m]["ng_overhead"] for m in METHODS},
        "train_speedup_vs_torch": {m: train[m]["speedup_vs_torch"] for m in METHODS},
        "rollout_speedup_vs_torch": min(r["speedup_vs_torch"] for r in rollout.values()),
        "roofline_fraction": roof["roofline_fraction"],
        "device": device_string(),
        "commit": git_commit(),
        "profile": profile,
        "command": " ".join(["python", "benchmarks/run.py"] + ([f"--{profile}"] if profile != "full" else [])
                            + ([f"--torch-threads {torch_threads}"] if torch_threads else [])),
        "threads": {"torch": torch.get_num_threads(), "xla": os.cpu_count()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "model": dict(prof["model"], params=int(nparams), tokens=tokens, text_tokens=prof["text_tokens"],
                      dtype="float32"),
        "roofline": {"batch": roof["batch"], "width": roof["width"], "achieved_gflops": roof["achieved_gflops"],
                     "matmul_gflops": roof["matmul_gflops"]},
        "train": train, "rollout": rollout, "scaling": scaling,
        "optimisations": optimisations(train["nft"]),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "seconds": time.perf_counter() - t_start,
    }
    results["targets"] = targets(results)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and scaling rows (< 10 min on 2 cores)")
    size.add_argument("--tiny", action="store_true", help="micro-config smoke run (seconds; numbers meaningless)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads (default 0: os.cpu_count(), the comparison's setting)")
    args = parser.parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = run(profile, args.out, log=lambda s: print(s, file=sys.stderr, flush=True),
                  torch_threads=args.torch_threads or None)
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
