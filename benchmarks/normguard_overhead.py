"""NormGuard's cost per optimizer step: the base step vs the base + NormGuard (lam = 1) step.

    cd /work/main && .venv/bin/python -m benchmarks.normguard_overhead [--batch 32] [--repeats 30] [--no-check]

For each method (NFT, AWM, Flow-DPO) this builds the fused train step of ng_jax.rl.step twice from the
shipped toy-world RL config (`methods.rl_config`, toy MMDiT `toy_model_config()`, text widths of
`toy_text_config()`): once as the base method (normguard.lam = 0) and once with NormGuard (lam = 1),
both jitted exactly as ng_jax.rl.loop does (mesh shardings over every local device, donated state). Both
are compiled ahead of time, then timed interleaved (base, normguard, normguard, base, ... so drift and
background load hit both alike) on the same batch, and the median ms/step of each is reported.

NormGuard reads the velocities the base loss already computes, so it should cost no extra forward:
the script exits with status 1 when a normguard/base ratio exceeds 1.03 (3%), unless `--no-check`.
Timings on a shared or busy machine are noisy; the min column is given as a second opinion.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import flow, sharding

from ng_jax.config import blocks, methods
from ng_jax.models.nets.text import TextCond
from ng_jax.models.velocity import make_velocity_model
from ng_jax.state import TrainState, make_optimizer
from ng_jax.rl.step import StepSpec, TrainBatch, make_train_step

METHODS = ("nft", "awm", "dpo")
MAX_RATIO = 1.03


def step_spec(config, batch: int) -> StepSpec:
    """The StepSpec ng_jax.rl.loop builds from this config (make_step_spec), with the train batch's
    micro-batch capped at `batch`."""
    rl, ng = config.rl, config.normguard
    grid = np.asarray(flow.sigma_grid(int(rl.rollout.num_steps), shift=float(rl.rollout.shift)))
    return StepSpec(method=rl.method, micro_batch=min(int(rl.micro_batch), batch), num_timesteps=int(rl.num_timesteps),
                    grid=tuple(float(s) for s in grid[:-1]), grid_fraction=float(rl.grid_fraction),
                    loss_kwargs=dict(config.loss.to_dict()), lam=float(ng.lam), margin=float(ng.margin),
                    power=int(ng.power), relative=bool(ng.relative),
                    dpo_logit_mean=float(rl.dpo_logit_mean), dpo_logit_std=float(rl.dpo_logit_std),
                    dpo_shift=float(rl.dpo_shift))


def reference_params(model):
    """Toy-model parameters with the zero-initialised adaLN / proj_out weights randomised (v != 0)."""
    def init():
        params = model.init(jax.random.key(0))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return jax.jit(init)()


def make_batch(method: str, n: int, model, text_cfg, mesh) -> TrainBatch:
    rng = np.random.default_rng(0)
    shape = (n,) + model.sample_shape
    length = int(text_cfg.max_length)
    cond = TextCond(tokens=rng.standard_normal((n, length, int(text_cfg.width))).astype(np.float32),
                    pooled=rng.standard_normal((n, int(text_cfg.pooled_dim))).astype(np.float32),
                    mask=np.arange(length)[None] < rng.integers(3, length, (n, 1)))
    batch = TrainBatch(x0=rng.uniform(-1, 1, shape).astype(np.float32), cond=cond,
                       advantages=rng.standard_normal(n).astype(np.float32),
                       x0_l=rng.uniform(-1, 1, shape).astype(np.float32) if method == "dpo" else None)
    return sharding.shard_batch(batch, mesh)


def build(method: str, lam: float, batch: TrainBatch, model, ref, mesh):
    """(compiled step, fresh state, compile seconds) for one method and NormGuard weight."""
    config = methods.rl_config(method, normguard_lam=lam)
    layout, ref_layout = sharding.layouts(config.mesh)
    spec = step_spec(config, batch.advantages.shape[0])
    optimizer = make_optimizer(config.optim)

    def init_state(ref_params):
        params = jax.tree.map(jnp.copy, ref_params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params, opt_state=optimizer.init(params),
                          rng=jax.random.key(0))

    state_sh = layout.shardings(jax.eval_shape(init_state, ref), mesh)
    ref_sh = ref_layout.shardings(ref, mesh)
    jitted = jax.jit(make_train_step(model.apply, optimizer, spec),
                     in_shardings=(state_sh, ref_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    state = jax.jit(init_state, out_shardings=state_sh)(ref)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, ref, batch).compile()
    return compiled, state, time.perf_counter() - t0


def time_pair(fns, states, ref, batch, repeats: int, warmup: int):
    """Interleaved timing; the order alternates every repeat. Returns per-variant lists of seconds."""
    times = [[], []]
    for r in range(warmup + repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            states[i], metrics = fns[i](states[i], ref, batch)
            jax.block_until_ready((states[i], metrics))
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples (DPO: pairs) per optimizer step")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of nft,awm,dpo")
    parser.add_argument("--no-check", action="store_true", help=f"do not fail when a ratio exceeds {MAX_RATIO}")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods must be drawn from {METHODS}, got {args.methods!r}")

    mesh = sharding.make_mesh(blocks.mesh_config().shape)
    if args.batch % sharding.batch_size_multiple(mesh):
        parser.error(f"--batch {args.batch} must be a multiple of the {sharding.batch_size_multiple(mesh)} devices")
    model = make_velocity_model(blocks.toy_model_config())
    text_cfg = blocks.toy_text_config()
    ref = reference_params(model)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; toy MMDiT "
          f"{sum(x.size for x in jax.tree.leaves(ref)) / 1e6:.2f}M params; batch {args.batch}; "
          f"{args.repeats} interleaved repeats (+{args.warmup} warm-up)", flush=True)

    rows, failed = [], []
    for method in methods:
        batch = make_batch(method, args.batch, model, text_cfg, mesh)
        (base, s_base, c_base), (ng, s_ng, c_ng) = (build(method, lam, batch, model, ref, mesh) for lam in (0.0, 1.0))
        spec = step_spec(methods.rl_config(method), args.batch)
        print(f"{method}: compiled base {c_base:.1f}s, normguard {c_ng:.1f}s "
              f"(micro_batch {spec.micro_batch}, {spec.num_timesteps} timesteps/sample)", flush=True)
        t_base, t_ng = time_pair((base, ng), [s_base, s_ng], ref, batch, args.repeats, args.warmup)
        med_b, med_n = statistics.median(t_base) * 1e3, statistics.median(t_ng) * 1e3
        ratio = med_n / med_b
        rows.append((method, med_b, med_n, ratio, min(t_base) * 1e3, min(t_ng) * 1e3))
        if ratio > MAX_RATIO:
            failed.append(method)

    print(f"\n{'method':<7}{'base ms/step':>14}{'normguard ms/step':>19}{'ratio':>8}"
          f"{'base min':>10}{'ng min':>9}{'min ratio':>11}")
    for method, med_b, med_n, ratio, min_b, min_n in rows:
        print(f"{method:<7}{med_b:>14.1f}{med_n:>19.1f}{ratio:>8.3f}{min_b:>10.1f}{min_n:>9.1f}{min_n / min_b:>11.3f}")
    if failed and not args.no_check:
        print(f"FAIL: normguard/base median ratio > {MAX_RATIO} for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
