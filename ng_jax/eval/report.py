"""docs/RESULTS.md from the grid's run summaries and analysis JSON files (ng_jax.eval.grid).

Every number in the report is read from those files; every verdict is computed from the numbers
(a claim that does not hold on the toy world is reported as not holding).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np

from ng_jax.models.bundle import bundle_fingerprint

FIGURES = ("norms.png", "renorm.png", "few_step.png", "adjoint.png")


def _read(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


RUN_COMMIT = "grid_run_commit.txt"  # in each grid run directory: the code commit that trained it


def commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_commits(workdir: str, runs) -> list[str]:
    found = set()
    for n in runs:
        path = os.path.join(workdir, n, RUN_COMMIT)
        if os.path.isfile(path):
            with open(path) as f:
                found.add(f.read().strip())
        else:
            found.add("unknown")
    return sorted(found)


def _command() -> str:
    """The command line of this process when it is the entry point, else the grid's plain command."""
    argv = [a for a in sys.argv[1:] if a.startswith("--")]
    if sys.argv and sys.argv[0].endswith(("ng_jax/main.py", "-m")) and argv:
        return " ".join(["python -m ng_jax.main"] + [shlex.quote(a) for a in argv])
    return "python -m ng_jax.main --config=configs/experiments/toy_grid.py"


