"""Matched-reward control: is NormGuard's quality a by-product of simply gaining less reward?

For every NormGuard run, among the evaluations of the baseline runs of the same method and reward
(every periodic evaluation recorded in their `summary.json` history, plus the reference's initial
one), take the one whose evaluation reward is closest, and compare quality (FD lower is better,
precision higher is better) at that matched reward.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from ng_jax import storage
from ng_jax.errors import UserError

QUALITY_KEYS = ("fd", "precision", "recall")


class RunSummaryError(UserError, RuntimeError):
    pass


def load_summary(workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if not storage.is_file(path):
        raise RunSummaryError(f"{workdir}: no summary.json (the RL run has not finished)")
    try:
        return json.loads(storage.path(path).read_text())
    except json.JSONDecodeError as err:
        raise RunSummaryError(f"{path}: not valid JSON ({err})") from None


def run_key(summary: dict) -> tuple:
    """Runs are comparable when method and reward weights agree."""
    return summary.get("method"), json.dumps(summary.get("rewards", {}), sort_keys=True)


def _is_normguard(summary: dict) -> bool:
    return float((summary.get("normguard") or {}).get("lam", 0.0)) > 0


def _points(name: str, summary: dict) -> list[dict]:
    pts = [dict(h, run=name) for h in summary.get("history", []) if h.get("reward") is not None]
    if not pts and summary.get("eval"):
        pts = [dict(summary["eval"], run=name, epoch=summary.get("epochs"))]
    return pts


def matched_reward(runs: dict[str, dict]) -> list[dict]:
    """runs: name -> summary. One row per NormGuard run that has a comparable baseline."""
    rows = []
    for name, s in sorted(runs.items()):
        if not _is_normguard(s) or not s.get("eval"):
            continue
        candidates = []
        for other, o in runs.items():
            if other != name and not _is_normguard(o) and run_key(o) == run_key(s):
                candidates += _points(other, o)
                if o.get("eval_initial"):
                    candidates.append(dict(o["eval_initial"], run="reference", epoch=0))
        if not candidates:
            continue
        target = float(s["eval"]["reward"])
        best = min(candidates, key=lambda p: abs(float(p["reward"]) - target))
        row = {"normguard_run": name, "method": s.get("method"), "reward": target,
               "baseline_run": best["run"], "baseline_epoch": best.get("epoch"),
               "baseline_reward": float(best["reward"]), "reward_gap": float(best["reward"]) - target}
        for k in QUALITY_KEYS:
            row[k] = s["eval"].get(k)
            row[f"baseline_{k}"] = best.get(k)
        rows.append(row)
    return rows


def load_runs(workdirs: Sequence[str]) -> dict[str, dict]:
    return {os.path.basename(os.path.normpath(w)): load_summary(w) for w in workdirs}
