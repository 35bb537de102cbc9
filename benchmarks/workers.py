"""Do side-by-side grid workers (`grid.worker`) train more runs per hour than one process on this machine?

    .venv/bin/python benchmarks/workers.py            # about 3 min on 2 cores; prints the ratio
    .venv/bin/python benchmarks/workers.py --calls 1 --out /tmp/w.json   # the smoke size

The work is the evaluation sampler of a grid run (the shipped reference, 64 images, 20 Euler steps, the
policy and the reference per step: the bulk of a run's compute). Timed first in one process alone, then in
N processes started together (`--workers`, default 2); each reports its seconds per call after one
compiling call. `throughput_ratio` = N x (seconds per call alone) / (mean seconds per call side by side):
above 1, N workers finish a grid sooner than one. Run it on an otherwise idle machine: another load makes
both numbers meaningless. The CPU model and core count are recorded with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import device_string, git_commit  # noqa: E402


def _one(calls: int, batch: int) -> float:
    """Seconds per sampler call in this process (after a compiling call)."""
    import jax

    from ng_jax.models.bundle import load_bundle
    from ng_jax.models.stack import toy_stack
    from ng_jax.sampling import make_sampler

    stack = toy_stack(load_bundle(None))
    cond = stack.encode(["a red circle"] * batch)
    sampler = make_sampler(stack.model.apply, num_steps=20, record=("x0", "norms"))
    fn = jax.jit(lambda p, r, n, c: sampler(p, n, c, None, None, ref_params=r))
    noise = jax.random.normal(jax.random.key(0), (batch,) + tuple(stack.model.sample_shape))
    jax.block_until_ready(fn(stack.ref, stack.ref, noise, cond))
    t = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(stack.ref, stack.ref, noise, cond))
    return (time.perf_counter() - t) / calls


def _spawn(n: int, calls: int, batch: int) -> list[float]:
    env = {**os.environ, "NG_JAX_COMPILE_CACHE": "off"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--calls", str(calls), "--batch", str(batch)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker process failed: exit codes {[p.returncode for p in procs]}")
    return [float(o.strip().splitlines()[-1]) for o in outs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(_one(a.calls, a.batch))
        return 0
    alone = _spawn(1, a.calls, a.batch)[0]
    side = _spawn(a.workers, a.calls, a.batch)
    result = {"device": device_string(), "commit": git_commit(), "workers": a.workers, "calls": a.calls,
              "batch": a.batch, "alone_s_per_call": alone, "side_by_side_s_per_call": side,
              "throughput_ratio": a.workers * alone / (sum(side) / len(side))}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