def _f(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _count(pairs, pred) -> str:
    hits = sum(1 for p in pairs if pred(*p))
    return f"{hits} of {len(pairs)}"


def write_results(config, workdir: str, runs: dict, timings: dict, total_s: float) -> str:
    summaries = {n: _read(os.path.join(workdir, n, "summary.json")) for n in runs}
    analysis_dir = os.path.join(workdir, "analysis")
    an = {k: _read(os.path.join(analysis_dir, f"{k}.json")) for k in ("norms", "renorm", "few_step", "adjoint",
                                                                     "matched")}
    out_path = config.results
    fig_dir = os.path.join(os.path.dirname(out_path) or ".", "results")
    os.makedirs(fig_dir, exist_ok=True)
    figs = []
    for name in FIGURES:
        src = os.path.join(analysis_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(fig_dir, name))
            figs.append(name)

    first = next(iter(runs.values()))
    g = config.grid
    md = ["# NormGuard on the toy world: measured results", "",
          f"Produced by `{_command()}` at commit `{commit()}` "
          f"on {datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} CPU threads). "
          f"This invocation took {total_s / 60:.1f} min (runs trained now: {len([k for k in timings if k != 'analysis'])}, "
          f"the others reused; analyses {'run now' if 'analysis' in timings else 'reused'}). "
          f"The runs were trained at commit(s) {', '.join(f'`{c}`' for c in _run_commits(workdir, runs))}, "
          f"from the reference bundle `{config.reference or 'ng_jax/assets/reference'}` (params sha256 "
          f"`{bundle_fingerprint(config.reference or None)[:12]}`).", "",
          f"Grid: methods {list(g.methods)} x NormGuard {list(g.normguard)} x rewards {list(g.rewards)} x seeds "
          f"{list(g.seeds)}; each run {first.rl.epochs} epochs of {first.rl.prompts_per_epoch} prompts x "
          f"{first.rl.group_size} samples, evaluated on {first.eval.num_prompts} held-out prompts x "
          f"{first.eval.samples_per_prompt} samples ({first.eval.num_steps} Euler steps, CFG {first.eval.cfg_scale}). "
          "Reward gain = final evaluation reward - the reference's. Norm ratio = mean over eval samples and "
          "sampling steps of ||v_theta|| / ||v_ref||.", ""]

    # 1. every run
    rows = []
    for n, s in summaries.items():
        if s is None:
            rows.append([n] + ["missing"] * 7)
            continue
        e, e0 = s["eval"], s["eval_initial"]
        rows.append([n, f"{_f(e0['reward'], 4)} -> {_f(e['reward'], 4)}", _f(e["reward"] - e0["reward"], 4),
                     _f(e["norm_ratio"], 4), _f(e.get("fd"), 1), _f(e.get("precision")), _f(e.get("recall")),
                     _f(e.get("accuracy"))])
    md += ["## 1. Every run", "", _table(["run", "eval reward", "gain", "norm ratio", "FD", "precision", "recall",
                                          "verifier accuracy"], rows), ""]

    # aggregate over seeds: (method, reward, ng) -> list of summaries
    groups = defaultdict(list)
    for n, c in runs.items():
        if summaries[n] is not None:
            ng = float(c.normguard.lam) > 0
            groups[(c.rl.method, next(iter(c.rewards.weights.keys())), ng)].append(summaries[n])

    def agg(key, fn):
        return _mean([fn(s) for s in groups.get(key, [])])

    # 2. norm ratio per sigma
    sig_rows, sig_header = [], None
    for (method, reward, ng), ss in sorted(groups.items()):
        by = np.mean([np.asarray(s["eval"]["norm_ratio_by_sigma"])[:, 1] for s in ss], 0)
        sig = np.asarray(ss[0]["eval"]["norm_ratio_by_sigma"])[:, 0]
        pick = np.unique(np.linspace(0, len(sig) - 1, 6).round().astype(int))
        sig_header = sig_header or ["method", "reward", "NormGuard"] + [f"sigma {sig[i]:.2f}" for i in pick] + ["max", "mean"]
        sig_rows.append([method, reward, "yes" if ng else "no"] + [_f(by[i], 3) for i in pick] +
                        [_f(by.max(), 3), _f(by.mean(), 3)])
    md += ["## 2. Norm inflation per sigma (final evaluation, mean over seeds)", "",
           "||v_theta|| / ||v_ref|| along the evaluation sampling trajectories, at a subset of the grid's sigmas.", "",
           _table(sig_header or ["-"], sig_rows), ""]
    if "norms.png" in figs:
        md += ["![norm ratio against sigma](results/norms.png)", ""]

    # 3. NormGuard against base
    pairs_ratio, pairs_fd, pairs_prec, keep_rows, kept_cells = [], [], [], [], []
    for method in g.methods:
        for reward in g.rewards:
            b, n = (method, reward, False), (method, reward, True)
            if b not in groups or n not in groups:
                continue
            gain = lambda s: s["eval"]["reward"] - s["eval_initial"]["reward"]  # noqa: E731
            gb, gn = agg(b, gain), agg(n, gain)
            kept = gn / gb if gb is not None and gb > 1e-6 else None
            rb, rn = agg(b, lambda s: s["eval"]["norm_ratio"]), agg(n, lambda s: s["eval"]["norm_ratio"])
            fb, fn_ = agg(b, lambda s: s["eval"].get("fd")), agg(n, lambda s: s["eval"].get("fd"))
            pb, pn = agg(b, lambda s: s["eval"].get("precision")), agg(n, lambda s: s["eval"].get("precision"))
            pairs_ratio.append((rb, rn))
            pairs_fd.append((fb, fn_))
            pairs_prec.append((pb, pn))
            kept_cells.append((method, reward, kept))
            keep_rows.append([method, reward, _f(gb, 4), _f(gn, 4), "n/a (no base gain)" if kept is None else
                              f"{100 * kept:.0f}%", _f(rb, 4), _f(rn, 4), _f(fb, 1), _f(fn_, 1), _f(pb), _f(pn)])
    md += ["## 3. NormGuard against the base method (mean over seeds)", "",
           _table(["method", "reward", "base gain", "+NG gain", "reward kept", "base ratio", "+NG ratio", "base FD",
                   "+NG FD", "base precision", "+NG precision"], keep_rows), ""]

    # 4. renormalisation
    if an["renorm"]:
        rows = []
        for label, v in an["renorm"].items():
            variants = list(v)
            rows.append([label] + [f"{_f(v[x]['reward'], 4)} / {_f(v[x]['fd'], 1)} / {_f(v[x]['precision'])}"
                                   for x in variants])
        md += ["## 4. Inference-time renormalisation and CFG-rescale", "",
               "Reward / FD / precision of each checkpoint sampled plainly, with every step's velocity rescaled "
               "to the reference's norm, and with CFG-rescale.", "",
               _table(["checkpoint"] + variants, rows), ""]
        if "renorm.png" in figs:
            md += ["![renormalisation](results/renorm.png)", ""]

    # 5. few steps
    if an["few_step"]:
        steps = next(iter(an["few_step"].values()))["num_steps"]
        rows = [[label] + [f"{_f(r, 4)} / {_f(f, 1)}" for r, f in zip(v["reward"], v["fd"])]
                for label, v in an["few_step"].items()]
        md += ["## 5. Few-step sampling", "", "Reward / FD at each number of Euler steps.", "",
               _table(["checkpoint"] + [f"{n} steps" for n in steps], rows), ""]
        if "few_step.png" in figs:
            md += ["![few-step](results/few_step.png)", ""]

    # 6. matched reward
    if an["matched"]:
        rows = [[r["normguard_run"], _f(r["reward"], 4), _f(r["fd"], 1), _f(r["precision"]),
                 f"{r['baseline_run']} (epoch {r['baseline_epoch']})", _f(r["baseline_reward"], 4),
                 _f(r["baseline_fd"], 1), _f(r["baseline_precision"])] for r in an["matched"]["rows"]]
        md += ["## 6. Matched-reward control", "",
               "Each NormGuard run against the baseline evaluation (any epoch, same method and reward, or the "
               "reference) with the closest reward.", "",
               _table(["NormGuard run", "reward", "FD", "precision", "matched baseline", "its reward", "its FD",
                       "its precision"], rows), ""]

    # 7. adjoint
    if an["adjoint"]:
        rows = [[label, _f(r["mean_coherence"]), _f(min(r["sign_agreement"]), 2), _f(max(r["sign_agreement"]), 2),
                 f"{max(np.abs(r['mean'])):.2e}"] for label, r in an["adjoint"].items()]
        md += ["## 7. Adjoint sensitivity of the reward to per-step velocity scales", "",
               _table(["checkpoint", "mean coherence (\\|mean\\| / spread)", "min sign agreement", "max sign agreement",
                       "largest \\|dR/d alpha_k\\|"], rows), ""]
        if "adjoint.png" in figs:
            md += ["![adjoint](results/adjoint.png)", ""]

    # verdicts, computed
    valid = lambda ps: [p for p in ps if None not in p]  # noqa: E731
    base_ratios = [agg(k, lambda s: s["eval"]["norm_ratio"]) for k in groups if not k[2]]
    ng_ratios = [agg(k, lambda s: s["eval"]["norm_ratio"]) for k in groups if k[2]]
    renorm_fd = valid([(x["plain"]["fd"], x["renorm"]["fd"]) for lbl, x in (an["renorm"] or {}).items()
                       if lbl != "reference"])
    matched_fd = valid([(r["fd"], r["baseline_fd"]) for r in (an["matched"] or {}).get("rows", [])])
    v = ["## Verdicts (computed from the tables above)", "",
         f"- Norm inflation without NormGuard (final mean ratio > 1): "
         f"{sum(1 for r in base_ratios if r is not None and r > 1)} of {len(base_ratios)} method x reward cells.",
         f"- NormGuard lowers the norm ratio: {_count(valid(pairs_ratio), lambda b, n: n < b)} cells.",
         f"- NormGuard improves FD (lower): {_count(valid(pairs_fd), lambda b, n: n < b)} cells; "
         f"precision (higher): {_count(valid(pairs_prec), lambda b, n: n > b)} cells."]
    if an["renorm"]:
        v.append(f"- Inference-time renormalisation improves FD of a post-trained checkpoint: "
                 f"{_count(renorm_fd, lambda p, r: r < p)} checkpoints.")
    if an["matched"]:
        v.append(f"- At matched reward, NormGuard has the lower FD in {_count(matched_fd, lambda a, b: a < b)} pairs.")
    md += v + [""] + _claims(
        [r for r in base_ratios if r is not None], [r for r in ng_ratios if r is not None], kept_cells,
        valid(pairs_fd), valid(pairs_prec), renorm_fd if an["renorm"] else None,
        matched_fd if an["matched"] else None, an.get("few_step") or {}, g)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(md))
    return out_path


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not measured"
    return "reproduces" if hits == total else "does not reproduce" if hits == 0 else f"partly ({hits} of {total})"


