"""The reproduction grid end to end at a tiny size: runs, analyses, the report, and reuse (the report's
verdicts from hand-made summaries and the grid's config errors: tests/unit/test_grid_report.py)."""

from __future__ import annotations

import json
import os

import ml_collections as mlc
import numpy as np
import pytest

from ng_jax.config.checks import ConfigError
from ng_jax.eval import grid
from ng_jax.eval import report
from tests.fixtures import tiny_rl_config

pytestmark = pytest.mark.slow


def _tiny_grid(root, bundle, prompts):
    c = grid.load_config_file("experiments/toy_grid.py")
    c.workdir = str(root / "grid")
    c.reference = bundle
    c.grid.methods = ("awm",)
    c.grid.rewards = ("jpeg_incompressibility",)
    c.grid.seeds = (0,)
    c.grid.analysis_reward = "jpeg_incompressibility"
    tiny = tiny_rl_config(bundle, prompts, epochs=2)
    c.overrides = mlc.ConfigDict({
        "data": {"prompt_file": prompts},
        "rl": {k: tiny.rl[k] for k in ("epochs", "prompts_per_epoch", "group_size", "train_batch", "micro_batch",
                                       "num_timesteps")} | {"rollout": {"num_steps": 6, "cfg_scale": 2.0}},
        "optim": {"lr": tiny.optim.lr},
        "loss": {"adv_clip": 1.0},
        "eval": {k: tiny.eval[k] for k in ("prompt_file", "num_prompts", "samples_per_prompt", "batch_size",
                                           "num_steps", "cfg_scale", "every")},
    })
    c.analysis.samples_per_prompt = 2
    c.analysis.few_steps = (2, 4)
    c.analysis.adjoint_prompts = 2
    c.analysis.adjoint_samples = 1
    c.results = str(root / "docs" / "RESULTS.md")
    return c


def test_tiny_grid_runs_analyses_reports_and_reuses(tmp_path, capsys, tiny_reference):
    bundle = tiny_reference.bundle
    config = _tiny_grid(tmp_path, bundle, tiny_reference.prompts)
    assert grid.run(config, config.workdir) == 0
    names = ["awm_jpeg_incompressibility_s0", "awm_normguard_jpeg_incompressibility_s0"]
    for n in names:
        assert os.path.isfile(os.path.join(config.workdir, n, "policy", "params.msgpack"))
    for a in ("norms", "renorm", "few_step", "adjoint", "matched"):
        assert os.path.isfile(os.path.join(config.workdir, "analysis", f"{a}.json")), a
    text = open(config.results).read()
    assert text.startswith("# NormGuard on the toy world") and "commit `" in text
    sha = json.load(open(os.path.join(bundle, "config.json")))["params_sha256"]
    assert f"trained at commit(s) `{report.commit()}`, from the reference bundle `{bundle}` (params sha256 `{sha[:12]}`)" in text
    for section in ("## 1. Every run", "## 2. Norm inflation", "## 3. NormGuard against", "## 4. Inference-time",
                    "## 5. Few-step", "## 6. Matched-reward", "## 7. Adjoint", "## Verdicts"):
        assert section in text, section
    assert os.path.isfile(tmp_path / "docs" / "results" / "norms.png")
    # The report's numbers are the summaries' numbers.
    s = json.load(open(os.path.join(config.workdir, names[0], "summary.json")))
    gain = s["eval"]["reward"] - s["eval_initial"]["reward"]
    assert f"| {names[0]} | {s['eval_initial']['reward']:.4f} -> {s['eval']['reward']:.4f} | {gain:.4f} |" in text
    # The claims section reads the same summaries (its verdict rules: tests/unit/test_grid_report.py).
    assert "## The paper's claims, measured here" in text
    ratio = f"{s['eval']['norm_ratio']:.3f}"
    assert f"Final mean ratio of the base runs: {ratio} to {ratio} across the method x reward cells." in text
    norms = json.load(open(os.path.join(config.workdir, "analysis", "norms.json")))
    assert set(norms) == {"reference", *names}
    np.testing.assert_allclose(norms["reference"]["mean"], 1.0, rtol=1e-5)

    # Repeating the command reuses both runs (nothing retrained) and rewrites the report.
    stamps = [os.path.getmtime(os.path.join(config.workdir, n, "summary.json")) for n in names]
    capsys.readouterr()
    assert grid.run(config, config.workdir) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, reused") == 2
    assert "analyses: finished earlier with these runs and settings, reused" in out
    assert stamps == [os.path.getmtime(os.path.join(config.workdir, n, "summary.json")) for n in names]

    # A changed setting is never silently reused: the error names the run and the key.
    config.overrides.optim.lr = 2 * config.overrides.optim.lr
    with pytest.raises(ConfigError, match=r"awm_jpeg_incompressibility_s0 was started with another config "
                                          r"\(optim.lr"):
        grid.run(config, config.workdir)
    # ... nor is a run started from other reference weights.
    config.overrides.optim.lr = config.overrides.optim.lr / 2
    with open(os.path.join(config.workdir, names[0], grid.RUN_REFERENCE), "w") as f:
        f.write("0" * 64 + "\n")
    with pytest.raises(ConfigError, match=r"awm_jpeg_incompressibility_s0 was started from another reference "
                                          r"bundle \(params sha256 000000000000, now " + sha[:12]):
        grid.run(config, config.workdir)
