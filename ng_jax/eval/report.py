"""docs/RESULTS.md from the grid's run summaries (ng_jax.eval.grid): paired statistics over seeds and a
three-way verdict per claim of the paper.

Every number in the report is read from the runs' `summary.json` files, the grid's measured noise
floors and its analyses; every verdict is computed from those numbers by `ng_jax.eval.stats`. A run
contributes one value per endpoint (its final evaluation); NormGuard and base runs of one seed are
paired (same initialisation, prompts, rollout noise and evaluation noise), so effects are paired
differences `NormGuard - base` over seeds, with 95% t and bootstrap intervals.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import defaultdict

import numpy as np

from ng_jax import logs, storage
from ng_jax.config.checks import MISSING, ConfigError, get_dotted
from ng_jax.eval import runs_table, stats
from ng_jax.models.bundle import bundle_fingerprint

RUN_COMMIT = "grid_run_commit.txt"  # in each grid run directory: the code commit that trained it
HIGH_SIGMA = 0.5                    # the norm ratio endpoints average the sampling steps at sigma >= this


def _git(*args: str) -> str:
    """Output of a git command run in the package's directory (raises OSError / CalledProcessError)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, check=True).stdout.strip()


def commit() -> str:
    """The checkout's short commit hash, "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        return _git("rev-parse", "--short", "HEAD") + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no")
                                                       else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def changed_since(old: str) -> list[str] | None:
    """The files of the ng_jax package that differ between commit `old` and the checkout (working tree
    included); None when git cannot tell (outside a checkout, or an unknown commit)."""
    try:
        out = _git("diff", "--name-only", old.removesuffix("-dirty"), "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def _code_since_lines(commits: dict, head: str) -> list[str]:
    """A sentence naming what changed in the package between the runs' commit and the report's, `head` (when
    they differ): a reader can check that none of it trains or samples."""
    if len(commits) != 1 or next(iter(commits)) == head:
        return []
    old = next(iter(commits))
    files = changed_since(old)
    if files is None:
        return [f"The runs' commit `{old}` is not in this checkout's history: what changed since is unknown.", ""]
    return [f"Package files changed between the runs' commit `{old}` and this report's (`git diff --name-only {old} "
            f"-- ng_jax`): {', '.join(f'`{f}`' for f in files) if files else 'none'}.", ""]


def run_commits(workdir: str, names) -> dict[str, list[str]]:
    """commit -> the runs (of `names` that have started) it trained."""
    found = defaultdict(list)
    for n in names:
        text = storage.read_text(os.path.join(workdir, n, RUN_COMMIT))
        if text is not None:
            found[text.strip()].append(n)
    return dict(found)


def _command() -> str:
    argv = [a for a in sys.argv[1:] if a.startswith("--")]
    if sys.argv and sys.argv[0].endswith(("ng_jax/main.py", "-m")) and argv:
        return " ".join(["python -m ng_jax.main"] + [shlex.quote(a) for a in argv])
    return "python -m ng_jax.main --config=ng_jax/configs/experiments/toy_grid.py"


def _f(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ endpoints


def high_sigma_ratio(result: dict | None) -> float | None:
    """Mean of an evaluation's per-step norm ratio over the steps at sigma >= HIGH_SIGMA."""
    return runs_table.high_sigma_ratio(result, HIGH_SIGMA)


def variant(result: dict | None, name: str) -> dict | None:
    return ((result or {}).get("variants") or {}).get(name) if name else result


# name -> (label, variant, function of an evaluation result, lower is better)
ENDPOINTS = {
    "reward": ("reward", "", lambda r: r.get("reward"), False),
    "ratio": ("norm ratio, sigma >= 0.5, CFG-free", "", high_sigma_ratio, True),
    "ratio_guided": ("norm ratio, sigma >= 0.5, CFG 4.5", "guided", high_sigma_ratio, True),
    "kid": ("KID, CFG-free", "", lambda r: r.get("kid"), True),
    "kid_guided": ("KID, CFG 4.5", "guided", lambda r: r.get("kid"), True),
    "fd": ("FD, CFG-free", "", lambda r: r.get("fd"), True),
    "saturation": ("saturation - real", "", lambda r: r.get("saturation_diff"), True),
    "accuracy": ("verifier accuracy (overall)", "", lambda r: r.get("accuracy_overall"), False),
    "kid_steps4": ("KID, 4 steps", "steps4", lambda r: r.get("kid"), True),
    "kid_steps6": ("KID, 6 steps", "steps6", lambda r: r.get("kid"), True),
}


def endpoint(summary: dict, name: str, which: str = "eval"):
    _, var, fn, _ = ENDPOINTS[name]
    r = variant(summary.get(which), var)
    return None if r is None else fn(r)


def reward_gain(summary: dict) -> float | None:
    a, b = endpoint(summary, "reward"), endpoint(summary, "reward", "eval_initial")
    return None if a is None or b is None else a - b