def _claims(base, guarded, kept_cells, fd, prec, renorm_fd, matched_fd, fs, g) -> list[str]:
    """The paper's claims, each with a verdict computed from the numbers of the sections above: norm
    ratios of the base and NormGuard cells, (method, reward, kept fraction or None) per cell, (base,
    NormGuard) FD and precision pairs, (plain, renorm) and (NormGuard, matched baseline) FD pairs (None
    when not analysed), the few-step analysis."""
    out = ["## The paper's claims, measured here", "",
           "Each verdict is computed from the tables above (\"reproduces\" only where every cell agrees).", ""]
    if base:
        out.append(f"- RL post-training inflates ||v_theta|| over the reference (the paper: by 5-15%): "
                   f"**{_verdict(sum(r > 1.0 for r in base), len(base))}**. Final mean ratio of the base runs: "
                   f"{min(base):.3f} to {max(base):.3f} across the method x reward cells.")
    if guarded:
        out.append(f"- NormGuard keeps the norm at or below the reference's (ratio <= 1.01): "
                   f"**{_verdict(sum(r <= 1.01 for r in guarded), len(guarded))}**. With NormGuard: "
                   f"{min(guarded):.3f} to {max(guarded):.3f}.")
    kept = [(m, r, k) for m, r, k in kept_cells if k is not None]
    if kept_cells:
        out.append(f"- NormGuard keeps the reward (at least 80% of the base method's gain): "
                   f"**{_verdict(sum(k >= 0.8 for _, _, k in kept), len(kept))}** where the base method gained at all "
                   f"({len(kept_cells) - len(kept)} of {len(kept_cells)} cells had no base gain). Kept: "
                   + (", ".join(f"{m}/{r} {100 * k:.0f}%" for m, r, k in kept) or "none") + ".")
    if fd:
        out.append(f"- NormGuard restores quality: FD lower with NormGuard **{_verdict(sum(n < b for b, n in fd), len(fd))}**"
                   f"; precision higher **{_verdict(sum(n > b for b, n in prec), len(prec))}**.")
    if renorm_fd is not None:
        out.append(f"- Inference-time renormalisation to the reference norm does not repair quality (FD not "
                   f"lower): **{_verdict(sum(r >= p for p, r in renorm_fd), len(renorm_fd))}**.")
    gaps = []
    for method in g.methods:
        for label in fs:
            if label.startswith(f"{method}_{g.analysis_reward}_"):
                twin = label.replace(f"{method}_", f"{method}_normguard_", 1)
                if twin in fs:
                    b, n = fs[label], fs[twin]
                    if None not in (b["fd"][0], n["fd"][0], b["fd"][-1], n["fd"][-1]):
                        gaps.append((method, b["num_steps"][0], b["fd"][0] - n["fd"][0],
                                     b["num_steps"][-1], b["fd"][-1] - n["fd"][-1]))
    if gaps:
        out.append(f"- NormGuard's quality gain is larger at few steps (FD gain base - NormGuard at the fewest "
                   f"steps above that at the most): **{_verdict(sum(few > many for _, _, few, _, many in gaps), len(gaps))}**"
                   ". " + "; ".join(f"{m}: {few:+.1f} at {s0} steps, {many:+.1f} at {s1}" for m, s0, few, s1, many in gaps)
                   + ".")
    if matched_fd is not None:
        out.append(f"- At matched reward NormGuard has the better FD: "
                   f"**{_verdict(sum(a < b for a, b in matched_fd), len(matched_fd))}**.")
    return out + [""]
