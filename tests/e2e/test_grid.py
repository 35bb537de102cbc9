"""The reproduction grid end to end at a tiny size: paired runs, noise floors, analyses, the report with its
statistics and verdicts, reuse, and the refusals (the report's statistics on hand-made summaries:
tests/unit/test_grid_report.py)."""

from __future__ import annotations

import copy
import json
import os

import ml_collections as mlc
import pytest

from ng_jax.config.checks import ConfigError
from ng_jax.eval import grid, report
from tests.fixtures import tiny_rl_config

pytestmark = pytest.mark.slow


def _tiny_grid(root, bundle, prompts):
    c = grid.load_config_file("experiments/toy_grid.py")
    c.workdir = str(root / "grid")
    c.reference = bundle
    c.grid.methods = ("awm",)
    c.grid.rewards = ("jpeg_incompressibility",)
    c.grid.seeds = (0, 1)
    c.grid.seeds_by_reward = mlc.ConfigDict()
    c.grid.floor_draws = 3
    c.grid.analysis_reward = "jpeg_incompressibility"
    tiny = tiny_rl_config(bundle, prompts, epochs=2)
    c.overrides = mlc.ConfigDict({
        "data": {"prompt_file": prompts},
        "rl": {k: tiny.rl[k] for k in ("epochs", "prompts_per_epoch", "group_size", "train_batch", "micro_batch",
                                       "num_timesteps")} | {"rollout": {"num_steps": 6, "cfg_scale": 2.0}},
        "optim": {"lr": tiny.optim.lr},
        "loss": {"adv_clip": 1.0},
        "eval": {k: tiny.eval[k] for k in ("prompt_file", "num_prompts", "samples_per_prompt", "batch_size",
                                           "num_steps", "every")}
        | {"final_samples_per_prompt": 4, "quality": True,
           "variants": {"guided": {"cfg_scale": 2.0, "final_only": True},
                        "steps4": {"num_steps": 4, "final_only": True}}},
    })
    c.analysis.samples_per_prompt = 2
    c.analysis.guided_cfg_scale = 2.0   # as the runs' guided evaluation: rescaled samples pair with it
    c.analysis.few_steps = (2, 4)
    c.analysis.adjoint_prompts = 2
    c.analysis.adjoint_samples = 1
    c.results = str(root / "docs" / "RESULTS.md")
    return c


