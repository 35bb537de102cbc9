"""Noise floors of FD and KID on the judge features: what a perfect generator would score at N images.

    cd /work/main && .venv/bin/python -m benchmarks.quality_floors --out docs/results/quality_floors.json --coverage 500

For each N (default 96, 192, 384, 768) and each of `--draws` independent draws: N prompts are drawn
uniformly (with replacement) from the shapes world's TEST split (``ng_jax.data.prompts``), rendered twice
with independent seeds (``ng_jax.judges.toy.reference_renders``) and embedded by the judge network
(``ng_jax.judges.features.JudgeFeatures``). Row i of both sets shows the same prompt, as an evaluation
pairs generated images with real renders of the same prompts, so KID is the PAIRED form
(``ng_jax.judges.kid.kid(..., paired=True)``, unbiased for this design, with its 95%
interval); the unpaired KID of the same draws is printed beside it to show its downward bias under
pairing. The table gives the mean and the spread (std over draws) of each statistic, KID's mean interval
half-width, and how often the interval holds 0.

A "signal" table repeats the measurement with the second set over-saturated (uint8 renders times
`--signal-gain`, clipped, as the judge's own sanity check does with 1.3): at which N each statistic
tells it from the floor.

`--coverage T` checks the KID interval's coverage empirically: a pool of `--pool` prompts rendered twice
(real A, real B; B also over-saturated and with Gaussian noise), sets of N drawn from the pools WITH
replacement (unpaired: independent indices into A and B; paired: the same indices), so that the
population is the pools' empirical distribution and its MMD^2 is exactly the V-statistic of the two
pools; the table gives the fraction of T trials whose interval holds that value, and on which side the
misses fall (CI<MMD: the whole interval below the truth; CI>MMD: above it, a false "worse" finding when
the truth is ~0).
KID values are in kernel units (not x 1e3). The command above takes about 5 CPU-minutes (11 minutes of
wall time on a shared 2-core machine); `--coverage 200` or `--signal-gain 0` cut it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from ng_jax.data import prompts as prompt_sets
from ng_jax.judges.features import JudgeFeatures
from ng_jax.judges.kid import (
    Z95,
    kid,
    kid_from_kernels,
    noise_floors,
    polynomial_kernel,
)
from ng_jax.judges.toy import reference_renders


def saturate(images: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(images.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def add_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(images + rng.normal(0.0, std, images.shape), 0, 255).astype(np.uint8)


class RenderPairs:
    """Paired sampler: N test prompts, rendered twice with independent seeds, as judge features
    (the second set optionally transformed, e.g. over-saturated)."""

    def __init__(self, features: JudgeFeatures, prompts: list[str], transform=None):
        self.features, self.prompts, self.transform = features, prompts, transform

    def __call__(self, rng: np.random.Generator, n: int):
        chosen = [self.prompts[i] for i in rng.integers(0, len(self.prompts), n)]
        a = reference_renders(chosen, rng.integers(0, 2**31, n))
        b = reference_renders(chosen, rng.integers(0, 2**31, n))
        if self.transform is not None:
            b = self.transform(b)
        return self.features.features(a), self.features.features(b)


def _recording(sampler, store: list):
    """`sampler`, keeping every pair it returns in `store`."""
    def wrapped(rng, n):
        pair = sampler(rng, n)
        store.append(pair)
        return pair
    return wrapped


def measure(sampler, ns, draws: int, seed: int) -> list[dict]:
    """FD, paired KID and (for contrast) unpaired KID at each n, all on the same draws."""
    rows = []
    for n in ns:
        drawn: list = []
        floors = noise_floors(_recording(sampler, drawn), n, draws=draws, seed=seed + n, paired=True)
        fd, kd = floors["fd"], floors["kid"]
        unpaired = [kid(a, b) for a, b in drawn]
        rows.append({"n": n, "draws": draws, "fd_mean": fd.mean, "fd_std": fd.std, "kid_mean": kd.mean,
                     "kid_std": kd.std, "kid_ci_half_width_mean": float(Z95 * np.mean(kd.ses)),
                     "kid_ci_covers_zero": float(np.mean(kd.ci_covers_zero)),
                     "unpaired_kid_mean": float(np.mean([r.kid for r in unpaired])),
                     "unpaired_kid_std": float(np.std([r.kid for r in unpaired], ddof=1)),
                     "unpaired_kid_ci_covers_zero": float(np.mean([r.covers(0.0) for r in unpaired])),
                     "fd_values": list(fd.values), "kid_values": list(kd.values), "kid_ses": list(kd.ses),
                     "unpaired_kid_values": [r.kid for r in unpaired]})
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'N':>5} {'draws':>5} | {'FD mean':>8} {'FD std':>7} | {'KID mean':>9} {'KID std':>8} "
          f"{'CI +-':>7} {'CI holds 0':>10} | {'unpaired KID':>12} {'std':>6} {'CI holds 0':>10}")
    for r in rows:
        print(f"{r['n']:>5} {r['draws']:>5} | {r['fd_mean']:8.2f} {r['fd_std']:7.2f} | {r['kid_mean']:9.2f} "
              f"{r['kid_std']:8.2f} {r['kid_ci_half_width_mean']:7.2f} {r['kid_ci_covers_zero']:10.2f} | "
              f"{r['unpaired_kid_mean']:12.2f} {r['unpaired_kid_std']:6.2f} {r['unpaired_kid_ci_covers_zero']:10.2f}")


def coverage(features: JudgeFeatures, prompts: list[str], ns, trials: int, pool: int, seed: int,
             gain: float) -> list[dict]:
    """Empirical coverage of KID's 95% interval, unpaired and paired, where the true MMD^2 is known.

    Each trial draws index sets with replacement from pools of `pool` renders, so the population is the
    pools' empirical distribution: its MMD^2 is the V-statistic of the pools, exactly. The pool kernels are
    computed once; each trial's KID is ``kid_from_kernels`` on the sub-matrices (the same arithmetic as
    ``kid`` on the features)."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in rng.integers(0, len(prompts), pool)]
    real_a = features.features(reference_renders(chosen, rng.integers(0, 2**31, pool))).astype(np.float64)
    images_b = reference_renders(chosen, rng.integers(0, 2**31, pool))  # row k: the same prompt as real_a[k]
    scenarios = [
        ("same pool", None, False),
        ("real vs real", images_b, True),
        (f"saturated x{gain:g}", saturate(images_b, gain), True),
        ("noise std 4", add_noise(images_b, 4.0, rng), True),
    ]
    k_aa = polynomial_kernel(real_a, real_a)
    rows = []
    for name, images, with_paired in scenarios:
        if images is None:
            k_bb = k_ab = k_aa
        else:
            real_b = features.features(images).astype(np.float64)
            k_bb, k_ab = polynomial_kernel(real_b, real_b), polynomial_kernel(real_a, real_b)
        truth = float(k_aa.mean() + k_bb.mean() - 2.0 * k_ab.mean())
        for design in ("unpaired", "paired") if with_paired else ("unpaired",):
            for n in ns:
                res = []
                for _ in range(trials):
                    ia = rng.integers(0, pool, n)
                    ib = ia if design == "paired" else rng.integers(0, pool, n)
                    res.append(kid_from_kernels(k_aa[np.ix_(ia, ia)], k_bb[np.ix_(ib, ib)], k_ab[np.ix_(ia, ib)],
                                                paired=design == "paired"))
                vals = np.array([r.kid for r in res])
                cov = float(np.mean([r.covers(truth) for r in res]))
                rows.append({"scenario": name, "design": design, "n": n, "trials": trials, "true_mmd2": truth,
                             "kid_mean": float(vals.mean()), "kid_std": float(vals.std(ddof=1)),
                             "se_mean": float(np.mean([r.se for r in res])), "coverage": cov,
                             "coverage_se": float(np.sqrt(cov * (1 - cov) / trials)),
                             "miss_below": float(np.mean([r.ci_high < truth for r in res])),
                             "miss_above": float(np.mean([r.ci_low > truth for r in res])),
                             "excludes_zero": float(np.mean([r.ci_low > 0 for r in res]))})
    return rows


