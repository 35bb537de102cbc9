"""A markdown table of finished RL runs: what base RL did to reward, norm and quality, and NormGuard beside it.

    python -m ng_jax.eval.runs_table workdirs/pilot/* [--floors docs/results/quality_floors.json] [--min-sigma 0.5]

Per run (its `summary.json`): the reward before -> after; the mean norm ratio `||v|| / ||v_ref||` over
the sampling steps at sigma >= `--min-sigma`, CFG-free and, when the run evaluated a `guided` variant,
guided; KID against real renders with its 95% interval (paired; the primary quality measure), FD beside
its measured noise floor at the same number of images, the saturation difference to the real renders
and the fraction of sample values past [-1, 1] before rendering; and the run's wall-clock minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ng_jax import storage


def high_sigma_ratio(result: dict | None, min_sigma: float) -> float | None:
    """Mean of the per-step norm ratios at sigma >= min_sigma (None when the result has none)."""
    by = result.get("norm_ratio_by_sigma") if result else None
    if not by:
        return None
    by = np.asarray(by, float)
    keep = by[:, 0] >= min_sigma - 1e-9  # a grid sigma of 0.5 may be stored as 0.49999999
    return float(by[keep, 1].mean()) if keep.any() else None


def fd_floor(floors: dict | None, n: int) -> float | None:
    """The FD of real vs real renders at the floor measurement's N nearest to n (mean over draws)."""
    if not floors:
        return None
    rows = floors.get("floors", [])
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(int(r["n"]) - n))
    return float(row["fd_mean"]) if int(row["n"]) == n else None


def _f(x, digits=3, sign=False) -> str:
    return "n/a" if x is None else (f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}")


def _minutes(workdir: str, summary: dict) -> float | None:
    """The run's recorded wall-clock seconds / 60; for runs that predate that record, the span of its
    metrics.jsonl lines to summary.json (the initial evaluation not included)."""
    if summary.get("wall_s"):
        return summary["wall_s"] / 60
    path = storage.path(os.path.join(workdir, "metrics.jsonl"))
    if not path.is_file():
        return None
    times = [json.loads(line).get("time") for line in path.read_text().splitlines() if line.strip()]
    times = [t for t in times if t]
    done = os.path.join(workdir, "summary.json")
    finished = storage.path(done).stat().mtime if storage.is_remote(done) else os.path.getmtime(done)
    return (finished - min(times)) / 60 if times else None


def run_row(workdir: str, floors: dict | None, min_sigma: float, n_images: int | None = None) -> list[str]:
    s = json.loads(storage.path(os.path.join(workdir, "summary.json")).read_text())
    first, last = s.get("eval_initial") or {}, s.get("eval") or {}
    guided = (last.get("variants") or {}).get("guided")
    guided0 = (first.get("variants") or {}).get("guided")
    n = int(last.get("n_images") or 0) or n_images
    floor = fd_floor(floors, n) if n else None
    kid = (f"{last['kid']:.1f} [{last['kid_ci_low']:.1f}, {last['kid_ci_high']:.1f}]"
           if last.get("kid") is not None else "n/a")
    kid0 = f"{first['kid']:.1f}" if first.get("kid") is not None else "n/a"
    fd = f"{_f(first.get('fd'), 1)} -> {_f(last.get('fd'), 1)}" + (f" (floor {floor:.1f})" if floor else "")
    minutes = _minutes(workdir, s)
    return [os.path.basename(os.path.normpath(workdir)), f"{_f(first.get('reward'))} -> {_f(last.get('reward'))}",
            _f(high_sigma_ratio(last, min_sigma), 4), _f(high_sigma_ratio(guided, min_sigma), 4) if guided else "n/a",
            f"{kid0} -> {kid}", fd,
            f"{_f(first.get('saturation_diff'), 3, True)} -> {_f(last.get('saturation_diff'), 3, True)}",
            f"{_f(last.get('out_of_range'), 4)}",
            _f(guided0.get("fd"), 1) + " -> " + _f(guided.get("fd"), 1) if guided and guided0 else "n/a",
            f"{minutes:.0f}" if minutes else "n/a"]


HEADER = ["run", "reward", "norm ratio, sigma>=S", "guided norm ratio, sigma>=S", "KID (95% CI)",
          "FD (floor)", "saturation - real", "out of range", "guided FD", "minutes"]


def table(workdirs, floors: dict | None, min_sigma: float, n_images: int | None = None) -> str:
    head = [h.replace("S", f"{min_sigma:g}") if "sigma" in h else h for h in HEADER]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in workdirs:
        if storage.is_file(w, "summary.json"):
            lines.append("| " + " | ".join(run_row(w, floors, min_sigma, n_images)) + " |")
        else:
            lines.append(f"| {os.path.basename(os.path.normpath(w))} | not finished |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--floors", default=os.path.join("docs", "results", "quality_floors.json"))
    p.add_argument("--min-sigma", type=float, default=0.5)
    p.add_argument("--n-images", type=int, default=None, help="images of the final evaluation, for runs whose "
                   "summary does not record it (the FD floor is read at this N)")
    a = p.parse_args(argv)
    floors = None
    if a.floors and os.path.isfile(a.floors):
        with open(a.floors) as f:
            floors = json.load(f)
    print(table(a.workdirs, floors, a.min_sigma, a.n_images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