def test_tiny_grid_runs_pairs_reports_reuses_and_refuses(tmp_path, capsys, tiny_reference):
    config = _tiny_grid(tmp_path, tiny_reference.bundle, tiny_reference.prompts)
    names = [f"awm_{arm}_jpeg_incompressibility_s{s}" for arm in ("base", "normguard") for s in (0, 1)]
    order = list(grid.run_specs(config))
    assert sorted(order) == sorted(names)
    # two workers share the runs (here one after the other): each trains its every-other run and stops
    for w in (0, 1):
        config.grid.worker = f"{w}/2"
        assert grid.run(config, config.workdir) == 0
        done = {n for n in names if os.path.isfile(os.path.join(config.workdir, n, "summary.json"))}
        assert done == (set(order[0::2]) if w == 0 else set(order))
        assert not os.path.exists(config.results)  # workers leave the report to the command without grid.worker
    config.grid.worker = ""
    capsys.readouterr()
    assert grid.run(config, config.workdir) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 4
    summaries = {n: json.load(open(os.path.join(config.workdir, n, "summary.json"))) for n in names}
    # paired: every run starts from the one cached evaluation of the reference
    assert len(os.listdir(os.path.join(config.workdir, "initial_evals"))) == 1
    assert len({json.dumps(s["eval_initial"], sort_keys=True) for s in summaries.values()}) == 1
    assert {"guided", "steps4"} <= set(summaries[names[0]]["eval"]["variants"])
    floors = json.load(open(os.path.join(config.workdir, grid.FLOORS)))
    assert floors["n"] == 4 * 4 and floors["draws"] == 3 and floors["fd_mean"] > 0
    for a in ("norms", "renorm", "few_step", "adjoint"):
        assert os.path.isfile(os.path.join(config.workdir, "analysis", f"{a}.json")), a

    # the report: commit, floors, a verdict per claim, and the paired differences of the summaries' numbers
    text = open(config.results).read()
    assert text.startswith("# NormGuard on the toy world") and f"trained at `{report.commit()}` (4 runs)" in text
    assert f"KID {floors['kid_mean']:.1f} +- {floors['kid_std']:.1f}" in text
    data = json.load(open(tmp_path / "docs" / "results" / "RESULTS.json"))
    rows = data["verdicts"]["jpeg_incompressibility"]
    assert len(rows) == 7 and all(r["verdict"] in ("reproduces", "contradicts", "inconclusive", "not measured")
                                  for r in rows)
    kid = data["cells"]["jpeg_incompressibility/awm"]["kid"]
    for s in (0, 1):
        b = summaries[f"awm_base_jpeg_incompressibility_s{s}"]["eval"]["kid"]
        n = summaries[f"awm_normguard_jpeg_incompressibility_s{s}"]["eval"]["kid"]
        assert kid["base_by_seed"][str(s)] == pytest.approx(b) and kid["normguard_by_seed"][str(s)] == pytest.approx(n)
    assert os.path.getsize(tmp_path / "docs" / "results" / "norms_jpeg_incompressibility.png") > 1000
    assert os.path.getsize(tmp_path / "docs" / "results" / "samples_jpeg_incompressibility.png") > 1000
    adjoint = json.load(open(os.path.join(config.workdir, "analysis", "adjoint.json")))
    label = next(k for k in adjoint if k != "reference")
    assert f"| {label} | 2 | {adjoint[label]['mean_coherence']:.3f} | {adjoint[label]['significant_steps']} of" in text

    # the base runs sampled again with inference-time rescaling, in the report beside NormGuard's runs
    rescaled = {s: json.load(open(os.path.join(config.workdir, grid.RESCALING, f"awm_base_jpeg_incompressibility_s{s}.json")))
                for s in (0, 1)}
    for r in rescaled.values():
        assert r["commit"] == report.commit() and set(r["results"]) == {"renorm", "guided_renorm", "guided_rescale"}
        assert all(v["kid"] is not None for v in r["results"].values())
    assert "### Inference-time rescaling of the base runs" in text
    assert "| awm: NormGuard beats the base run CFG 4.5, renormalised (KID) |" in text

    # repeating the command reuses every run and the analyses
    stamps = [os.path.getmtime(os.path.join(config.workdir, n, "summary.json")) for n in names]
    capsys.readouterr()
    assert grid.run(config, config.workdir) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, reused") == 4 and "analyses: finished earlier" in out
    assert "rescaling [" not in out   # reused too
    assert stamps == [os.path.getmtime(os.path.join(config.workdir, n, "summary.json")) for n in names]
    # a copy of the workdir without checkpoints (grid.export), used as the workdir elsewhere: nothing trains or
    # samples there, and its report is the same
    copied = str(tmp_path / "elsewhere" / "grid")
    config.grid.export = copied
    assert grid.run(config, config.workdir) == 0
    config.grid.export = ""
    files = [os.path.relpath(os.path.join(d, f), copied) for d, _, fs in os.walk(copied) for f in fs]
    assert {f.split(os.sep)[0] for f in files} == set(names) | {"initial_evals", "analysis", grid.RESCALING, grid.FLOORS}
    assert not [f for f in files if f.split(os.sep)[1:2] in (["checkpoints"], ["policy"])]
    elsewhere = copy.deepcopy(config)
    elsewhere.results = str(tmp_path / "elsewhere" / "RESULTS.md")
    capsys.readouterr()
    assert grid.run(elsewhere, copied) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, reused") == 4 and "analyses: finished earlier" in out
    assert "rescaling [" not in out

    def body(path):
        return [line for line in open(path).read().splitlines() if not line.startswith("Produced by")]

    assert body(elsewhere.results) == body(config.results)
    assert os.path.getsize(tmp_path / "elsewhere" / "results" / "samples_jpeg_incompressibility.png") > 1000

    # the rescaled samples pair with the run's final evaluation: sampled plain and guided the same way, they
    # reproduce the run's own numbers (same prompts, noise and size)
    plain = {"plain": {}, "guided": {"cfg_scale": 2.0}}
    grid._rescaling(config, config.workdir, grid.run_specs(config), variants=plain)
    for s in (0, 1):
        again = json.load(open(os.path.join(config.workdir, grid.RESCALING, f"awm_base_jpeg_incompressibility_s{s}.json")))
        final = summaries[f"awm_base_jpeg_incompressibility_s{s}"]["eval"]
        for name, ev in (("plain", final), ("guided", final["variants"]["guided"])):
            for k in ("reward", "kid", "norm_ratio"):
                assert again["results"][name][k] == pytest.approx(ev[k], rel=1e-5), (s, name, k)

    # a changed setting is never silently reused
    config.overrides.optim.lr = 2 * config.overrides.optim.lr
    with pytest.raises(ConfigError, match=r"awm_base_jpeg_incompressibility_s0 was started with another config "
                                          r"\(optim.lr"):
        grid.run(config, config.workdir)
    config.overrides.optim.lr = config.overrides.optim.lr / 2
    # ... nor a run trained by other code, unless asked; then the report says so
    with open(os.path.join(config.workdir, names[1], report.RUN_COMMIT), "w") as f:
        f.write("0123abc\n")
    with pytest.raises(ConfigError, match=r"other code than this checkout .*0123abc: " + names[1]):
        grid.run(config, config.workdir)
    config.grid.allow_mixed_code = True
    assert grid.run(config, config.workdir) == 0
    assert "**Warning: these runs come from 2 different code versions**" in open(config.results).read()
