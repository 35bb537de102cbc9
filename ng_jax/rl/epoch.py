"""One RL epoch's host-side bookkeeping: rollouts in chunks, the optimizer-step batches (DPO pairs),
epoch means of the step metrics, and the metric / evaluation lines the loop writes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax.rl.step import TrainBatch, bucket_centres


def dpo_pairs(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (winner index, loser index, valid) with valid False when all rewards tie."""
    r = rewards.reshape(-1, group_size)
    base = np.arange(r.shape[0]) * group_size
    return base + r.argmax(1), base + r.argmin(1), r.max(1) > r.min(1)


def rollouts(rollout_fn, chunk: int, batch_sh, state, ref, dec_params, noise, cond, uncond, prompt_ids, r_sde):
    """The epoch's rollouts in calls of `chunk` samples (one call when chunk is the whole epoch, the toy
    configs' setting; the SDE key is then the epoch's, as before chunking existed)."""
    n = noise.shape[0]
    outs = []
    for i, s in enumerate(range(0, n, chunk)):
        part = slice(s, s + chunk)
        key = r_sde if chunk == n else jax.random.fold_in(r_sde, i)
        c = cond if chunk == n else jax.device_put(jax.tree.map(lambda x: x[part], cond), batch_sh)
        outs.append(rollout_fn(state.params, state.ema, ref, dec_params, jax.device_put(noise[part], batch_sh), c,
                               uncond, jax.device_put(prompt_ids[part], batch_sh), key))
    if len(outs) == 1:
        return outs[0]
    return tuple(jnp.concatenate(xs, axis=0) for xs in zip(*outs))


def opt(cfg, key: str):
    """An optional float knob (absent or None -> None): rollout/eval `mu` (FLUX) and `s_min` (SD3)."""
    value = cfg.get(key)
    return None if value is None else float(value)


def accumulate(sums: dict, m: dict) -> None:
    """Sum one step's metrics; per-sigma-bucket ratios are weighted by their sample counts."""
    counts = np.asarray(m["bucket_count"], np.float64)
    for key, val in m.items():
        if key in ("finite", "bucket_count"):
            continue
        val = np.asarray(val, np.float64)
        if key == "norm_ratio_by_bucket":
            val = val * counts
        sums[key] = sums.get(key, 0.0) + val
    sums["bucket_count"] = sums.get("bucket_count", 0.0) + counts


def epoch_record(sums: dict, n_steps: int) -> dict:
    """Epoch means of the step metrics; per-bucket norm ratios as `norm_ratio_sigma_<centre>`."""
    sums = dict(sums)
    counts = sums.pop("bucket_count", None)
    by_bucket = sums.pop("norm_ratio_by_bucket", None)
    record = {key: float(v) / max(n_steps, 1) for key, v in sums.items()}
    if by_bucket is not None:
        for c, total, n in zip(bucket_centres(), by_bucket, counts):
            if n > 0:
                record[f"norm_ratio_sigma_{c:.1f}"] = float(total / n)
    return record


def sampler_sigmas(ro):
    from ng_jax import flow

    return flow.sigma_grid(int(ro.num_steps), shift=float(ro.shift), mu=opt(ro, "mu"), s_min=opt(ro, "s_min"))


def train_batches(config, x0, cond, advantages, rewards, k, epoch):
    """Split one epoch's rollout into optimizer-step batches (shuffled; DPO: winner/loser pairs)."""
    rl = config.rl
    rng = np.random.default_rng([config.seed, epoch])
    size = int(rl.train_batch)
    for _ in range(int(rl.get("inner_epochs", 1))):
        if rl.method == "dpo":
            w, l, valid = dpo_pairs(rewards, k)
            w, l = w[valid], l[valid]
            order = rng.permutation(len(w))
            usable = (len(order) // size) * size
            for s in range(0, usable, size):
                idx_w, idx_l = w[order[s:s + size]], l[order[s:s + size]]
                yield TrainBatch(x0=x0[idx_w], cond=jax.tree.map(lambda c: c[idx_w], cond),
                                 advantages=jnp.ones(size), x0_l=x0[idx_l])
        else:
            order = rng.permutation(advantages.shape[0])
            for s in range(0, (len(order) // size) * size, size):
                idx = order[s:s + size]
                yield TrainBatch(x0=x0[idx], cond=jax.tree.map(lambda c: c[idx], cond),
                                 advantages=jnp.asarray(advantages[idx]))


def scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_line(tag: str, r: dict) -> str:
    def fmt(key, digits):
        v = r.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}"

    return (f"[eval {tag}] reward={fmt('reward', 4)} norm_ratio={fmt('norm_ratio', 4)} fd={fmt('fd', 3)} "
            f"precision={fmt('precision', 3)} recall={fmt('recall', 3)}")


def trim_metrics(path: str, epoch: int) -> None:
    """On resume, drop metric lines written after the restored epoch (they are about to be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > epoch:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        keep.append(line)
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
