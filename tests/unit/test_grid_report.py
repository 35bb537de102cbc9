"""The grid's run configs (ng_jax.eval.grid) and the verdicts of its report (ng_jax.eval.report) from
hand-made run summaries and analysis files, each verdict derived by hand in the comments.

The grid end to end (real runs, analyses and report): tests/e2e/test_grid.py.
"""

from __future__ import annotations

import json
import os

import pytest

from ng_jax.eval import grid, report
from tests.fixtures import REPO

# ------------------------------------------------------------------ the run configs


def test_grid_config_errors_name_the_key(tmp_path):
    c = grid.load_config_file("experiments/toy_grid.py")
    c.overrides.rl.no_such_knob = 3
    with pytest.raises(KeyError, match="rl.no_such_knob"):
        grid.run_configs(c)
    c = grid.load_config_file("experiments/toy_grid.py")
    c.grid.rewards = ("verifier", "beauty")
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        grid.run_configs(c)
    # The shipped grid: 24 valid runs whose configs differ from the method's config file only where intended.
    c = grid.load_config_file("experiments/toy_grid.py")
    runs = grid.run_configs(c)
    assert len(runs) == 24
    a, b = runs["awm_verifier_s0"], runs["awm_normguard_verifier_s0"]
    assert a.normguard.lam == 0 and b.normguard.lam > 0
    a.normguard, b.normguard = b.normguard, b.normguard
    a.name = b.name
    a.workdir = b.workdir
    assert a.to_dict() == b.to_dict()


# ------------------------------------------------------------------ the report's verdicts

V = "jpeg_compressibility"
INITIAL = 0.5  # every run's initial evaluation reward (the reference's)


def _report(tmp_path, cells, analyses=None):
    """Write one summary.json per run of a 2 methods x {base, NormGuard} x 2 rewards x 2 seeds grid and the
    given analysis files, then the report; returns its text. `cells[(method, reward, normguard)]` holds one
    (norm ratio, reward gain, FD, precision) per seed. All numbers are exact in binary floating point."""
    c = grid.load_config_file("experiments/toy_grid.py")
    c.workdir = str(tmp_path / "grid")
    c.reference = os.path.join(REPO, "ng_jax", "assets", "reference_stage1")
    c.grid.methods, c.grid.rewards, c.grid.seeds = ("awm", "nft"), ("verifier", V), (0, 1)
    c.results = str(tmp_path / "RESULTS.md")
    runs = grid.run_configs(c)
    assert len(runs) == 2 * 2 * 2 * 2
    for name, rc in runs.items():
        key = (rc.rl.method, next(iter(rc.rewards.weights)), float(rc.normguard.lam) > 0)
        ratio, gain, fd, precision = cells[key][rc.seed]
        ev = {"reward": INITIAL + gain, "norm_ratio": ratio, "norm_ratio_by_sigma": [[1.0, ratio], [0.5, ratio]],
              "fd": fd, "precision": precision, "recall": 0.5, "accuracy": 0.5}
        os.makedirs(os.path.join(c.workdir, name))
        with open(os.path.join(c.workdir, name, "summary.json"), "w") as f:
            json.dump({"eval_initial": {"reward": INITIAL, "norm_ratio": 1.0}, "eval": ev}, f)
    os.makedirs(os.path.join(c.workdir, "analysis"))
    for kind, content in (analyses or {}).items():
        with open(os.path.join(c.workdir, "analysis", f"{kind}.json"), "w") as f:
            json.dump(content, f)
    with open(report.write_results(c, c.workdir, runs, {}, 60.0)) as f:
        return f.read()


def _claim(text, start):
    """The one line of the claims section that starts with `start`."""
    section = text[text.index("## The paper's claims, measured here"):]
    lines = [line for line in section.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, section)
    return lines[0]


INFLATES = "- RL post-training inflates"
KEEPS_NORM = "- NormGuard keeps the norm"
KEEPS_REWARD = "- NormGuard keeps the reward"
QUALITY = "- NormGuard restores quality"
RENORM = "- Inference-time renormalisation to the reference norm"
FEW_STEP = "- NormGuard's quality gain is larger at few steps"
MATCHED = "- At matched reward"


def _matched_row(fd, baseline_fd):
    return {"normguard_run": "awm_normguard_verifier_s0", "reward": 0.75, "fd": fd, "precision": 0.5,
            "baseline_run": "awm_verifier_s0", "baseline_epoch": 20, "baseline_reward": 0.75,
            "baseline_fd": baseline_fd, "baseline_precision": 0.5}


