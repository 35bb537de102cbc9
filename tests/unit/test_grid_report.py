"""The grid's run specs (ng_jax.eval.grid) and its report (ng_jax.eval.report) from hand-made run summaries:
paired statistics, Holm-corrected three-way verdicts, matched-reward control, the mixed-code refusal.

The grid end to end (real runs, report, reuse): tests/e2e/test_grid.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from ng_jax import logs, storage
from ng_jax.config.checks import ConfigError
from ng_jax.eval import evaluate, grid, report, stats
from tests.fixtures import REPO
from tests.gcs import BUCKET


def test_grid_config_errors_name_the_key():
    c = grid.load_config_file("experiments/toy_grid.py")
    c.overrides.rl.no_such_knob = 3
    with pytest.raises(KeyError, match="rl.no_such_knob"):
        grid.run_specs(c)
    c = grid.load_config_file("experiments/toy_grid.py")
    c.grid.rewards = ("verifier", "beauty")
    with pytest.raises(ValueError, match="unknown reward 'beauty'"):
        grid.run_specs(c)
    c = grid.load_config_file("experiments/toy_grid.py")
    c.grid.methods = ("nft,awm",)   # what --config.grid.methods=nft,awm gives
    with pytest.raises(ValueError, match="one item holding a comma"):
        grid.run_specs(c)
    c.grid.methods = ("nft", "sgd")
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        grid.run_specs(c)
    c = grid.load_config_file("experiments/toy_grid.py")
    c.grid.arms.normguard.set = "normguard.lamda=0.3"
    with pytest.raises(KeyError, match="normguard.lamda"):
        grid.run_specs(c)


def test_the_shipped_grid_pairs_base_and_normguard_runs():
    c = grid.load_config_file("experiments/toy_grid.py")
    runs = grid.run_specs(c)
    assert len(runs) == 3 * 2 * (5 + 3) + 2 * 5  # the verifier cells run 3 seeds; the KL control: AWM, NFT x 5
    from ng_jax.configs.experiments.toy_grid import KL_CONTROL
    for method, (key, weight) in KL_CONTROL.items():
        kl = runs[f"{method}_kl_preference_s100"].config
        assert kl.normguard.lam == 0 and kl.loss[key.split(".")[1]] == weight
    assert not any(n.startswith("dpo_kl") or (n.split("_")[1] == "kl" and "verifier" in n) for n in runs)
    a, b = runs["awm_base_preference_s100"].config, runs["awm_normguard_preference_s100"].config
    assert a.normguard.lam == 0 and b.normguard.lam > 0
    assert a.space == "centred" and a.eval.variants.guided.cfg_scale == 4.5
    # the two runs of a seed differ in the normguard block (and their names) only
    a.normguard = b.normguard
    a.name, a.workdir = b.name, b.workdir
    assert a.to_dict() == b.to_dict()
    # an arm's settings are parsed as the type they replace
    c.grid.arms.normguard.set = "normguard.lam=0.3,normguard.margin=0.02,normguard.relative=false"
    ng = grid.run_specs(c)["dpo_normguard_verifier_s102"].config.normguard
    assert (ng.lam, ng.margin, ng.relative) == (0.3, 0.02, False)


# ------------------------------------------------------------------ the report from hand-made summaries

SEEDS = (100, 101, 102, 103, 104)


def _summary(ratio, guided_ratio, gain, kid, guided_kid, history=()):
    def ev(r, k, extra=None):
        return {"reward": 1.0 + gain, "norm_ratio_by_sigma": [[1.0, r], [0.75, r], [0.25, 0.5]], "kid": k,
                "fd": 10.0, "n_images": 408, **(extra or {})}
    final = ev(ratio, kid, {"variants": {"guided": ev(guided_ratio, guided_kid)}})
    return {"eval_initial": {"reward": 1.0, "kid": 0.0}, "eval": final, "wall_s": 60.0,
            "history": [{"epoch": e, "reward": r, "kid": k} for e, r, k in history]}


def _write(root, make, methods=("awm",), commit_of=lambda name: report.commit()):
    """A grid in ROOT/grid (a local directory or gs://...) whose runs finished with the summaries `make` returns,
    reported to ROOT/RESULTS.md."""
    c = grid.load_config_file("experiments/toy_grid.py")
    c.workdir = os.path.join(str(root), "grid")
    c.reference = os.path.join(REPO, "ng_jax", "assets", "reference_stage1")
    c.grid.methods, c.grid.rewards, c.grid.seeds = methods, ("preference",), SEEDS
    c.grid.arms = mlc.ConfigDict({a: c.grid.arms[a] for a in ("base", "normguard")})  # the pairs only
    c.grid.controls = ()
    c.results = os.path.join(str(root), "RESULTS.md")
    runs = grid.run_specs(c)
    for name, spec in runs.items():
        storage.write_text(os.path.join(c.workdir, name, "summary.json"), json.dumps(make(spec.method, spec.arm, spec.seed)))
        storage.write_text(os.path.join(c.workdir, name, report.RUN_COMMIT), commit_of(name) + "\n")
    return c, runs


def _verdict(text, claim):
    rows = [line for line in text.splitlines() if line.startswith(f"| {claim} |")]
    assert len(rows) == 1, (claim, text)
    return rows[0].rstrip(" |").rsplit("**", 2)[-2]


# base inflates by 8% guided (+-0.01 over seeds) and 1% CFG-free; NormGuard takes 6 points off the guided
# ratio, keeps 95% of the gain, and lowers KID by 10 +- 2 CFG-free; guided KID differences straddle 0.
JITTER = dict(zip(SEEDS, (-0.01, 0.0, 0.01, 0.005, -0.005)))


def _paired(method, arm, seed):
    j = JITTER[seed]
    if arm == "base":
        return _summary(1.01 + j, 1.08 + j, 0.5 + j, 50.0 + 100 * j, 60.0,
                        history=[(5, 1.2, 20.0), (10, 1.4, 40.0), (20, 1.5 + j, 50.0 + 100 * j)])
    return _summary(0.99 + j, 1.02 + j, 0.475 + j, 40.0 + 100 * j + 2 * (seed % 2), 60.0 + 3 * (1 - 2 * (seed % 2)))


def test_a_normguard_that_never_fired_is_not_credited_with_keeping_the_reward(tmp_path):
    # NormGuard runs bit-identical to their base runs (the hinge never fired): zero differences on every seed
    c, runs = _write(tmp_path, lambda method, arm, seed: _paired(method, "base", seed))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    for claim in ("keeps the reward", "lowers the norm (CFG 4.5)", "restores quality (KID, CFG-free)"):
        assert _verdict(text, f"awm: NormGuard {claim}") == "not tested: the hinge never fired (5 of 5 seeds " \
                                                           "bit-identical to base)"
    assert _verdict(text, "awm: base RL inflates the norm (CFG 4.5)") == "reproduces"  # the base claims stand
    assert "| awm | seeds where the hinge never fired (runs bit-identical) |  |  | 5 of 5 |" in text
    # one seed where NormGuard acted: the cell is tested (the idle seeds count as the zero effects they are)
    c, runs = _write(tmp_path / "b", lambda method, arm, seed: _paired(method, arm if seed == 100 else "base", seed))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert "not tested" not in text and "| awm | seeds where the hinge never fired (runs bit-identical) |  |  | 4 of 5 |" in text


def test_report_verdicts_from_paired_seeds(tmp_path):
    c, runs = _write(tmp_path, _paired)
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert _verdict(text, "awm: base RL inflates the norm (CFG 4.5)") == "reproduces"
    assert _verdict(text, "awm: base RL inflates the norm (CFG-free)") == "contradicts"   # 1.01 +- 0.01 < 1.03
    assert _verdict(text, "awm: NormGuard lowers the norm (CFG 4.5)") == "reproduces"
    assert _verdict(text, "awm: NormGuard keeps the reward") == "reproduces"             # -0.025 > -0.1
    assert _verdict(text, "awm: NormGuard restores quality (KID, CFG-free)") == "reproduces"
    assert _verdict(text, "awm: NormGuard restores quality (KID, CFG 4.5)") == "inconclusive"
    data = json.load(open(tmp_path / "results" / "RESULTS.json"))
    kid = data["cells"]["preference/awm"]["kid"]["difference"]
    d = [40.0 + 2 * (s % 2) - 50.0 for s in SEEDS]
    iv = stats.interval(d)
    assert kid["mean"] == pytest.approx(np.mean(d)) and kid["t_low"] == pytest.approx(iv.t_low)
    # matched reward: NormGuard's final reward 1.475 + j lies on the base trajectory between epochs 10 (1.4, KID 40)
    # and 20 (1.5 + j, 50 + 100 j); interpolated there, every seed is matchable
    m = data["cells"]["preference/awm"]["matched_kid"]
    assert m["n"] == 5
    j = JITTER[100]
    at = 40.0 + (50.0 + 100 * j - 40.0) * (1.475 + j - 1.4) / (1.5 + j - 1.4)
    assert m["by_seed"]["100"] == pytest.approx(40.0 + 100 * j - at)
    assert "(5 of 5 seeds matchable)" in text
    for fig in ("norms_preference.png", "trajectories_preference.png", "few_step_preference.png"):
        assert os.path.getsize(tmp_path / "results" / fig) > 1000
    assert "Warning" not in text and f"`{report.commit()}` (10 runs)" in text


def test_few_step_claim_compares_relative_kid_changes_at_4_and_20_steps(tmp_path):
    """NormGuard removes 20% of the base KID at 20 steps and 40% at 4 steps (where KID is 4x larger): the relative
    contrast is -0.2 on every seed (+- jitter) and the claim reproduces; the absolute differences would say the
    same for the wrong reason, so the test makes them disagree in a second grid (a smaller absolute drop at 4 steps
    that is still a larger share)."""
    def make(kid4_base, kid4_ng):
        def f(method, arm, seed):
            j = JITTER[seed]
            s = _paired(method, arm, seed)
            base_kid = 50.0 + 100 * j
            kid20 = base_kid if arm == "base" else 0.8 * base_kid
            s["eval"]["kid"] = kid20
            s["eval"]["variants"]["steps4"] = {"kid": (kid4_base if arm == "base" else kid4_ng) * (1 + j)}
            return s
        return f

    c, runs = _write(tmp_path, make(200.0, 120.0))   # -40% at 4 steps, -20% at 20
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    claim = "awm: NormGuard restores more quality at 4 steps than at 20 (KID, CFG-free)"
    assert _verdict(text, claim) == "reproduces"
    data = json.load(open(tmp_path / "results" / "RESULTS.json"))
    row = next(r for r in data["verdicts"]["preference"] if r["claim"] == claim)
    assert row["n"] == 5 and row["mean"] == pytest.approx(-0.2)
    c, runs = _write(tmp_path / "b", make(20.0, 18.0))   # -2 absolute (smaller than -10 at 20 steps) but -10%: worse
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert _verdict(text, claim) == "contradicts"         # +0.1 on every seed: the interval lies above 0


def test_rescaled_base_runs_are_paired_with_normguard_by_seed(tmp_path):
    """The base runs sampled with inference-time rescaling (WORKDIR/rescaling, as grid._rescaling writes them):
    renormalising lowers the base KID by 2, which leaves NormGuard 8 +- 2 below it (reproduces); guided, NormGuard's
    KID 60 +- 3 against the renormalised base's 59 is inconclusive."""
    c, runs = _write(tmp_path, _paired)
    for name, spec in runs.items():
        if spec.arm == "base":
            base_kid = 50.0 + 100 * JITTER[spec.seed]
            storage.write_text(os.path.join(c.workdir, grid.RESCALING, f"{name}.json"), json.dumps(
                {"commit": "feed123", "seconds": 360.0, "results": {"renorm": {"reward": 1.4, "kid": base_kid - 2},
                                                                    "guided_renorm": {"reward": 1.3, "kid": 59.0},
                                                                    "guided_rescale": {"reward": 1.3, "kid": 65.0}}}))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert "evaluated at commit(s) `feed123`" in text and "plus 0.50 h sampling the base runs" in text
    assert _verdict(text, "awm: NormGuard beats the base run CFG-free, renormalised (KID)") == "reproduces"
    assert _verdict(text, "awm: NormGuard beats the base run CFG 4.5, renormalised (KID)") == "inconclusive"
    data = json.load(open(tmp_path / "results" / "RESULTS.json"))["rescaling"]["preference"]["awm"]
    d = data["CFG-free, renormalised"]["ng_minus_base_kid_by_seed"]
    assert d == {str(seed): pytest.approx(-8.0 + 2 * (seed % 2)) for seed in SEEDS}
    assert data["CFG 4.5"]["base_kid_by_seed"] == {str(seed): 60.0 for seed in SEEDS}   # the summaries' guided KID
    # what the rescaling did to the base run itself: -2 CFG-free, 59 - 60 and 65 - 60 against its guided samples
    assert data["CFG-free, renormalised"]["rescaled_minus_plain_kid_by_seed"] == {
        str(seed): pytest.approx(-2.0) for seed in SEEDS}
    assert data["CFG 4.5, renormalised"]["rescaled_minus_plain_kid_by_seed"] == {str(s): -1.0 for s in SEEDS}
    assert data["CFG 4.5, CFG-rescale"]["rescaled_minus_plain_kid_by_seed"] == {str(s): 5.0 for s in SEEDS}
    assert "rescaled_minus_plain_kid_by_seed" not in data["CFG-free"]


def test_rescaling_rows_use_only_the_seeds_sampled_with_rescaling(tmp_path):
    """In a grid in progress some base runs have no rescaled samples yet: the plain rows of the rescaling table
    must then use the same seeds as the rescaled ones, or the table compares different seed sets."""
    c, runs = _write(tmp_path, _paired)
    done = SEEDS[:3]
    for name, spec in runs.items():
        if spec.arm == "base" and spec.seed in done:
            storage.write_text(os.path.join(c.workdir, grid.RESCALING, f"{name}.json"), json.dumps(
                {"commit": "feed123", "seconds": 360.0, "results": {"renorm": {"reward": 1.4, "kid": 1.0}}}))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    data = json.load(open(tmp_path / "results" / "RESULTS.json"))["rescaling"]["preference"]["awm"]
    want = {str(s) for s in done}
    assert set(data["CFG-free"]["base_kid_by_seed"]) == want and set(data["CFG 4.5"]["base_kid_by_seed"]) == want
    assert set(data["CFG-free, renormalised"]["ng_minus_base_kid_by_seed"]) == want
    assert [line for line in text.splitlines() if line.startswith("| awm | CFG-free |")][0].split(" | ")[2] == "3"


def test_holm_across_methods_and_not_matchable_seeds(tmp_path):
    # three methods, each with a weak KID improvement (raw one-sided p between 0.05/6 and 0.05): significant
    # alone, not after Holm across the 18 claims
    d = {100: -3.0, 101: -1.0, 102: -4.0, 103: -2.0, 104: 0.5}

    def make(method, arm, seed):
        if arm == "base":
            return _summary(1.0, 1.0, 0.5, 50.0, 50.0, history=[(10, 1.1, 45.0), (20, 1.5, 50.0)])
        return _summary(1.0, 1.0, 0.7, 50.0 + d[seed], 50.0)   # final reward 1.7: beyond the base trajectory

    c, runs = _write(tmp_path, make, methods=("nft", "awm", "dpo"))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    p = stats.one_sided_p(list(d.values()), 0.0, "below")
    assert 0.05 / 6 < p < 0.05
    for m in ("nft", "awm", "dpo"):
        assert _verdict(text, f"{m}: NormGuard restores quality (KID, CFG-free)") == "inconclusive"
        assert _verdict(text, f"{m}: base RL inflates the norm (CFG 4.5)") == "contradicts"
    assert "(0 of 5 seeds matchable)" in text


def test_runs_from_other_code_are_refused_unless_allowed(tmp_path):
    c, runs = _write(tmp_path, lambda m, a, s: _summary(1.0, 1.0, 0.5, 50.0, 50.0),
                     commit_of=lambda name: "abc1234" if name.endswith("s101") else report.commit())
    with pytest.raises(ConfigError, match=r"other code than this checkout .*abc1234: awm_base_preference_s101, "
                                          r"awm_normguard_preference_s101 \(2 runs\).*allow_mixed_code=True"):
        grid.check_code(c.workdir, runs, report.commit(), allow=False)
    mixed = grid.check_code(c.workdir, runs, report.commit(), allow=True)
    assert sorted(mixed["abc1234"]) == ["awm_base_preference_s101", "awm_normguard_preference_s101"]
    text = open(report.write_results(c, c.workdir, runs, 60.0, mixed_code=mixed)).read()
    assert "**Warning: these runs come from 2 different code versions**" in text
    assert grid.check_code(c.workdir, [n for n in runs if not n.endswith("s101")], report.commit(), False) is None


def test_frontier_and_the_kl_control(tmp_path):
    # NormGuard (lam1) and the KL control (kl1) gain the same reward; NormGuard's KID is 15 lower on every seed
    kid = {"base": 80.0, "lam0p3": 70.0, "lam1": 50.0, "kl1": 65.0}
    gain = {"base": 0.6, "lam0p3": 0.55, "lam1": 0.5, "kl1": 0.5}

    def make(method, arm, seed):
        return _summary(1.0, 1.0, gain[arm], kid[arm] + (seed - 100), 50.0)

    c = grid.load_config_file("experiments/toy_grid.py")
    c.workdir, c.results = str(tmp_path / "grid"), str(tmp_path / "RESULTS.md")
    c.reference = os.path.join(REPO, "ng_jax", "assets", "reference_stage1")
    c.grid.methods, c.grid.rewards, c.grid.seeds = ("awm",), ("preference",), SEEDS
    c.grid.arms = {"base": {"normguard": False, "set": ""}, "lam0p3": {"normguard": True, "set": "normguard.lam=0.3"},
                   "lam1": {"normguard": True, "set": "normguard.lam=1.0"},
                   "kl1": {"normguard": False, "set": "", "set_by_method": {"awm": "loss.beta=1.0"}}}
    c.grid.normguard_arm, c.grid.controls = "lam1", ("kl1",)
    runs = grid.run_specs(c)
    assert runs["awm_kl1_preference_s100"].config.loss.beta == 1.0
    for name, spec in runs.items():
        os.makedirs(os.path.join(c.workdir, name))
        with open(os.path.join(c.workdir, name, "summary.json"), "w") as f:
            json.dump(make(spec.method, spec.arm, spec.seed), f)
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert "| awm | kl1 | KID, CFG-free | 67.0 [65.0, 69.0] | 52.0 [50.0, 54.0] | -15.0 [-15.0, -15.0] |" in text
    assert "| awm | kl1 | reward gain | 0.500 [0.500, 0.500] | 0.500 [0.500, 0.500] | 0.000 [0.000, 0.000] |" in text
    assert "| awm | lam0p3 | 5 | 0.550 (-0.050) |" in text   # every arm against base
    assert "Chosen setting" not in text                       # off unless grid.choose_max_gain_loss > 0
    # the calibration's rule: lam0p3 loses 8% of the gain (KID -10); lam1 and kl1 lose 17% (KID -30, -15)
    by_arm = report.cells(runs, {n: storage.read_json(os.path.join(c.workdir, n, "summary.json")) for n in runs})
    by_arm = by_arm[("preference", "awm")]
    assert report.choose_arm(by_arm, "base", 0.1)["arm"] == "lam0p3"
    assert report.choose_arm(by_arm, "base", 0.2) == pytest.approx(
        {"arm": "lam1", "gain_loss_fraction": 0.1 / 0.6, "kid_difference": -30.0, "seeds": 5})
    assert report.choose_arm(by_arm, "base", 0.05) is None
    # an arm identical to the base (a hinge that never fired) loses nothing but lowers nothing: not chosen
    assert report.choose_arm({"base": by_arm["base"], "idle": by_arm["base"]}, "base", 0.1) is None
    c.grid.choose_max_gain_loss = 0.1
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert "- awm: `lam0p3` (gain lost 8.3%, KID -10.0, 5 seeds)" in text
    assert os.path.getsize(tmp_path / "results" / "frontier_preference.png") > 1000


def test_report_only_reports_the_finished_runs_without_training(tmp_path, monkeypatch):
    c, runs = _write(tmp_path, lambda m, a, s: _summary(1.0, 1.05, 0.5, 50.0, 50.0),
                     commit_of=lambda name: "abc1234")   # trained by other code: reported, not refused
    missing = "awm_normguard_preference_s104"
    os.remove(os.path.join(c.workdir, missing, "summary.json"))
    monkeypatch.setattr(grid.loop, "run", lambda *a: pytest.fail("report_only must not train"))
    c.grid.report_only, c.grid.floor_draws, c.grid.analysis_reward = True, 0, ""
    assert grid.run(c, c.workdir) == 0
    text = open(c.results).read()
    assert f"| {missing} |  | not finished |" in text and "`abc1234` (9 runs)" in text


def test_a_moved_grid_reuses_its_runs_and_keeps_new_ones_inside_it(tmp_path, monkeypatch):
    """The workdir given on the command line, not the config's default, holds the runs and the reference's
    cached evaluation; runs recorded at another location (a copy from another machine) are reused there."""
    c, runs = _write(tmp_path, lambda m, a, s: _summary(1.0, 1.05, 0.5, 50.0, 50.0))
    for name, spec in runs.items():
        storage.write_text(os.path.join(c.workdir, name, grid.RUN_CONFIG),
                           spec.config.to_json_best_effort(indent=1, sort_keys=True))
        storage.write_text(os.path.join(c.workdir, name, grid.RUN_REFERENCE), grid.bundle_fingerprint(c.reference) + "\n")
    moved = str(tmp_path / "moved")
    shutil.copytree(c.workdir, moved)
    left = list(runs)[-1]
    os.remove(os.path.join(moved, left, "summary.json"))
    started = {}

    def fake_run(cfg, run_dir):
        started[run_dir] = cfg
        return 1   # stopped

    monkeypatch.setattr(grid.loop, "run", fake_run)
    assert grid.run(c, moved) == 1
    (run_dir, cfg), = started.items()
    assert run_dir == os.path.join(moved, left)
    assert cfg.workdir == run_dir and cfg.eval.initial_cache == os.path.join(moved, "initial_evals")
    # ... under the same file name as before the move: the moved workdir's cached reference evaluation is reused
    toy = type("Stack", (), {"is_toy": True})()
    before, after = (evaluate.initial_evaluation_cache(x, toy) for x in (runs[left].config, cfg))
    assert os.path.dirname(after) == os.path.join(moved, "initial_evals")
    assert os.path.basename(after) == os.path.basename(before)


def test_the_analyses_of_a_snapshot_sample_only_finished_runs(tmp_path, monkeypatch):
    """The analyses' seed is the one whose finished base runs inflate most; a run of that seed still training
    (no policy yet) is left out of them rather than failing the report."""
    c, runs = _write(tmp_path, _paired, methods=("awm", "nft"))
    seed = max(SEEDS, key=JITTER.get)
    missing = f"nft_normguard_preference_s{seed}"
    os.remove(os.path.join(c.workdir, missing, "summary.json"))
    sampled = {}
    monkeypatch.setattr(grid.analyze, "run", lambda cfg, out, **kw: sampled.update(runs=cfg.analysis.checkpoints))
    grid._analyses(c, c.workdir, runs, report.read_summaries(c.workdir, runs), False)
    names = [x.split("=")[0] for x in sampled["runs"].split(",")]
    assert names == ["reference"] + [f"{m}_{a}_preference_s{seed}" for m, a in
                                     (("awm", "base"), ("awm", "normguard"), ("nft", "base"))]


def test_interrupted_analyses_resume_where_they_stopped(tmp_path, monkeypatch):
    """Each analysis is recorded as it finishes: a grid stopped after two of them reruns only the others, runs
    trained since rerun them all, and the report counts every finished analysis's time, reused or not."""
    c, runs = _write(tmp_path, _paired, methods=("awm",))
    summaries = report.read_summaries(c.workdir, runs)
    calls = []

    def fake_run(cfg, out, skip=(), on_finished=None, stop_after=None):
        names = [n for n in grid.analyze.selected(cfg) if n not in skip]
        calls.append(names)
        for i, name in enumerate(names):
            if i == stop_after:
                raise KeyboardInterrupt
            storage.write_text(os.path.join(out, f"{name}.json"), "{}")
            on_finished(name, 600.0)

    monkeypatch.setattr(grid.analyze, "run", lambda *a, **kw: fake_run(*a, **kw, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        grid._analyses(c, c.workdir, runs, summaries, False)
    monkeypatch.setattr(grid.analyze, "run", fake_run)
    grid._analyses(c, c.workdir, runs, summaries, False)
    everything = calls[0]
    assert everything[:4] == ["norms", "renorm", "few_step", "adjoint"] and calls[1] == everything[2:]
    grid._analyses(c, c.workdir, runs, summaries, False)
    assert len(calls) == 2   # all finished: nothing runs
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert f"plus {len(everything) * 600 / 3600:.2f} h of analyses" in text
    grid._analyses(c, c.workdir, runs, summaries, True)
    assert calls[2] == everything
    # a workdir whose analyses earlier code recorded (their settings in RUN_CONFIG, once all had finished)
    a_dir = os.path.join(c.workdir, "analysis")
    settings = storage.read_json(os.path.join(a_dir, report.ANALYSIS_RECORD))["settings"]
    os.remove(os.path.join(a_dir, report.ANALYSIS_RECORD))
    storage.write_text(os.path.join(a_dir, grid.RUN_CONFIG), json.dumps(settings, indent=1))
    grid._analyses(c, c.workdir, runs, summaries, False)
    assert len(calls) == 3
    # a copy of the workdir elsewhere (another machine) reuses them, whether recorded with the runs' paths
    # relative to the workdir or, by earlier code, absolute
    absolute = json.loads(json.dumps(settings).replace("{workdir}", c.workdir))
    assert absolute != settings and grid.portable_settings(absolute) == settings
    storage.write_text(os.path.join(a_dir, grid.RUN_CONFIG), json.dumps(absolute, indent=1))
    copied = str(tmp_path / "elsewhere" / "grid")
    shutil.copytree(c.workdir, copied)
    grid._analyses(c, copied, runs, summaries, False)
    assert len(calls) == 3
    os.remove(os.path.join(copied, "analysis", grid.RUN_CONFIG))
    grid._analyses(c, copied, runs, summaries, False)
    assert calls[3] == everything   # no record at all: everything again


def test_a_worker_says_how_many_of_its_runs_are_left(tmp_path, monkeypatch, capsys):
    """Worker 1/2 of a 10-run grid whose runs 0-3 finished earlier: it trains runs 5, 7 and 9 (run 1 and 3 are
    reused) and counts down the runs left to it."""
    c, runs = _write(tmp_path, _paired)
    names = list(runs)
    sha = grid.bundle_fingerprint(c.reference)
    for n in names[:4]:   # finished by this grid: its recorded config and reference
        storage.write_text(os.path.join(c.workdir, n, grid.RUN_CONFIG), runs[n].config.to_json_best_effort())
        storage.write_text(os.path.join(c.workdir, n, grid.RUN_REFERENCE), sha + "\n")
    for n in names[4:]:
        shutil.rmtree(os.path.join(c.workdir, n))
    trained = []

    def fake_run(config, run_dir):
        trained.append(os.path.basename(run_dir))
        storage.write_text(os.path.join(run_dir, "summary.json"), json.dumps(_paired("awm", "base", 100)))
        return 0

    monkeypatch.setattr(grid.loop, "run", fake_run)
    c.grid.worker = "1/2"
    assert grid.run(c, c.workdir) == 0
    assert trained == names[5::2]
    out = capsys.readouterr().out
    assert [int(x) for x in re.findall(r"trained in [0-9.]+ min; (\d+) run\(s\) left", out)] == [2, 1, 0]


def test_a_grid_in_a_bucket_reports_as_on_the_local_disk(tmp_path, gcs, monkeypatch):
    """The grid's workdir and its report in gs:// (the emulator): `grid.report_only` reads the runs' summaries,
    commits and recorded configs, the floors, the final sample grids and an analysis from the bucket, and writes
    the Markdown, its JSON and its figures there, with the numbers and verdicts of the same grid on the local disk."""
    monkeypatch.setattr(grid.loop, "run", lambda *a: pytest.fail("report_only must not train"))
    floors = {"n": 408, "draws": 3, "kid_mean": 1.0, "kid_std": 0.5, "fd_mean": 2.0, "fd_std": 0.1}
    tile = Image.new("RGB", (32, 16), "red")
    out = {}
    for root in (str(tmp_path), f"gs://{BUCKET}/grid_report"):
        c, runs = _write(root, _paired)
        for name, spec in runs.items():
            run_dir = os.path.join(c.workdir, name)
            logs.write_png(os.path.join(run_dir, "samples", f"epoch_{int(spec.config.rl.epochs):04d}.png"), tile)
            with pytest.raises(ConfigError, match=f"{run_dir} holds a run without {grid.RUN_CONFIG}"):
                grid._check_recorded_config(spec.config, run_dir, "sha")
        storage.write_text(os.path.join(run_dir, grid.RUN_CONFIG), spec.config.to_json_best_effort())
        storage.write_text(os.path.join(run_dir, grid.RUN_REFERENCE), "sha\n")
        grid._check_recorded_config(spec.config, run_dir, "sha")  # recorded: the same config and reference
        storage.write_text(os.path.join(c.workdir, grid.FLOORS), json.dumps(floors))
        storage.write_text(os.path.join(c.workdir, "analysis", "few_step.json"),
                           json.dumps({"reference": {"num_steps": [4, 8], "kid": [3.0, 2.0]}}))
        logs.write_png(os.path.join(c.workdir, "analysis", "few_step.png"), tile)
        c.grid.report_only, c.grid.floor_draws, c.grid.analysis_reward = True, 0, ""
        assert grid.run(c, c.workdir) == 0
        figures = os.path.join(root, "results")
        out[root] = (storage.read_text(c.results), storage.read_json(os.path.join(figures, "RESULTS.json")),
                     {n: storage.path(os.path.join(figures, n)).read_bytes() for n in storage.listdir(figures)})
    (local, local_data, local_figures), (text, data, figures) = out.values()
    assert text.count("**") == local.count("**") > 12 and data == local_data
    for claim in ("base RL inflates the norm (CFG 4.5)", "NormGuard keeps the reward",
                  "NormGuard restores quality (KID, CFG 4.5)"):
        assert _verdict(text, f"awm: {claim}") == _verdict(local, f"awm: {claim}")
    assert [line for line in text.splitlines() if "This invocation took" not in line] == \
        [line for line in local.splitlines() if "This invocation took" not in line]
    assert figures == local_figures  # byte for byte
    assert {"RESULTS.json", "samples_preference.png", "analysis_few_step.png"} <= set(figures)
    assert all(len(figures[f"{k}_preference.png"]) > 1000 for k in ("norms", "trajectories", "few_step"))
    assert "KID 1.0 +- 0.5" in text and "| reference | 3.0 | 2.0 |" in text
    assert not os.path.exists("gs:")  # nothing went to a local directory named after the URI


def test_grid_worker_parses_and_refuses_bad_shares():
    assert grid.parse_worker("") == (0, 1) and grid.parse_worker("1/3") == (1, 3)
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match=r"grid.worker=.*'I/N'"):
            grid.parse_worker(bad)


def test_wall_clock_counts_runs_trained_side_by_side_once():
    side_by_side = [{"finished_at": 100.0, "wall_s": 60.0}, {"finished_at": 130.0, "wall_s": 60.0},
                    {"finished_at": 300.0, "wall_s": 50.0}, None]  # spans 40-100, 70-130, 250-300; one unfinished
    assert report.wall_clock_s(side_by_side) == pytest.approx(90.0 + 50.0)
    assert report.wall_clock_s([{"wall_s": 5.0}]) is None  # a run from before finished_at was recorded


def test_frontier_points_are_paired_differences_to_the_base(tmp_path):
    # seeds differ by a lot in absolute terms (base KID 100 or 900); the arms' differences to the base do not
    base = {0: _summary(1.0, 1.0, 1.0, 100.0, 0.0), 1: _summary(1.0, 1.0, 1.4, 900.0, 0.0)}
    ng = {0: _summary(1.0, 1.0, 0.9, 60.0, 0.0), 1: _summary(1.0, 1.0, 1.3, 860.0, 0.0)}
    ng_strong = {0: _summary(1.0, 1.0, 0.8, 40.0, 0.0), 1: _summary(1.0, 1.0, 1.2, 840.0, 0.0)}
    kl = {0: _summary(1.0, 1.0, 0.9, 90.0, 0.0), 1: _summary(1.0, 1.0, 1.3, 880.0, 0.0)}
    grouped = {("preference", "awm"): {"base": base, "ng_x1": ng, "ng_x3": ng_strong, "kl1": kl}}
    points = report.frontier_points(grouped, "preference", "base", ["ng_x1", "ng_x3"])
    ngs = [(a, round(g.mean, 6), round(k.mean, 6)) for a, g, k in points["awm"]["NormGuard"]]
    assert ngs == [("ng_x3", -0.2, -60.0), ("ng_x1", -0.1, -40.0)]   # sorted by reward gain
    (a, g, k), = points["awm"][report.FRONTIER_OTHER]
    assert (a, round(g.mean, 6), round(k.mean, 6)) == ("kl1", -0.1, -15.0)
    assert report.plot_frontier(grouped, "preference", "base", str(tmp_path / "f.png"), ["ng_x1", "ng_x3"])
    assert os.path.getsize(tmp_path / "f.png") > 1000
    assert not report.plot_frontier({("preference", "awm"): {"base": base}}, "preference", "base",
                                    str(tmp_path / "g.png"), [])


def test_frontier_dominance_reads_the_other_family_at_normguards_reward_seed_by_seed():
    # seed 0: base (gain 1.0, KID 100), kl (0.6, 20): at NormGuard's gain 0.9 the KL path has KID 80,
    # NormGuard has 90 -> +10. Seed 1: NormGuard's gain 1.5 lies above its base run's: not matchable.
    base = {0: _summary(1.0, 1.0, 1.0, 100.0, 0.0), 1: _summary(1.0, 1.0, 1.2, 500.0, 0.0)}
    ng = {0: _summary(1.0, 1.0, 0.9, 90.0, 0.0), 1: _summary(1.0, 1.0, 1.5, 300.0, 0.0)}
    kl = {0: _summary(1.0, 1.0, 0.6, 20.0, 0.0), 1: _summary(1.0, 1.0, 0.8, 100.0, 0.0)}
    grouped = {("preference", "awm"): {"base": base, "ng_x1": ng, "kl1": kl}}
    found = report.frontier_dominance(grouped, "preference", "base", ["ng_x1"])
    assert list(found["awm"]["ng_x1"]) == [0]
    assert found["awm"]["ng_x1"][0] == pytest.approx(10.0)
    assert report.stats.value_at_reward(sorted([(0.0, 10.0), (1.0, 30.0), (0.5, 0.0)]), 0.75) == pytest.approx(15.0)
    assert report.stats.value_at_reward([(0.0, 10.0), (1.0, 30.0)], 1.5) is None
    lines, data = report.dominance_lines(grouped, "preference", "base", ["ng_x1"])
    assert "| awm | ng_x1 | 1 of 2 | 10.0 (1 seed) | 0: +10.0, 1: not matchable |" in "\n".join(lines)
    assert report.frontier_dominance({("preference", "awm"): {"base": base, "ng_x1": ng}}, "preference", "base",
                                     ["ng_x1"]) == {}


def test_matching_weight_interpolates_in_weight_between_the_bracketing_arms():
    def arm(gains):  # seed -> reward gain
        return {s: _summary(1.0, 1.0, g, 0.0, 0.0) for s, g in gains.items()}
    by_arm = {"base": arm({0: 1.0, 1: 2.0}), "ng": arm({0: 0.9, 1: 1.9}),               # NormGuard: -0.1
              "kl1": arm({0: 0.98, 1: 1.98}), "kl10": arm({0: 0.8, 1: 1.8}), "kl100": arm({0: 0.5, 1: 1.5})}
    m = report.matching_weight(by_arm, "base", "ng", {"kl1": 1.0, "kl10": 10.0, "kl100": 100.0})
    # -0.1 lies 0.08 / 0.18 of the way from kl1 (-0.02) to kl10 (-0.2): 1 + 9 * 0.08 / 0.18 = 5
    assert m["between"] == ["kl1", "kl10"] and m["weight"] == pytest.approx(5.0)
    assert m["target_gain_difference"] == pytest.approx(-0.1) and m["seeds"] == 2
    assert report.matching_weight(by_arm, "base", "ng", {"kl10": 10.0, "kl100": 100.0}) is None  # not bracketed
    # in the report, the weights come from the runs' configs (the frontier's KL arms set loss.beta)
    runs = grid.run_specs(grid.load_config_file("experiments/frontier.py"))
    by_arm = {"base": by_arm["base"], "ng_x1": by_arm["ng"], "kl1": by_arm["kl1"], "kl10": by_arm["kl10"]}
    lines, found = report.matching_lines({("preference", "awm"): by_arm}, runs, "preference", "base", "ng_x1",
                                         {"awm": "loss.beta"}, ["ng_x0p33", "ng_x1", "ng_x3"])
    assert found["awm"]["weight"] == pytest.approx(5.0)
    assert "- awm (`loss.beta`): 5 (between `kl1` and `kl10`" in "\n".join(lines)
    # the base arm is the family at its default weight (AWM's loss.beta 1e-4, difference 0): a NormGuard that loses
    # less than the weakest KL arm is matched between the two
    by_arm["ng_x1"] = arm({0: 0.99, 1: 1.99})     # -0.01: between base (0) and kl1 (-0.02)
    _, found = report.matching_lines({("preference", "awm"): by_arm}, runs, "preference", "base", "ng_x1",
                                     {"awm": "loss.beta"}, ["ng_x0p33", "ng_x1", "ng_x3"])
    assert found["awm"]["between"] == ["base", "kl1"]
    assert found["awm"]["weight"] == pytest.approx((1e-4 + 1.0) / 2)
    lines, found = report.matching_lines({("preference", "awm"): {"base": by_arm["base"], "kl1": by_arm["kl1"]}}, runs,
                                         "preference", "base", "ng_x1", {"awm": "loss.beta"}, ["ng_x1"])
    assert found == {"awm": None} and "- awm (`loss.beta`): no finished `ng_x1` run yet" in lines
    with pytest.raises(ConfigError, match=r"grid.match_weights.awm='loss.betta': no such key"):
        report.matching_lines({("preference", "awm"): by_arm}, runs, "preference", "base", "ng_x1",
                              {"awm": "loss.betta"}, ["ng_x1"])


def test_sample_comparison_puts_the_arms_of_one_seed_side_by_side(tmp_path):
    """One column per arm (in the order asked), one row per method and guidance; each grid pasted whole under
    its caption, so the same prompt and noise sit at the same place in every column."""
    c, runs = _write(tmp_path, _paired, methods=("awm", "nft"))
    colours = {"base": (255, 0, 0), "normguard": (0, 0, 255)}
    for name, spec in runs.items():
        if spec.seed == 100:
            for suffix in ("", "_guided"):
                logs.write_png(os.path.join(c.workdir, name, "samples", f"epoch_{int(spec.config.rl.epochs):04d}{suffix}.png"),
                               Image.new("RGB", (40, 30), colours[spec.arm]))
    path = str(tmp_path / "s.png")
    assert report.sample_comparison(c.workdir, runs, "preference", 100, ["normguard", "base", "kl"], path)
    im = Image.open(path).convert("RGB")
    assert im.size == (2 * 40 + 8, 4 * (30 + 14))   # no column for an arm without runs
    for row in range(4):                            # awm / nft x CFG-free / CFG 4.5
        y = row * 44 + 14 + 15
        assert im.getpixel((20, y)) == colours["normguard"] and im.getpixel((48 + 20, y)) == colours["base"]
    assert not report.sample_comparison(c.workdir, runs, "preference", 999, ["base"], str(tmp_path / "t.png"))


def test_norm_ratio_differences_are_paired_per_sigma(tmp_path):
    # seed 1's base inflates much more than seed 0's; NormGuard takes 0.02 and 0.04 off at sigma >= 0.75
    base = {0: _summary(1.02, 1.05, 0.5, 0.0, 0.0), 1: _summary(1.10, 1.15, 0.5, 0.0, 0.0)}
    ng = {0: _summary(1.00, 1.01, 0.5, 0.0, 0.0), 1: _summary(1.06, 1.10, 0.5, 0.0, 0.0),
          2: _summary(1.0, 1.0, 0.5, 0.0, 0.0)}   # a seed without its base run is left out
    d = report.ratio_differences(base, ng)
    assert d["sigma"] == [1.0, 0.75, 0.25] and sorted(d["by_seed"]) == [0, 1]
    assert np.allclose(d["by_seed"][1], [-0.04, -0.04, 0.0])
    assert [round(iv["mean"], 6) for iv in d["difference"]] == [-0.03, -0.03, 0.0]
    iv = stats.interval([-0.02, -0.04])   # two seeds: an interval as wide as t with 1 degree of freedom makes it
    assert (d["difference"][0]["t_low"], d["difference"][0]["t_high"]) == pytest.approx((iv.t_low, iv.t_high))
    assert d["difference"][0]["t_high"] > 0
    g = report.ratio_differences(base, ng, "guided")
    assert np.allclose(g["by_seed"][0], [-0.04, -0.04, 0.0]) and np.allclose(g["by_seed"][1], [-0.05, -0.05, 0.0])
    # evaluated on other sigmas: not paired
    other = {0: json.loads(json.dumps(ng[0]))}
    other[0]["eval"]["norm_ratio_by_sigma"][1][0] = 0.5
    assert report.ratio_differences(base, other) is None
    longer = {**ng, 1: json.loads(json.dumps(ng[1]))}   # seed 1 on more sigmas than seed 0: seed 0 alone
    longer[1]["eval"]["norm_ratio_by_sigma"].append([0.1, 0.5])
    base_longer = {**base, 1: json.loads(json.dumps(base[1]))}
    base_longer[1]["eval"]["norm_ratio_by_sigma"].append([0.1, 0.5])
    assert sorted(report.ratio_differences(base_longer, longer)["by_seed"]) == [0]
    grouped = {("preference", "awm"): {"base": base, "normguard": ng}}
    assert report.plot_norm_differences(grouped, "preference", ["base", "normguard"], str(tmp_path / "d.png"))
    assert os.path.getsize(tmp_path / "d.png") > 1000
    assert not report.plot_norm_differences({("preference", "awm"): {"base": base}}, "preference",
                                            ["base", "normguard"], str(tmp_path / "e.png"))


def test_kid_against_a_control_is_matched_at_the_lower_final_reward():
    ctrl = {0: _summary(1.0, 1.0, 0.4, 30.0, 0.0, history=[(5, 1.2, 10.0), (10, 1.4, 30.0)]),
            1: _summary(1.0, 1.0, 0.4, 30.0, 0.0, history=[(5, 1.2, 10.0), (10, 1.4, 30.0)]),
            2: _summary(1.0, 1.0, -0.1, 5.0, 0.0, history=[(5, 0.95, 3.0), (10, 0.9, 5.0)])}
    ng = {0: _summary(1.0, 1.0, 0.5, 60.0, 0.0, history=[(5, 1.2, 10.0), (10, 1.5, 60.0)]),   # higher reward
          1: _summary(1.0, 1.0, 0.3, 25.0, 0.0, history=[(5, 1.1, 8.0), (10, 1.3, 25.0)]),    # lower reward
          2: _summary(1.0, 1.0, 0.6, 70.0, 0.0, history=[(5, 1.3, 20.0), (10, 1.6, 70.0)])}
    m = report.matched_kid_between(ctrl, ng)
    # seed 0: NormGuard's trajectory at the control's 1.4 (10 + 50 * 2/3) minus the control's 30; seed 1:
    # NormGuard's 25 minus the control's trajectory at 1.3 (20); seed 2: the control's 0.9 is below every
    # reward NormGuard's trajectory (from the reference's 1.0) went through: not matchable
    assert sorted(m) == [0, 1]
    assert m[0] == pytest.approx(10.0 + 50.0 * 2 / 3 - 30.0) and m[1] == pytest.approx(25.0 - 20.0)
    grouped = {("preference", "awm"): {"normguard": ng, "kl": ctrl}}
    lines, data = report.controls_table(grouped, "preference", "normguard", ("kl",))
    assert data["awm/kl"]["matched_kid"]["by_seed"] == m and data["awm/kl"]["gain"]["by_seed"][2] == pytest.approx(0.7)
    assert any("| awm | kl | KID at matched reward, CFG-free (2 of 3 seeds matchable) |" in line for line in lines)


def test_the_report_names_the_package_files_changed_since_the_runs_commit():
    package = os.path.join(REPO, "ng_jax")

    def git(*args):
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True).stdout.strip()

    last = git("log", "-1", "--format=%h", "--", ".")   # the newest commit that changed the package
    if not last or not git("rev-parse", "--verify", "--quiet", f"{last}^"):
        pytest.skip("needs a git checkout with the package's history")
    touched = set(git("show", "--name-only", "--format=", last, "--", ".").splitlines())
    assert touched and touched <= set(report.changed_since(f"{last}^"))
    line = report._code_since_lines({f"{last}^": ["run"]}, report.commit())[0]
    assert line.startswith(f"Package files changed between the runs' commit `{last}^`") and all(
        f"`{f}`" in line for f in touched)
    assert report._code_since_lines({report.commit(): ["run"]}, report.commit()) == []   # trained by this very code
    assert report.changed_since("0123abc") is None
    assert "is not in this checkout's history" in report._code_since_lines({"0123abc": ["run"]}, report.commit())[0]


def test_compute_breakdown_splits_the_runs_time_from_their_metrics(tmp_path):
    rows = [{"step": 0, "eval/eval_s": 0.5},                        # the initial evaluation (cached: not counted)
            {"step": 1, "train/epoch_s": 10.0}, {"step": 2, "train/epoch_s": 12.0}, {"step": 2, "eval/eval_s": 5.0},
            {"step": 1, "train/epoch_s": 11.0},                     # a second attempt after an interruption
            {"step": 4, "train/epoch_s": 9.0}, {"step": 4, "eval/eval_s": 30.0}]
    for name, wall in (("a", 100.0), ("b", 60.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summaries = {"a": {"epochs": 4, "wall_s": 100.0}, "b": {"epochs": 4, "wall_s": 60.0}, "c": None}
    b = report.compute_breakdown(str(tmp_path), summaries)
    assert b == {"training": 84.0, "periodic evaluations": 10.0, "final evaluations": 60.0,
                 "rest": (100.0 - 77.0) + 0.0}   # run b's parts exceed its wall_s: its rest is 0, not negative
    assert report.compute_breakdown(str(tmp_path), {"c": None}) is None


def test_a_report_of_an_unfinished_grid_says_it_is_a_snapshot(tmp_path):
    c, runs = _write(tmp_path, _paired)
    assert "snapshot of a grid in progress" not in open(report.write_results(c, c.workdir, runs, 60.0)).read()
    for name in list(runs)[-2:]:
        os.remove(os.path.join(c.workdir, name, "summary.json"))
    text = open(report.write_results(c, c.workdir, runs, 60.0)).read()
    assert "**A snapshot of a grid in progress: 8 of 10 runs have finished.**" in text
    assert text.count("| not finished |") == 2