def cells(runs: dict, summaries: dict) -> dict:
    """(reward, method) -> arm -> seed -> summary, over the runs (name -> grid.RunSpec) that finished."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for name, spec in runs.items():
        if summaries.get(name) is not None:
            out[(spec.reward, spec.method)][spec.arm][int(spec.seed)] = summaries[name]
    return out


def values(arm_runs: dict, fn) -> dict:
    """seed -> fn(summary), leaving out None."""
    return {s: v for s, v in ((s, fn(x)) for s, x in arm_runs.items()) if v is not None}


def ratio_differences(base_runs: dict, arm_runs: dict, var: str = "") -> dict | None:
    """The norm ratio per sigma of the final evaluation (`var`: "" CFG-free, "guided"), paired by seed: {"sigma":
    [...], "by_seed": {seed: [arm - base per sigma]}, "difference": [Interval dict per sigma]}; None without a
    seed that both arms evaluated on the same sigmas."""
    by_seed, sigma = {}, None
    for seed in sorted(base_runs.keys() & arm_runs.keys()):
        b, a = (variant(runs[seed]["eval"], var) for runs in (base_runs, arm_runs))
        if not b or not a or not b.get("norm_ratio_by_sigma") or not a.get("norm_ratio_by_sigma"):
            continue
        b, a = np.asarray(b["norm_ratio_by_sigma"], np.float64), np.asarray(a["norm_ratio_by_sigma"], np.float64)
        if b.shape != a.shape or not np.allclose(b[:, 0], a[:, 0]) or (
                sigma is not None and (sigma.shape != b[:, 0].shape or not np.allclose(sigma, b[:, 0]))):
            continue   # evaluated on other sigmas than the other arm or the first paired seed: not comparable
        sigma = b[:, 0]
        by_seed[seed] = (a[:, 1] - b[:, 1]).tolist()
    if not by_seed:
        return None
    d = np.asarray(list(by_seed.values()))
    return {"sigma": sigma.tolist(), "by_seed": by_seed,
            "difference": [stats.interval(d[:, k], n_boot=1000).as_dict() for k in range(d.shape[1])]}


def matched_kid(base_runs: dict, ng_runs: dict, key: str = "kid") -> dict:
    """seed -> NormGuard's final KID - its own seed's base KID interpolated at NormGuard's final reward along
    the base run's evaluation trajectory (the reference's evaluation, then every periodic one); seeds whose
    reward lies outside that trajectory are left out (not matchable)."""
    out = {}
    for seed, ng in ng_runs.items():
        base = base_runs.get(seed)
        if base is None or ng["eval"].get(key) is None:
            continue
        traj = [(base["eval_initial"].get("reward"), base["eval_initial"].get(key))]
        traj += [(h.get("reward"), h.get(key)) for h in base.get("history", [])]
        at = stats.value_at_reward(traj, float(ng["eval"]["reward"]))
        if at is not None:
            out[seed] = float(ng["eval"][key]) - at
    return out


def matched_kid_between(ctrl_runs: dict, ng_runs: dict, key: str = "kid") -> dict:
    """seed -> NormGuard's KID - the control's, at the lower of their two final rewards: the run that ends with
    the higher reward is read along its own evaluation trajectory at the other's final reward (as
    `matched_kid`); seeds where that reward lies outside the trajectory are left out (not matchable)."""
    out = {}
    for seed in sorted(ctrl_runs.keys() & ng_runs.keys()):
        ctrl, ng = {seed: ctrl_runs[seed]}, {seed: ng_runs[seed]}
        if endpoint(ng[seed], "reward") is None or endpoint(ctrl[seed], "reward") is None:
            continue
        if endpoint(ng[seed], "reward") <= endpoint(ctrl[seed], "reward"):
            out.update(matched_kid(ctrl, ng, key))
        else:
            out.update({s: -v for s, v in matched_kid(ng, ctrl, key).items()})
    return out


def few_step_contrast(base: dict, ng: dict, few: str = "kid_steps4") -> dict:
    """seed -> NormGuard's relative KID change at few steps minus at 20: (ng - base) / base of the `few`
    endpoint minus that of "kid". Negative: NormGuard removes a larger share of the base run's KID at few
    steps (the paper's "more so at few sampling steps"). Relative, because few-step samples have a larger KID
    whatever the model; seeds whose base KID is not above 0 are left out."""
    out = {}
    for seed in sorted(base.keys() & ng.keys()):
        b4, n4, b20, n20 = (endpoint(x, k) for x, k in ((base[seed], few), (ng[seed], few),
                                                         (base[seed], "kid"), (ng[seed], "kid")))
        if None not in (b4, n4, b20, n20) and b4 > 0 and b20 > 0:
            out[seed] = (n4 - b4) / b4 - (n20 - b20) / b20
    return out


def claims_for(base: dict, ng: dict, margins: dict) -> tuple[list[stats.Claim], dict]:
    """The paper's claims for one (reward, method) cell and the values each is judged on."""
    gains = values(base, reward_gain)
    base_gain = float(np.mean(list(gains.values()))) if gains else 0.0
    delta = float(margins["reward_kept"]) * max(base_gain, 0.0)
    infl = 1.0 + float(margins["inflation"])
    cl = [stats.Claim("base RL inflates the norm (CFG-free)", "base_ratio", "above", infl,
                      f"base ratio above {infl:.2f}"),
          stats.Claim("base RL inflates the norm (CFG 4.5)", "base_ratio_guided", "above", infl,
                      f"base ratio above {infl:.2f}"),
          stats.Claim("NormGuard lowers the norm (CFG 4.5)", "d_ratio_guided", "below", 0.0, "difference below 0"),
          stats.Claim("NormGuard keeps the reward", "d_gain", "above", -delta,
                      f"gain difference above -{margins['reward_kept']:.0%} of the base gain (-{delta:.3g})"),
          stats.Claim("NormGuard restores quality (KID, CFG-free)", "d_kid", "below", 0.0, "difference below 0"),
          stats.Claim("NormGuard restores quality (KID, CFG 4.5)", "d_kid_guided", "below", 0.0, "difference below 0"),
          stats.Claim("NormGuard restores more quality at 4 steps than at 20 (KID, CFG-free)", "dd_kid_steps4", "below",
                      0.0, "relative KID difference at 4 steps minus at 20 below 0")]
    vals = {"base_ratio": values(base, lambda s: endpoint(s, "ratio")),
            "base_ratio_guided": values(base, lambda s: endpoint(s, "ratio_guided")),
            "d_ratio_guided": stats.paired(values(base, lambda s: endpoint(s, "ratio_guided")),
                                           values(ng, lambda s: endpoint(s, "ratio_guided"))),
            "d_gain": stats.paired(gains, values(ng, reward_gain)) if base_gain > 0 else {},
            "d_kid": stats.paired(values(base, lambda s: endpoint(s, "kid")), values(ng, lambda s: endpoint(s, "kid"))),
            "d_kid_guided": stats.paired(values(base, lambda s: endpoint(s, "kid_guided")),
                                         values(ng, lambda s: endpoint(s, "kid_guided"))),
            "dd_kid_steps4": few_step_contrast(base, ng)}
    return cl, vals


def _final(summary: dict) -> str:
    return json.dumps(summary.get("eval"), sort_keys=True)


def inert_seeds(base: dict, ng: dict) -> list:
    """The seeds whose NormGuard run's final evaluation equals its base run's to the bit: the hinge never
    fired (the two runs share everything else), so NormGuard did nothing there."""
    return sorted(s for s in base.keys() & ng.keys() if base[s] and ng[s] and _final(base[s]) == _final(ng[s]))


NG_EFFECTS = ("d_ratio_guided", "d_gain", "d_kid", "d_kid_guided", "dd_kid_steps4")  # the claims about what NormGuard does


def verdict_rows(grouped: dict, base_arm: str, ng_arm: str, margins: dict) -> dict:
    """reward -> rows of stats.judge_claims, Holm-corrected across every claim of that reward's cells. In a cell
    where NormGuard never acted (every paired seed `inert_seeds`), its effect claims are not tested: a zero
    difference on every seed would otherwise "keep the reward" with p = 0."""
    out = {}
    for reward in sorted({r for r, _ in grouped}):
        claims, vals, inert = [], {}, []
        for (r, method), arms in sorted(grouped.items()):
            if r != reward or base_arm not in arms or ng_arm not in arms:
                continue
            cl, v = claims_for(arms[base_arm], arms[ng_arm], margins)
            paired = arms[base_arm].keys() & arms[ng_arm].keys()
            idle = bool(paired) and len(inert_seeds(arms[base_arm], arms[ng_arm])) == len(paired)
            for c in cl:
                key = f"{method}:{c.endpoint}"
                claim = stats.Claim(f"{method}: {c.name}", key, c.direction, c.threshold, c.margin_text)
                if idle and c.endpoint in NG_EFFECTS:
                    inert.append((claim, len(paired)))
                    continue
                claims.append(claim)
                vals[key] = v[c.endpoint]
        rows = stats.judge_claims(claims, vals)
        missing = [c for c in claims if not vals.get(c.endpoint)]
        rows += [{"claim": c.name, "endpoint": c.endpoint, "margin": c.margin_text, "verdict": "not measured",
                  "n": 0} for c in missing]
        rows += [{"claim": c.name, "endpoint": c.endpoint, "margin": c.margin_text, "n": 0,
                  "verdict": f"not tested: the hinge never fired ({n} of {n} seeds bit-identical to base)"}
                 for c, n in inert]
        out[reward] = rows
    return out


def _ci(iv: stats.Interval, digits=3) -> str:
    if iv.n == 0:
        return "n/a"
    if iv.n < 2:
        return f"{iv.mean:.{digits}f} (1 seed)"
    return f"{iv.mean:.{digits}f} [{iv.t_low:.{digits}f}, {iv.t_high:.{digits}f}]"


def _digits(name: str) -> int:
    return 1 if name.startswith(("kid", "fd")) else 3


# ------------------------------------------------------------------------------------------- plots


def _figure(figsize, nrows: int, ncols: int, **kw):
    """(Figure, axes [nrows][ncols]) on an Agg canvas of its own (`logs.agg_figure`)."""
    fig = logs.agg_figure(figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig, path: str) -> bool:
    """Lay out `fig` and write it as a PNG (a local path or a bucket)."""
    fig.tight_layout()
    logs.write_png(path, fig, dpi=90)
    return True


def _band(ax, x, ys: np.ndarray, colour: str, label: str, fmt: str = "-", **kw) -> None:
    """The mean over seeds (rows of `ys`) against `x`, with its 95% t band when there are several seeds."""
    ivs = [stats.interval(ys[:, k], n_boot=10) for k in range(ys.shape[1])]
    ax.plot(x, [iv.mean for iv in ivs], fmt, color=colour, label=f"{label} ({len(ys)} seed{'s' * (len(ys) > 1)})",
            **kw)
    if len(ys) > 1:
        ax.fill_between(x, [iv.t_low for iv in ivs], [iv.t_high for iv in ivs], color=colour, alpha=0.2)


ARM_STYLES = (("tab:red", "-"), ("tab:blue", "-"), ("tab:green", "--"), ("tab:purple", "--"), ("tab:olive", ":"))


def _styled(arms) -> list[tuple[str, str, str]]:
    """(arm, colour, line style) per arm: the base red, NormGuard blue, then the controls dashed."""
    return [(a, *ARM_STYLES[i % len(ARM_STYLES)]) for i, a in enumerate(arms)]


def _sigma_panels(grouped: dict, reward: str, path: str, draw, level: float, ylabel: str, title: str = "") -> bool:
    """One panel per method (columns) and guidance (rows: CFG-free, CFG 4.5) with sigma falling left to right;
    `draw(ax, arm -> seed -> summary, variant)` plots into a panel and says whether it drew anything. False
    (and no file) when nothing was drawn."""
    methods = sorted(m for r, m in grouped if r == reward)
    if not methods:
        return False
    fig, axes = _figure((4 * len(methods), 6.4), 2, len(methods), sharey="row")
    drew = False
    for j, m in enumerate(methods):
        for i, var in enumerate(("", "guided")):
            ax = axes[i][j]
            drew |= draw(ax, grouped[(reward, m)], var)
            ax.axhline(level, color="grey", lw=0.8)
            ax.set_title(f"{m}, {'CFG 4.5' if var else 'CFG-free'}{title}")
            ax.set_xlabel("sigma")
            ax.invert_xaxis()
            if j == 0:
                ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return _save(fig, path) if drew else False


def plot_norms(grouped: dict, reward: str, arms, path: str) -> bool:
    """Norm ratio against sigma (final evaluation, CFG-free and CFG 4.5), mean and 95% t band over seeds,
    per arm (`arms`: the base, NormGuard, then any controls), one panel per method and guidance."""
    def draw(ax, by_arm, var):
        drew = False
        for arm, colour, line in _styled(arms):
            curves = [np.asarray(variant(s["eval"], var)["norm_ratio_by_sigma"])
                      for s in by_arm.get(arm, {}).values() if variant(s["eval"], var)]
            if curves:
                _band(ax, curves[0][:, 0], np.stack([c[:, 1] for c in curves]), colour, arm, line)
                drew = True
        return drew

    return _sigma_panels(grouped, reward, path, draw, 1.0, "||v_theta|| / ||v_ref||")


def plot_norm_differences(grouped: dict, reward: str, arms, path: str) -> bool:
    """Each arm's norm ratio minus its own seed's base run's against sigma (final evaluation, CFG-free and CFG
    4.5), mean and 95% t band over seeds, one panel per method and guidance (`arms`: the base first)."""
    def draw(ax, by_arm, var):
        drew = False
        for arm, colour, line in _styled(arms)[1:]:
            d = ratio_differences(by_arm.get(arms[0], {}), by_arm.get(arm, {}), var)
            if d:
                _band(ax, d["sigma"], np.asarray(list(d["by_seed"].values())), colour, f"{arm} - {arms[0]}", line)
                drew = True
        return drew

    return _sigma_panels(grouped, reward, path, draw, 0.0, "norm ratio - base's (same seed)", ": paired difference")


def plot_trajectories(grouped: dict, reward: str, arms, path: str) -> bool:
    """Evaluation reward and KID against epoch, mean and 95% t band over seeds, per method and arm."""
    methods = sorted(m for r, m in grouped if r == reward)
    if not methods:
        return False
    fig, axes = _figure((4 * len(methods), 6.4), 2, len(methods))
    for j, m in enumerate(methods):
        for i, key in enumerate(("reward", "kid")):
            ax = axes[i][j]
            for arm, colour, line in _styled(arms):
                runs = list(grouped[(reward, m)].get(arm, {}).values())
                if not runs:
                    continue
                series = [[(0, s["eval_initial"].get(key))] + [(h["epoch"], h.get(key)) for h in s.get("history", [])]
                          for s in runs]
                epochs = [e for e, _ in series[0]]
                ys = np.asarray([[np.nan if v is None else v for _, v in ser] for ser in series if len(ser) == len(epochs)],
                                np.float64)
                _band(ax, epochs, ys, colour, arm, "o" + line, ms=3)
            ax.set_title(f"{m}: evaluation {key}")
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_few_step(grouped: dict, reward: str, arms, path: str) -> bool:
    """KID at 4, 6 and 20 sampling steps (final evaluation), mean and 95% t interval over seeds, per arm."""
    methods = sorted(m for r, m in grouped if r == reward)
    steps = (("kid_steps4", 4), ("kid_steps6", 6), ("kid", 20))
    if not methods:
        return False
    fig, axes = _figure((4 * len(methods), 3.4), 1, len(methods))
    for j, m in enumerate(methods):
        ax = axes[0][j]
        for arm, colour, line in _styled(arms):
            pts = []
            for key, n in steps:
                iv = stats.interval(values(grouped[(reward, m)].get(arm, {}), lambda s: endpoint(s, key)), n_boot=10)
                if iv.n:
                    pts.append((n, iv))
            if pts:
                ax.errorbar([n for n, _ in pts], [iv.mean for _, iv in pts], fmt="o" + line, color=colour, label=arm, capsize=3,
                            yerr=[[iv.mean - iv.t_low if iv.n > 1 else 0 for _, iv in pts],
                                  [iv.t_high - iv.mean if iv.n > 1 else 0 for _, iv in pts]])
        ax.set_xscale("log")
        ax.set_xticks([4, 6, 20], ["4", "6", "20"])
        ax.set_title(f"{m}: KID against sampling steps")
        ax.legend(fontsize=7)
    return _save(fig, path)


FRONTIER_OTHER = "base + setting (e.g. KL weight)"


def frontier_points(grouped: dict, reward: str, base_arm: str, ng_arms) -> dict:
    """method -> family ("NormGuard": the `ng_arms`; FRONTIER_OTHER: every other non-base arm) -> [(arm,
    reward-gain interval, KID interval)], both intervals over the paired differences arm - base of the same
    seeds, sorted by reward gain."""
    ng_arms = set(ng_arms)
    members = {"NormGuard": lambda a: a in ng_arms, FRONTIER_OTHER: lambda a: a != base_arm and a not in ng_arms}
    kid = lambda s: endpoint(s, "kid")  # noqa: E731
    out = {}
    for (r, m), by_arm in sorted(grouped.items()):
        if r != reward:
            continue
        base = by_arm.get(base_arm, {})
        for family, member in members.items():
            pts = []
            for a in sorted(a for a in by_arm if member(a)):
                g_, k_ = (stats.interval(stats.paired(values(base, fn), values(by_arm[a], fn)), n_boot=10)
                          for fn in (reward_gain, kid))
                if g_.n and k_.n:
                    pts.append((a, g_, k_))
            out.setdefault(m, {})[family] = sorted(pts, key=lambda p: p[1].mean)
    return out


def frontier_dominance(grouped: dict, reward: str, base_arm: str, ng_arms) -> dict:
    """method -> NormGuard arm -> seed -> its final KID minus the other family's (FRONTIER_OTHER, e.g. the
    stronger KL terms) at the same reward gain, read on that family's path through the same seed's runs (sorted
    by gain, linear between the two whose gains bracket NormGuard's: `stats.value_at_reward`); seeds where
    NormGuard's gain lies outside the path are left out (not matchable). Below 0: NormGuard lies below the other
    family at equal reward (better quality for the same reward)."""
    ng_arms = set(ng_arms)
    out = {}
    for (r, m), by_arm in sorted(grouped.items()):
        others = [a for a in by_arm if a != base_arm and a not in ng_arms]
        if r != reward or not others or base_arm not in by_arm:
            continue
        for a in sorted(ng_arms & by_arm.keys()):
            diffs = {}
            for seed, ng in sorted(by_arm[a].items()):
                path = [(reward_gain(by_arm[x][seed]), endpoint(by_arm[x][seed], "kid"))
                        for x in [base_arm, *others] if seed in by_arm[x]]
                path = [p for p in path if None not in p]
                g, k = reward_gain(ng), endpoint(ng, "kid")
                on_path = None if g is None or k is None or len(path) < 2 else stats.value_at_reward(sorted(path), g)
                if on_path is not None:
                    diffs[seed] = k - on_path
            out.setdefault(m, {})[a] = diffs
    return out


def dominance_lines(grouped: dict, reward: str, base_arm: str, ng_arms) -> tuple[list[str], dict]:
    """The report's table of `frontier_dominance` (mean [95% t interval] over seeds), and its JSON."""
    found = frontier_dominance(grouped, reward, base_arm, ng_arms)
    rows, data = [], {}
    for m, by_ng in found.items():
        for a, diffs in by_ng.items():
            iv = stats.interval(diffs)
            seeds = sorted(grouped[(reward, m)][a])
            data.setdefault(m, {})[a] = {"by_seed": diffs, **iv.as_dict()}
            rows.append([m, a, f"{len(diffs)} of {len(seeds)}", _ci(iv, 1),
                         ", ".join(f"{s}: {diffs[s]:+.1f}" if s in diffs else f"{s}: not matchable" for s in seeds)])
    if not rows:
        return [], data
    return [f"**Which family dominates** (final KID, CFG-free, of each NormGuard arm minus that of the base method "
            f"with another setting at the same reward gain; per seed, read on the path through that seed's `{base_arm}` "
            "run and its other-setting runs, linear between the two whose gains bracket NormGuard's: a seed outside "
            "them is not matchable. Below 0: NormGuard has the better quality at equal reward; the line between two "
            "runs is an assumption, not a trained model):", "",
            _table(["method", "NormGuard arm", "seeds matchable", "KID difference at equal reward", "by seed"], rows),
            ""], data


def plot_frontier(grouped: dict, reward: str, base_arm: str, path: str, ng_arms) -> bool:
    """Each arm's final KID against its reward gain, both as paired differences to the base arm of the same
    seeds (`frontier_points`; the base at 0, 0; mean over seeds, 95% paired t bars from 3 seeds on:
    seed-to-seed differences in the absolute values, which pairing removes, would hide the arms'
    differences). The arms of a family are joined in the order of their reward: NormGuard against the base
    method with another setting (e.g. a stronger KL term to the reference). Lower and further right is better."""
    points = frontier_points(grouped, reward, base_arm, ng_arms)
    if not points or sum(len(pts) for fams in points.values() for pts in fams.values()) < 2:
        return False
    colours = {"NormGuard": "tab:blue", FRONTIER_OTHER: "tab:green"}
    fig, axes = _figure((4.6 * len(points), 4), 1, len(points))
    for j, (m, families) in enumerate(points.items()):
        ax = axes[0][j]
        ax.plot([0], [0], "s", color="tab:red", label="base")
        ax.axhline(0, color="0.8", lw=0.5)
        ax.axvline(0, color="0.8", lw=0.5)
        for family, pts in families.items():
            if not pts:
                continue
            err = lambda ivs: [[iv.mean - iv.t_low if iv.n > 2 else 0 for iv in ivs],  # noqa: E731
                               [iv.t_high - iv.mean if iv.n > 2 else 0 for iv in ivs]]
            ax.plot([g.mean for _, g, _ in pts] + [0.0], [k.mean for _, _, k in pts] + [0.0], "-",
                    color=colours[family], lw=1)  # the family's path, from the base (its weight 0)
            ax.errorbar([g.mean for _, g, _ in pts], [k.mean for _, _, k in pts], xerr=err([g for _, g, _ in pts]),
                        yerr=err([k for _, _, k in pts]), fmt="o", color=colours[family], label=family, capsize=2)
            for a, g, k in pts:
                ax.annotate(a, (g.mean, k.mean), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("reward gain - base (paired)")
        ax.set_ylabel("KID - base (final, CFG-free, paired)")
        ax.set_title(f"{m}: reward against quality")
        ax.legend(fontsize=7)
    return _save(fig, path)


def sample_comparison(workdir: str, runs: dict, reward: str, seed: int, arms, path: str) -> bool:
    """The final sample grids (CFG-free, and CFG 4.5 when evaluated) of one seed's runs of `arms`, side by side
    (one column per arm, one row per method and guidance, each under a caption): the same prompts and
    evaluation noise in every column."""
    from PIL import Image, ImageDraw

    rows: dict[tuple[str, str], dict[str, Image.Image]] = {}
    for name, spec in sorted(runs.items(), key=lambda kv: kv[1].method):
        if spec.reward != reward or spec.seed != seed or spec.arm not in arms:
            continue
        epochs = int(spec.config.rl.epochs)
        for suffix, label in (("", "CFG-free"), ("_guided", "CFG 4.5")):
            png = os.path.join(workdir, name, "samples", f"epoch_{epochs:04d}{suffix}.png")
            if storage.is_file(png):
                rows.setdefault((spec.method, label), {})[spec.arm] = Image.open(
                    io.BytesIO(storage.path(png).read_bytes())).convert("RGB")
    if not rows:
        return False
    cols = [a for a in arms if any(a in r for r in rows.values())]
    width = max(im.width for r in rows.values() for im in r.values())
    height = max(im.height for r in rows.values() for im in r.values())
    gap, caption = 8, 14
    out = Image.new("RGB", (len(cols) * (width + gap) - gap, len(rows) * (height + caption)), "white")
    draw = ImageDraw.Draw(out)
    for i, ((method, label), by_arm) in enumerate(rows.items()):
        y = i * (height + caption)
        for j, arm in enumerate(cols):
            x = j * (width + gap)
            draw.text((x + 2, y + 1), f"{method} {arm}, seed {seed}, {label}", fill="black")
            if arm in by_arm:
                out.paste(by_arm[arm], (x, y + caption))
    logs.write_png(path, out)
    return True


def controls_table(grouped: dict, reward: str, ng_arm: str, controls) -> tuple[list[str], dict]:
    """NormGuard against each control arm (e.g. the base method with a stronger KL term), paired by seed: the
    Markdown lines and {method/control: {endpoint: interval of the paired differences, with its seeds}}."""
    rows, data = [], {}
    for (r, method), by_arm in sorted(grouped.items()):
        if r != reward or ng_arm not in by_arm:
            continue
        for ctrl in controls:
            if ctrl not in by_arm:
                continue
            cell = data.setdefault(f"{method}/{ctrl}", {})
            for name, label, fn in (("gain", "reward gain", reward_gain),
                                    ("kid", "KID, CFG-free", lambda s: endpoint(s, "kid")),
                                    ("kid_guided", "KID, CFG 4.5", lambda s: endpoint(s, "kid_guided")),
                                    ("ratio", "norm ratio, CFG-free", lambda s: endpoint(s, "ratio")),
                                    ("ratio_guided", "norm ratio, CFG 4.5", lambda s: endpoint(s, "ratio_guided"))):
                c_, n_ = values(by_arm[ctrl], fn), values(by_arm[ng_arm], fn)
                d = stats.paired(c_, n_)
                cell[name] = {"by_seed": d, **stats.interval(d).as_dict()}
                k = _digits(name)
                rows.append([method, ctrl, label, _ci(stats.interval(c_), k), _ci(stats.interval(n_), k),
                             _ci(stats.interval(d), k)])
            m = matched_kid_between(by_arm[ctrl], by_arm[ng_arm])
            cell["matched_kid"] = {"by_seed": m, **stats.interval(m).as_dict()}
            rows.append([method, ctrl, f"KID at matched reward, CFG-free ({len(m)} of "
                         f"{len(by_arm[ctrl].keys() & by_arm[ng_arm].keys())} seeds matchable)", "", "",
                         _ci(stats.interval(m), 1)])
    if not rows:
        return [], data
    return ["### NormGuard against the controls (mean [95% t interval] over seeds)", "",
            _table(["method", "control", "endpoint", "control", ng_arm, f"{ng_arm} - control (paired)"], rows), "",
            "KID at matched reward: per seed, the run with the higher final reward is read along its own evaluation "
            "trajectory (KID against reward) at the other run's final reward, so both KIDs are taken at the same "
            "reward.", ""], data


RESCALING_DIR = "rescaling"   # as ng_jax.eval.grid.RESCALING
# WORKDIR/analysis/grid_analyses.json: {"settings": ..., "seconds": {analysis: s}} of the analyses finished with them
ANALYSIS_RECORD = "grid_analyses.json"
# (label, the base run's sample: summary variant or rescaling result, the NormGuard sample it is compared with)
RESCALED = (("CFG-free", ("eval", ""), ""), ("CFG-free, renormalised", ("rescaling", "renorm"), ""),
            ("CFG 4.5", ("eval", "guided"), "guided"), ("CFG 4.5, renormalised", ("rescaling", "guided_renorm"), "guided"),
            ("CFG 4.5, CFG-rescale", ("rescaling", "guided_rescale"), "guided"))


def rescaling_section(grouped: dict, workdir: str, runs: dict, reward: str, base_arm: str,
                      ng_arm: str) -> tuple[list[str], dict]:
    """The paper's "rescaling the velocity at inference time does not repair it", seed by seed: each base run's
    final policy sampled with renormalisation to the reference norm (CFG-free and guided) and CFG-rescale
    (WORKDIR/rescaling, same prompts and noise as its final evaluation), against the same run's plain samples
    and its seed's NormGuard run. Claims (Holm across this table's): NormGuard's KID is below the rescaled
    base run's."""
    names = {(spec.method, spec.seed): n for n, spec in runs.items() if spec.arm == base_arm and spec.reward == reward}
    rows, claims, vals, data, commits = [], [], {}, {}, set()
    for (r, method), by_arm in sorted(grouped.items()):
        base, ng = by_arm.get(base_arm, {}), by_arm.get(ng_arm, {})
        rescaled = {seed: storage.read_json(os.path.join(workdir, RESCALING_DIR, f"{names[(method, seed)]}.json"))
                    for seed in base if r == reward and (method, seed) in names}
        rescaled = {seed: x for seed, x in rescaled.items() if x}
        if not rescaled:
            continue
        base = {s: x for s, x in base.items() if s in rescaled}  # every row on the same seeds (a grid in progress)
        commits |= {x.get("commit", "?") for x in rescaled.values()}

        def sample(seed, where):
            kind, name = where
            if kind == "eval":
                return variant(base[seed].get("eval"), name)
            return rescaled[seed]["results"].get(name) if seed in rescaled else None

        cell = data.setdefault(method, {})
        for label, where, ng_var in RESCALED:
            sampled = {s: x for s in base if (x := sample(s, where))}
            b_kid = {s: x["kid"] for s, x in sampled.items() if x.get("kid") is not None}
            b_rew = {s: x["reward"] for s, x in sampled.items() if x.get("reward") is not None}
            n_kid = values(ng, lambda x, v=ng_var: (variant(x.get("eval"), v) or {}).get("kid"))
            d = stats.paired(b_kid, n_kid)
            cell[label] = {"base_kid_by_seed": b_kid, "base_reward_by_seed": b_rew, "ng_minus_base_kid_by_seed": d}
            change = ""
            if where[0] == "rescaling":   # what the rescaling itself did to the base run, against its plain samples
                plain = {s: x["kid"] for s in base if (x := sample(s, ("eval", ng_var))) and x.get("kid") is not None}
                cell[label]["rescaled_minus_plain_kid_by_seed"] = dk = stats.paired(plain, b_kid)
                change = _ci(stats.interval(dk), 1)
                key = f"{method}:{where[1]}"
                claims.append(stats.Claim(f"{method}: NormGuard beats the base run {label} (KID)", key, "below", 0.0,
                                          "NormGuard's KID minus the rescaled base run's below 0"))
                vals[key] = d
            rows.append([method, label, len(b_kid), _ci(stats.interval(b_rew), 3), _ci(stats.interval(b_kid), 1),
                         change, _ci(stats.interval(d), 1)])
    if not rows:
        return [], {}
    verdicts = stats.judge_claims(claims, vals)
    data["verdicts"] = verdicts
    return (["### Inference-time rescaling of the base runs (mean [95% t interval] over seeds)", "",
             "Each base run's final policy, sampled on its final evaluation's prompts and noise with the velocity "
             "renormalised to the reference's norm at every step, or with CFG-rescale (phi as in the analyses), "
             f"against NormGuard's run of the same seed without any rescaling (evaluated at commit(s) "
             f"{', '.join(f'`{c}`' for c in sorted(commits))}). The paper: rescaling at inference time does not "
             "repair the base run; then NormGuard's KID stays below the rescaled base run's. Every row uses the seeds "
             "whose base run has been sampled with rescaling; \"rescaled - plain\" is what the rescaling did to the "
             "base run itself, against its own samples at the same CFG.", "",
             _table(["method", "base run sampled", "seeds", "base reward", "base KID",
                     "base KID: rescaled - plain (paired)", f"{ng_arm} KID - base KID (paired)"],
                    rows), "", _verdict_table(verdicts), ""], data)


def _verdict_table(rows: list[dict]) -> str:
    """Claims as judged by stats.judge_claims: interval, p-values and verdict."""
    return _table(["claim", "margin", "seeds", "mean [95% t]", "bootstrap 95%", "p (one-sided)", "p (Holm)", "verdict"],
                  [[r["claim"], r.get("margin", ""), r.get("n", 0),
                    _ci(stats.Interval(r["n"], r.get("mean", np.nan), r.get("sd", np.nan), r.get("t_low", np.nan),
                                       r.get("t_high", np.nan), r.get("boot_low", np.nan), r.get("boot_high", np.nan)), 4)
                    if r.get("n") else "n/a",
                    f"[{_f(r.get('boot_low'), 4)}, {_f(r.get('boot_high'), 4)}]" if r.get("n", 0) > 1 else "n/a",
                    _f(r.get("p"), 4), _f(r.get("p_holm"), 4), f"**{r['verdict']}**"] for r in rows])


# ------------------------------------------------------------------------------------------ report


def read_summaries(workdir: str, names) -> dict:
    """run name -> its summary.json (None while the run has not finished)."""
    return {n: storage.read_json(os.path.join(workdir, n, "summary.json")) for n in names}


def compute_breakdown(workdir: str, summaries: dict) -> dict | None:
    """Where the finished runs' compute went, in seconds summed over runs, from their metrics.jsonl: training
    epochs (rollouts, rewards, optimizer steps), periodic evaluations, final evaluations (every variant), and
    the rest of their wall_s (compiling, checkpoints, start-up). Attempts of a resumed run all count. None when
    no finished run has metrics."""
    out = {"training": 0.0, "periodic evaluations": 0.0, "final evaluations": 0.0, "rest": 0.0}
    found = False
    for name, s in summaries.items():
        path = os.path.join(workdir, name, "metrics.jsonl")
        if not s or not storage.is_file(path):
            continue
        found, epochs, parts = True, int(s.get("epochs") or 0), dict.fromkeys(out, 0.0)
        for row in logs.read_metrics(path):
            parts["training"] += float(row.get("train/epoch_s") or 0.0)
            if row.get("eval/eval_s") is not None and row.get("step", 0) > 0:
                parts["final evaluations" if row["step"] == epochs else "periodic evaluations"] += float(row["eval/eval_s"])
        parts["rest"] = max(0.0, float(s.get("wall_s") or 0.0) - sum(parts.values()))
        out = {k: out[k] + parts[k] for k in out}
    return out if found else None


def wall_clock_s(summaries) -> float | None:
    """Seconds during which at least one of the runs was training: the union of their [finished_at - wall_s,
    finished_at] spans, so that runs trained side by side (`grid.worker`) count once. None when a finished
    run predates `finished_at`."""
    spans = []
    for s in summaries:
        if s is None:
            continue
        if s.get("finished_at") is None:
            return None
        spans.append((float(s["finished_at"]) - float(s.get("wall_s") or 0.0), float(s["finished_at"])))
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def write_results(config, workdir: str, runs: dict, total_s: float, floors: dict | None = None,
                  mixed_code: dict | None = None, summaries: dict | None = None) -> str:
    """Write `config.results` (Markdown) and its JSON beside it (`<stem>.json`, every number the report
    shows) and its figures in `results/` next to it; returns the Markdown path. `summaries`: the runs'
    (read_summaries), when the caller has read them already."""
    summaries = read_summaries(workdir, runs) if summaries is None else summaries
    g = config.grid
    base_arm, ng_arm = str(g.base_arm), str(g.normguard_arm)
    ng_arms = [a for a in g.arms if g.arms[a].normguard]
    plotted = [base_arm, ng_arm, *(a for a in g.get("controls") or () if a in g.arms)]  # the figures' arms
    margins = {"inflation": float(g.margins.inflation), "reward_kept": float(g.margins.reward_kept)}
    grouped = cells(runs, summaries)
    out_path = str(config.results)
    fig_dir = os.path.join(os.path.dirname(out_path) or ".", "results")
    storage.makedirs(fig_dir)
    verdicts = verdict_rows(grouped, base_arm, ng_arm, margins)
    commits = run_commits(workdir, [n for n in runs if summaries[n] is not None])  # the finished runs
    head = commit()
    rescale_s = sum(float((storage.read_json(os.path.join(workdir, RESCALING_DIR, f)) or {}).get("seconds", 0.0))
                    for f in storage.listdir(os.path.join(workdir, RESCALING_DIR)) if f.endswith(".json"))
    analysis_s = sum(float(x or 0.0) for x in ((storage.read_json(os.path.join(
        workdir, "analysis", ANALYSIS_RECORD)) or {}).get("seconds") or {}).values())  # reused ones included
    compute_s = sum(float(s.get("wall_s") or 0.0) for s in summaries.values() if s) + analysis_s + rescale_s
    wall_s = wall_clock_s(summaries.values())
    first = next(iter(runs.values())).config
    rewards = [r for r in g.rewards if any(rr == r for rr, _ in grouped)]

    md = ["# NormGuard on the toy world: measured results", "",
          f"Produced by `{_command()}` at commit `{head}` on {datetime.date.today().isoformat()} "
          f"({platform.machine()}, {os.cpu_count()} CPU threads). The runs were trained at "
          + ", ".join(f"`{c}` ({len(ns)} runs)" for c, ns in sorted(commits.items()))
          + f"; their compute: {compute_s / 3600:.2f} h in all (training and evaluation, summed over runs"
          + (f", plus {analysis_s / 3600:.2f} h of analyses" if analysis_s else "")
          + (f", plus {rescale_s / 3600:.2f} h sampling the base runs with inference-time rescaling" if rescale_s else "")
          + ")"
          + ("" if wall_s is None else f", {wall_s / 3600:.2f} h of wall clock (runs trained side by side counted once)")
          + f". This invocation took {total_s / 60:.1f} min.",
          ""]
    breakdown = compute_breakdown(workdir, summaries)
    if breakdown and sum(breakdown.values()) > 0:
        total = sum(breakdown.values())
        md += ["Where the runs' compute went (from their metrics, every attempt of a resumed run): " + ", ".join(
            f"{k} {v / 3600:.2f} h ({v / total:.0%})" for k, v in breakdown.items()) + ".", ""]
    md += _code_since_lines(commits, head)
    unfinished = [n for n, x in summaries.items() if x is None]
    if unfinished:
        md += [f"**A snapshot of a grid in progress: {len(runs) - len(unfinished)} of {len(runs)} runs have finished.** "
               "The statistics use the seeds finished so far; the unfinished runs are listed at the end.", ""]
    if mixed_code:
        md += [f"**Warning: these runs come from {len(mixed_code)} different code versions** "
               "(`grid.allow_mixed_code` or `grid.report_only`); their differences may be code, not NormGuard.", ""]
    md += [f"Reference bundle `{config.reference or 'ng_jax/assets/reference'}` (params sha256 "
           f"`{bundle_fingerprint(config.reference or None)[:12]}`), sample space `{config.get('space', 'pixel')}`, "
           f"render `{config.get('render', 'clip')}`. Methods {list(g.methods)} x arms {list(g.arms)} x rewards "
           f"{list(g.rewards)}; seeds " + "; ".join(f"{r}: {list(seeds_of(g, r))}" for r in g.rewards)
           + f". Each run: {first.rl.epochs} epochs of {first.rl.prompts_per_epoch} prompts x {first.rl.group_size} "
           f"samples; evaluated every {first.eval.every} epochs and at the end on the evaluation prompts "
           f"(final evaluation: {_final_n(summaries)} images; {first.eval.num_steps} Euler steps CFG-free, and the "
           f"variants {list(first.eval.variants)} on the same prompts and noise).", "",
           "Each endpoint is a run's final evaluation. NormGuard and base runs of one seed share initialisation, "
           "prompts, rollout noise and evaluation noise: effects are the per-seed differences NormGuard - base, "
           "with their mean, 95% t interval [in brackets] and percentile-bootstrap interval over seeds. A claim "
           "**reproduces** when its one-sided t test, Holm-corrected across all claims of the same reward, has "
           "p < 0.05; it is **contradicted** when the t interval lies entirely on the other side of its margin; "
           "otherwise it is **inconclusive**. Margins: inflation means a base norm ratio above "
           f"{1 + margins['inflation']:.2f} (the paper reports 5-15%); the reward is kept when the gain lost to "
           f"NormGuard is under {margins['reward_kept']:.0%} of the base gain (non-inferiority); quality is restored "
           "when the KID difference is below 0; it is restored more at few steps when NormGuard's relative KID "
           "change, (NormGuard - base) / base, is lower at 4 steps than at 20 (relative, as few-step samples have "
           "a larger KID whatever the model).", ""]
    if floors:
        md += ["Noise floors of the quality measures at the final evaluation's size (real renders against real "
               f"renders of the same prompts, {floors['draws']} draws, N = {floors['n']}): KID {floors['kid_mean']:.1f} "
               f"+- {floors['kid_std']:.1f}, FD {floors['fd_mean']:.1f} +- {floors['fd_std']:.1f}. KID is in the "
               "judge's kernel units (not x 1e3).", ""]
    data = {"commit": head, "run_commits": commits, "compute_s": compute_s, "wall_clock_s": wall_s,
            "compute_breakdown_s": breakdown, "floors": floors, "margins": margins,
            "verdicts": verdicts, "cells": {}}
    for reward in rewards:
        md += [f"## Reward `{reward}`", "", "### Verdicts", "", _verdict_table(verdicts.get(reward, [])), ""]
        rows = []
        for (r, method), arms in sorted(grouped.items()):
            if r != reward:
                continue
            cell = data["cells"].setdefault(f"{reward}/{method}", {})
            base, ng = arms.get(base_arm, {}), arms.get(ng_arm, {})
            for name, (label, _, _, _) in ENDPOINTS.items():
                fn = (lambda s, n=name: endpoint(s, n))
                b, n_ = values(base, fn), values(ng, fn)
                if not b and not n_:
                    continue
                d = stats.paired(b, n_)
                ib, in_, idd = stats.interval(b), stats.interval(n_), stats.interval(d)
                cell[name] = {"base": ib.as_dict(), "normguard": in_.as_dict(), "difference": idd.as_dict(),
                              "base_by_seed": b, "normguard_by_seed": n_}
                k = _digits(name)
                floor = ""
                if floors and name.startswith("kid"):
                    floor = f" (floor +-{floors['kid_std']:.1f})"
                elif floors and name == "fd":
                    floor = f" (floor {floors['fd_mean']:.1f})"
                rows.append([method, label + floor, _ci(ib, k), _ci(in_, k), _ci(idd, k)])
            gains = stats.paired(values(base, reward_gain), values(ng, reward_gain))
            rows.append([method, "reward gain", _ci(stats.interval(values(base, reward_gain)), 3),
                         _ci(stats.interval(values(ng, reward_gain)), 3), _ci(stats.interval(gains), 3)])
            cell["ratio_by_sigma"] = {var or "cfg_free": ratio_differences(base, ng, var) for var in ("", "guided")}
            m = matched_kid(base, ng)
            cell["matched_kid"] = {"by_seed": m, **stats.interval(m).as_dict()}
            rows.append([method, f"KID at matched reward ({len(m)} of {len(ng)} seeds matchable)", "", "",
                         _ci(stats.interval(m), 1)])
            idle = inert_seeds(base, ng)
            cell["inert_seeds"] = idle
            rows.append([method, "seeds where the hinge never fired (runs bit-identical)", "", "",
                         f"{len(idle)} of {len(base.keys() & ng.keys())}"])
        md += ["### Endpoints (final evaluation; mean [95% t interval] over seeds)", "",
               _table(["method", "endpoint", base_arm, ng_arm, f"{ng_arm} - {base_arm} (paired)"], rows), "",
               "KID at matched reward: each NormGuard run against its own seed's base run, whose evaluation "
               "trajectory (KID against reward) is interpolated at NormGuard's final reward; a seed whose reward "
               "lies outside that trajectory is not matchable.", ""]
        if len(g.arms) > 2:
            md += arms_table(grouped, reward, base_arm, list(g.arms))
        if float(g.get("choose_max_gain_loss", 0.0)) > 0:
            lines, data.setdefault("chosen", {})[reward] = choice_lines(grouped, reward, base_arm,
                                                                        float(g.choose_max_gain_loss), ng_arms)
            md += lines
        if g.get("match_weights"):
            lines, data.setdefault("matching_weight", {})[reward] = matching_lines(
                grouped, runs, reward, base_arm, ng_arm, dict(g.match_weights), ng_arms)
            md += lines
        lines, controls = controls_table(grouped, reward, ng_arm, tuple(g.get("controls") or ()))
        md += lines
        if controls:
            data.setdefault("controls", {})[reward] = controls
        lines, rescaled = rescaling_section(grouped, workdir, runs, reward, base_arm, ng_arm)
        if rescaled:
            md += lines
            data.setdefault("rescaling", {})[reward] = rescaled
        if plot_frontier(grouped, reward, base_arm, os.path.join(fig_dir, f"frontier_{reward}.png"), ng_arms):
            md += [f"![frontier, {reward}](results/frontier_{reward}.png)", ""]
            lines, dominance = dominance_lines(grouped, reward, base_arm, ng_arms)
            md += lines
            if dominance:
                data.setdefault("frontier_dominance", {})[reward] = dominance
        seed = most_inflating_seed(grouped, reward, base_arm)
        if seed is not None and sample_comparison(workdir, runs, reward, seed, plotted,
                                                  os.path.join(fig_dir, f"samples_{reward}.png")):
            md += [f"Final samples of seed {seed} (the seed whose base runs inflate most under guidance), "
                   f"{', '.join(plotted)} side by side, on the same prompts and noise:", "",
                   f"![samples, {reward}](results/samples_{reward}.png)", ""]
        for kind, fn in (("norms", plot_norms), ("norm_differences", plot_norm_differences),
                         ("trajectories", plot_trajectories), ("few_step", plot_few_step)):
            name = f"{kind}_{reward}.png"
            if fn(grouped, reward, plotted, os.path.join(fig_dir, name)):
                md += [f"![{kind}, {reward}](results/{name})", ""]
    md += analyses_section(workdir, fig_dir)
    md += ["## Every run", "", _table(
        ["run", "commit", "reward (initial -> final)", "ratio sigma>=0.5", "guided ratio", "KID", "FD", "accuracy",
         "minutes"],
        [[n, next((c for c, ns in commits.items() if n in ns), "?"),
          f"{_f(endpoint(s, 'reward', 'eval_initial'), 3)} -> {_f(endpoint(s, 'reward'), 3)}",
          _f(endpoint(s, "ratio"), 4), _f(endpoint(s, "ratio_guided"), 4), _f(endpoint(s, "kid"), 1),
          _f(endpoint(s, "fd"), 1), _f(endpoint(s, "accuracy"), 3), _f((s.get("wall_s") or 0) / 60, 1)]
         if s else [n, "", "not finished", "", "", "", "", "", ""] for n, s in summaries.items()]), ""]
    storage.write_text(out_path, "\n".join(md))
    storage.write_text(os.path.join(fig_dir, os.path.splitext(os.path.basename(out_path))[0] + ".json"),
                       json.dumps(data, indent=1, default=float))
    return out_path


def arms_table(grouped: dict, reward: str, base_arm: str, arms: list[str]) -> list[str]:
    """Every arm against the base arm, paired by seed: the calibration sweep's table."""
    keys = (("gain", "reward gain", reward_gain), ("ratio", "ratio CFG-free", lambda s: endpoint(s, "ratio")),
            ("ratio_guided", "ratio CFG 4.5", lambda s: endpoint(s, "ratio_guided")),
            ("kid", "KID", lambda s: endpoint(s, "kid")), ("kid_guided", "KID CFG 4.5", lambda s: endpoint(s, "kid_guided")))
    rows = []
    for (r, method), by_arm in sorted(grouped.items()):
        if r != reward:
            continue
        base = by_arm.get(base_arm, {})
        for arm in arms:
            if arm not in by_arm:
                continue
            row = [method, arm, len(by_arm[arm])]
            for key, _, fn in keys:
                v = values(by_arm[arm], fn)
                iv = stats.interval(v, n_boot=10)
                cell = _f(iv.mean, _digits(key)) if iv.n else "n/a"
                if arm != base_arm:
                    d = stats.interval(stats.paired(values(base, fn), v), n_boot=10)
                    cell += f" ({d.mean:+.{_digits(key)}f})" if d.n else ""
                row.append(cell)
            rows.append(row)
    return ["### Every arm (mean over seeds; in brackets: the mean paired difference to the base arm)", "",
            _table(["method", "arm", "seeds"] + [label for _, label, _ in keys], rows), ""]


def choose_arm(by_arm: dict, base_arm: str, max_gain_loss: float, candidates=None) -> dict | None:
    """The calibration's rule, fixed before its results: among the arms (`candidates`, default all) that lose at most `max_gain_loss` of
    the base arm's reward gain (mean paired loss over seeds, as a fraction of the base gain on those seeds), the one
    with the largest mean paired KID reduction (CFG-free). None when no arm qualifies; an arm that does not lower
    KID does not (e.g. a NormGuard whose hinge never fired: bit-identical to the base)."""
    base = by_arm.get(base_arm, {})
    base_gains = values(base, reward_gain)
    base_kids = values(base, lambda s: endpoint(s, "kid"))
    best = None
    for arm, runs in by_arm.items():
        if arm == base_arm or (candidates is not None and arm not in candidates):
            continue
        gains = stats.paired(base_gains, values(runs, reward_gain))
        kids = stats.paired(base_kids, values(runs, lambda s: endpoint(s, "kid")))
        base_gain = float(np.mean([base_gains[s] for s in gains])) if gains else float("nan")  # the same seeds
        if not gains or not kids or not base_gain > 0:
            continue
        fraction = -float(np.mean(list(gains.values()))) / base_gain
        kid = float(np.mean(list(kids.values())))
        if fraction <= max_gain_loss and kid < 0 and (best is None or kid < best["kid_difference"]):
            best = {"arm": arm, "gain_loss_fraction": fraction, "kid_difference": kid, "seeds": len(kids)}
    return best


def choice_lines(grouped: dict, reward: str, base_arm: str, max_gain_loss: float,
                 candidates) -> tuple[list[str], dict]:
    """The report's paragraph on the chosen NormGuard arm per method (`grid.choose_max_gain_loss`), and its JSON."""
    chosen = {}
    for (r, method), by_arm in sorted(grouped.items()):
        if r == reward:
            chosen[method] = choose_arm(by_arm, base_arm, max_gain_loss, candidates)
    lines = [f"**Chosen setting** (rule fixed before the last seed was seen: the largest mean KID reduction, CFG-free, among "
             f"the NormGuard arms that lose at most {max_gain_loss:.0%} of the base arm's reward gain; an arm that does "
             "not lower KID does not qualify):"]
    for method, c in chosen.items():
        lines.append(f"- {method}: " + ("no arm qualifies" if c is None else
                                        f"`{c['arm']}` (gain lost {c['gain_loss_fraction']:.1%}, KID "
                                        f"{c['kid_difference']:+.1f}, {c['seeds']} seed{'s' if c['seeds'] > 1 else ''})"))
    return lines + [""], chosen


def matching_weight(by_arm: dict, base_arm: str, target_arm: str, weights: dict) -> dict | None:
    """The weight at which a family of arms (`weights`: arm -> its weight, e.g. the KL-to-reference arms)
    reaches the reward gain of `target_arm` (e.g. NormGuard's): each arm's mean paired gain difference to
    the base, interpolated linearly in weight between the two adjacent weights whose differences bracket
    the target's (a penalty's pull on the policy is proportional to its weight; interpolated in log weight
    between the base arm's 1e-4 and 0.68, the frontier's seed 0 named NFT 0.0081, where a KL run then gained
    as much reward as its base run). None when no two bracket it (the family would need a weight outside
    those tried)."""
    base = values(by_arm.get(base_arm, {}), reward_gain)
    target = stats.paired(base, values(by_arm.get(target_arm, {}), reward_gain))
    if not target:
        return None
    goal = float(np.mean(list(target.values())))
    pts = []
    for arm, w in sorted(weights.items(), key=lambda kv: kv[1]):
        d = stats.paired(base, values(by_arm.get(arm, {}), reward_gain))
        if d and w > 0:
            pts.append((arm, float(w), float(np.mean(list(d.values())))))
    for (a1, w1, g1), (a2, w2, g2) in zip(pts, pts[1:]):
        if min(g1, g2) <= goal <= max(g1, g2) and g1 != g2:
            t = (goal - g1) / (g2 - g1)
            return {"weight": w1 + t * (w2 - w1), "between": [a1, a2],
                    "target_gain_difference": goal, "seeds": len(target)}
    return None


def matching_lines(grouped: dict, runs: dict, reward: str, base_arm: str, ng_arm: str, keys: dict,
                   ng_arms) -> tuple[list[str], dict]:
    """The report's paragraph on the weight of each method's other arms (`grid.match_weights`: method ->
    the dotted config key they set, e.g. "loss.beta"; the base arm counts at its own value of that key) that
    matches NormGuard's reward gain, and its JSON."""
    found, unfinished = {}, set()
    for (r, method), by_arm in sorted(grouped.items()):
        if r != reward or method not in keys:
            continue
        weights = {}
        for spec in runs.values():  # the base arm too: the family at the method's default weight (difference 0)
            if spec.method == method and spec.reward == reward and spec.arm in by_arm and spec.arm not in ng_arms:
                value = get_dotted(spec.config, str(keys[method]))
                if value is MISSING:
                    raise ConfigError(f"grid.match_weights.{method}={keys[method]!r}: no such key in the runs' config")
                weights[spec.arm] = float(value)
        found[method] = matching_weight(by_arm, base_arm, ng_arm, weights)
        if ng_arm not in by_arm:
            unfinished.add(method)
    if not found:
        return [], {}
    lines = [f"**Weight matching NormGuard's reward** (`{ng_arm}`; mean paired reward-gain differences to the base, "
             "interpolated linearly in weight):"]
    for method, m in found.items():
        lines.append(f"- {method} (`{keys[method]}`): " + (
            f"no finished `{ng_arm}` run yet" if method in unfinished else "not bracketed by the weights tried"
            if m is None else f"{m['weight']:.3g} (between `{m['between'][0]}` and `{m['between'][1]}`; NormGuard's "
                              f"gain difference {m['target_gain_difference']:+.3f}, {m['seeds']} seed"
                              f"{'s' if m['seeds'] > 1 else ''})"))
    return lines + [""], found


def analyses_section(workdir: str, fig_dir: str) -> list[str]:
    """The analyses of the grid's most inflating seed (WORKDIR/analysis/*.json and their figures)."""
    a_dir = os.path.join(workdir, "analysis")
    an = {k: storage.read_json(os.path.join(a_dir, f"{k}.json")) for k in ("renorm", "few_step", "adjoint")}
    if not any(an.values()):
        return []
    md = ["## Analyses of the most inflating seed's checkpoints", "",
          "Reward / KID of each checkpoint sampled plainly, with every step's velocity rescaled to the reference's "
          "norm (renorm), and with CFG-rescale, CFG-free and at CFG 4.5; KID at 4 to 40 Euler steps; the "
          "adjoint sensitivity of the differentiable verifier to per-step velocity scales, with the number of "
          "steps whose mean derivative differs from 0 (t test, Holm-corrected across steps).", ""]
    if an["renorm"]:
        variants = list(next(iter(an["renorm"].values())))
        md += [_table(["checkpoint"] + variants,
                      [[label] + [f"{_f(v[x].get('reward'), 3)} / {_f(v[x].get('kid'), 1)}" for x in variants]
                       for label, v in an["renorm"].items()]), ""]
    if an["few_step"]:
        steps = next(iter(an["few_step"].values()))["num_steps"]
        md += [_table(["checkpoint"] + [f"KID, {n} steps" for n in steps],
                      [[label] + [_f(k, 1) for k in v.get("kid") or [None] * len(steps)]
                       for label, v in an["few_step"].items()]), ""]
    if an["adjoint"]:
        md += [_table(["checkpoint", "samples", "mean coherence (\\|mean\\| / spread)", "steps with a significant mean"],
                      [[label, r.get("samples"), _f(r.get("mean_coherence")),
                        f"{r.get('significant_steps', 'n/a')} of {len(r.get('sigma', []))}"]
                       for label, r in an["adjoint"].items()]), ""]
    for name in ("renorm.png", "few_step.png", "adjoint.png"):
        src = os.path.join(a_dir, name)
        if storage.is_file(src):
            storage.write_bytes(os.path.join(fig_dir, f"analysis_{name}"), storage.path(src).read_bytes())
            md += [f"![{name[:-4]}](results/analysis_{name})", ""]
    return md


def most_inflating_seed(grouped: dict, reward: str, base_arm: str):
    """The seed whose base runs (of `reward`, over methods) have the largest mean guided norm ratio at
    sigma >= 0.5 (the CFG-free one where no guided evaluation exists); None without finished base runs."""
    by_seed = defaultdict(list)
    for (r, _), arms in grouped.items():
        for seed, s in (arms.get(base_arm, {}) if r == reward else {}).items():
            v = endpoint(s, "ratio_guided") or endpoint(s, "ratio")
            if v is not None:
                by_seed[seed].append(v)
    return max(by_seed, key=lambda k: np.mean(by_seed[k])) if by_seed else None


def seeds_of(grid_cfg, reward: str) -> tuple[int, ...]:
    """The seeds of a grid column: `grid.seeds_by_reward[reward]` if given, else `grid.seeds`."""
    by = grid_cfg.get("seeds_by_reward") or {}
    return tuple(int(s) for s in (by[reward] if reward in by else grid_cfg.seeds))


def _final_n(summaries: dict):
    ns = {s["eval"].get("n_images") for s in summaries.values() if s}
    return ", ".join(str(n) for n in sorted(n for n in ns if n is not None)) or "n/a"