def print_coverage(rows: list[dict]) -> None:
    print("\nKID 95% interval: empirical coverage of the pools' MMD^2 (sets drawn from the pools with replacement)")
    print(f"{'scenario':>18} {'design':>8} {'N':>5} | {'MMD^2':>7} {'KID mean':>9} {'KID std':>8} {'mean se':>8} | "
          f"{'coverage':>8} {'+-':>5} {'CI<MMD':>6} {'CI>MMD':>6} | {'CI>0':>5}")
    for r in rows:
        print(f"{r['scenario']:>18} {r['design']:>8} {r['n']:>5} | {r['true_mmd2']:7.2f} {r['kid_mean']:9.2f} "
              f"{r['kid_std']:8.2f} {r['se_mean']:8.2f} | {r['coverage']:8.3f} {r['coverage_se']:5.3f} "
              f"{r['miss_below']:6.3f} {r['miss_above']:6.3f} | {r['excludes_zero']:5.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--ns", default="96,192,384,768", help="comma-separated sample sizes (each side)")
    parser.add_argument("--draws", type=int, default=20, help="independent draws per N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal-gain", type=float, default=1.1,
                        help="over-saturation gain of the signal table (0: no signal table)")
    parser.add_argument("--coverage", type=int, default=0, metavar="T", help="coverage trials per N and scenario (0: skip)")
    parser.add_argument("--pool", type=int, default=4000, help="renders per pool of the coverage check")
    parser.add_argument("--weights", default=None, help="judge feature weights (default: the shipped ones)")
    args = parser.parse_args(argv)
    try:
        ns = [int(x) for x in args.ns.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--ns must be comma-separated integers, got {args.ns!r}")
    if not ns or min(ns) < 3 or args.draws < 2:
        parser.error("--ns needs integers >= 3 and --draws at least 2")

    start = time.time()
    features = JudgeFeatures(weights_path=args.weights)
    prompts = [p for _, p in prompt_sets.prompts_for("test")]
    out = {"command": "python -m benchmarks.quality_floors " + " ".join(argv if argv is not None else sys.argv[1:]),
           "prompts": f"{len(prompts)} test prompts, drawn uniformly with replacement; both sets show the same prompts",
           "feature_dim": int(features.features(reference_renders(prompts[:1], [0])).shape[1]),
           "kid_units": "kernel units (k(x, y) = (x.y/d + 1)^3), not x 1e3",
           "floors": measure(RenderPairs(features, prompts), ns, args.draws, args.seed)}
    print_table("Real vs real (the noise floor): FD and KID between two render sets of the same prompts", out["floors"])
    if args.signal_gain:
        gain = args.signal_gain
        out["signal"] = {"gain": gain, "rows": measure(RenderPairs(features, prompts, lambda b: saturate(b, gain)),
                                                      ns, args.draws, args.seed + 1)}
        print_table(f"Real vs over-saturated (renders x{gain:g}, clipped): the same statistics", out["signal"]["rows"])
    if args.coverage:
        out["coverage"] = coverage(features, prompts, ns, args.coverage, args.pool, args.seed + 2,
                                   args.signal_gain or 1.1)
        print_coverage(out["coverage"])
    out["seconds"] = round(time.time() - start, 1)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