def test_verdicts_partly_reproduces_and_does_not_reproduce(tmp_path):
    # Per cell and seed: (norm ratio, reward gain, FD, precision); the report averages the two seeds.
    cells = {
        ("awm", "verifier", False): [(1.25, 0.25, 100, 0.5), (1.0, 0.25, 100, 0.5)],   # ratio 1.125, gain 0.25
        ("awm", V, False): [(0.75, 0.5, 100, 0.5), (1.25, 0.75, 100, 0.5)],            # ratio 1.0, gain 0.625
        ("nft", "verifier", False): [(1.5, 0.0, 50, 0.5), (1.0, 0.0, 50, 0.5)],         # ratio 1.25, gain 0
        ("nft", V, False): [(0.5, -0.25, 60, 0.5), (1.0, 0.0, 60, 0.5)],               # ratio 0.75, gain -0.125
        ("awm", "verifier", True): [(1.0, 0.25, 80, 0.25), (1.0, 0.125, 80, 0.25)],     # gain 0.1875: kept 75%
        ("awm", V, True): [(0.5, 0.5, 120, 0.5), (1.0, 0.5, 120, 0.5)],                # ratio 0.75, kept 80%
        ("nft", "verifier", True): [(0.75, 0.125, 40, 0.25), (0.75, 0.125, 40, 0.25)],
        ("nft", V, True): [(1.0, 0.0, 60, 0.375), (1.0, 0.0, 60, 0.375)],
    }
    renorm = {"reference": {"plain": {"reward": 0.5, "fd": 30, "precision": 0.5},      # not a post-trained one
                            "renorm": {"reward": 0.5, "fd": 20, "precision": 0.5}},
              "awm_verifier_s0": {"plain": {"reward": 0.75, "fd": 100, "precision": 0.5},   # repaired (FD lower)
                                  "renorm": {"reward": 0.75, "fd": 90, "precision": 0.5}},
              "awm_normguard_verifier_s0": {"plain": {"reward": 0.75, "fd": 80, "precision": 0.5},  # not
                                            "renorm": {"reward": 0.75, "fd": 80, "precision": 0.5}}}
    few = {label: {"num_steps": [2, 4], "reward": [0.5, 0.5], "fd": fd} for label, fd in (
        ("reference", [10, 5]),
        ("awm_verifier_s0", [100, 60]), ("awm_normguard_verifier_s0", [70, 50]),   # gains +30 at 2, +10 at 4
        ("nft_verifier_s0", [80, 50]), ("nft_normguard_verifier_s0", [70, 40]),    # gains +10 at 2, +10 at 4
        (f"awm_{V}_s0", [100, 50]), (f"awm_normguard_{V}_s0", [100, 40]))}         # not the analysis reward
    matched = {"rows": [_matched_row(40, 50), _matched_row(55, 60), _matched_row(60, 60)]}
    text = _report(tmp_path, cells, {"renorm": renorm, "few_step": few, "matched": matched})

    # Base ratios 1.125, 1.0, 1.25, 0.75: two cells above 1 (1.0 is not inflation).
    assert _claim(text, INFLATES) == (
        f"{INFLATES} ||v_theta|| over the reference (the paper: by 5-15%): **partly (2 of 4)**. Final mean ratio "
        "of the base runs: 0.750 to 1.250 across the method x reward cells.")
    # NormGuard ratios 1.0, 0.75, 0.75, 1.0: all at or below 1.01.
    assert _claim(text, KEEPS_NORM) == (
        f"{KEEPS_NORM} at or below the reference's (ratio <= 1.01): **reproduces**. With NormGuard: 0.750 to 1.000.")
    # Kept 0.1875 / 0.25 = 75% (awm/verifier) and 0.5 / 0.625 = 80%, the bound (awm/jpeg); the nft cells' base
    # gains are 0 and -0.125.
    assert _claim(text, KEEPS_REWARD) == (
        f"{KEEPS_REWARD} (at least 80% of the base method's gain): **partly (1 of 2)** where the base method "
        f"gained at all (2 of 4 cells had no base gain). Kept: awm/verifier 75%, awm/{V} 80%.")
    # FD 100->80 and 50->40 lower, 100->120 higher, 60->60 equal; no precision higher (0.5->0.5 is equal).
    assert _claim(text, QUALITY) == (
        f"{QUALITY}: FD lower with NormGuard **partly (2 of 4)**; precision higher **does not reproduce**.")
    # The reference is left out; 100->90 is repaired, 80->80 is not.
    assert _claim(text, RENORM) == f"{RENORM} does not repair quality (FD not lower): **partly (1 of 2)**."
    # awm: +30 at 2 steps > +10 at 4; nft: +10, not above +10; the JPEG runs are not the analysis reward's.
    assert _claim(text, FEW_STEP) == (
        f"{FEW_STEP} (FD gain base - NormGuard at the fewest steps above that at the most): **partly (1 of 2)**. "
        "awm: +30.0 at 2 steps, +10.0 at 4; nft: +10.0 at 2 steps, +10.0 at 4.")
    # 40 < 50 and 55 < 60; 60 is not below 60.
    assert _claim(text, MATCHED) == f"{MATCHED} NormGuard has the better FD: **partly (2 of 3)**."

    # The summary verdicts above the claims count the same cells.
    for line in ("- Norm inflation without NormGuard (final mean ratio > 1): 2 of 4 method x reward cells.",
                 "- NormGuard lowers the norm ratio: 3 of 4 cells.",  # 1.0 < 1.125, 0.75 < 1.0, 0.75 < 1.25; not 1.0
                 "- NormGuard improves FD (lower): 2 of 4 cells; precision (higher): 0 of 4 cells.",
                 "- Inference-time renormalisation improves FD of a post-trained checkpoint: 1 of 2 checkpoints.",
                 "- At matched reward, NormGuard has the lower FD in 2 of 3 pairs."):
        assert line in text.splitlines(), line


def test_verdicts_not_measured_and_the_other_way_round(tmp_path):
    # Every base cell inflated (mean 1.0625), every NormGuard cell above 1.01 (1.125), no base gain anywhere,
    # FD always lower with NormGuard, precision higher in one cell.
    base = [(1.0, 0.0, 100, 0.5), (1.125, 0.0, 100, 0.5)]
    guarded = [(1.125, 0.25, 90, 0.5), (1.125, 0.25, 90, 0.5)]
    cells = {(m, r, False): base for m in ("awm", "nft") for r in ("verifier", V)}
    cells |= {(m, r, True): guarded for m in ("awm", "nft") for r in ("verifier", V)}
    cells[("nft", V, True)] = [(1.125, 0.25, 90, 0.75), (1.125, 0.25, 90, 0.75)]
    renorm = {"reference": {"plain": {"reward": 0.5, "fd": 30, "precision": 0.5},
                            "renorm": {"reward": 0.5, "fd": 30, "precision": 0.5}}}
    text = _report(tmp_path, cells, {"renorm": renorm, "matched": {"rows": []}})

    assert "**reproduces**. Final mean ratio of the base runs: 1.062 to 1.062" in _claim(text, INFLATES)
    assert "**does not reproduce**. With NormGuard: 1.125 to 1.125." in _claim(text, KEEPS_NORM)
    assert _claim(text, KEEPS_REWARD) == (
        f"{KEEPS_REWARD} (at least 80% of the base method's gain): **not measured** where the base method gained "
        "at all (4 of 4 cells had no base gain). Kept: none.")
    assert _claim(text, QUALITY) == (
        f"{QUALITY}: FD lower with NormGuard **reproduces**; precision higher **partly (1 of 4)**.")
    # Only the reference was renormalised, and no NormGuard run had a matched baseline.
    assert _claim(text, RENORM).endswith("**not measured**.")
    assert _claim(text, MATCHED).endswith("**not measured**.")
    assert FEW_STEP not in text  # no few-step analysis, no claim


def test_claims_without_analyses_list_only_the_run_claims(tmp_path):
    cells = {(m, r, ng): [(1.0, 0.25, 100, 0.5)] * 2 for m in ("awm", "nft") for r in ("verifier", V)
             for ng in (False, True)}
    text = _report(tmp_path, cells)
    section = text[text.index("## The paper's claims, measured here"):]
    assert [line.split(":")[0] for line in section.splitlines() if line.startswith("- ")] == [
        f"{INFLATES} ||v_theta|| over the reference (the paper", f"{KEEPS_NORM} at or below the reference's (ratio <= 1.01)",
        f"{KEEPS_REWARD} (at least 80% of the base method's gain)", QUALITY]
    assert "**does not reproduce**" in _claim(text, INFLATES)  # 1.0 everywhere: no inflation
    assert "## 4. Inference-time" not in text and "## 6. Matched-reward" not in text
