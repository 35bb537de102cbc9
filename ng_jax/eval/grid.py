"""The reproduction grid (`config.job = "grid"`, configs/experiments/toy_grid.py).

1. Every RL run of {methods} x {base, +NormGuard} x {rewards} x {seeds}, in this process, one
   after the other, each in WORKDIR/<method>[_normguard]_<reward>_s<seed>. A run with a
   summary.json is reused; an interrupted one resumes from its checkpoint (ng_jax.rl.loop).
2. The analyses (ng_jax.eval.analyze) on the reference and the runs of `grid.analysis_reward` and
   `grid.analysis_seed`, and the matched-reward control over all runs, into WORKDIR/analysis.
3. The report (`config.results`, figures next to it in results/), with the command and commit
   at its top, built from those JSON files by `ng_jax.eval.report`.
"""

from __future__ import annotations

import copy
import json
import os
import time

import ml_collections as mlc

from ng_jax.config.checks import ConfigError, check_config
from ng_jax.config.methods import load_config_file
from ng_jax.eval import analyze, report
from ng_jax.models.bundle import bundle_fingerprint
from ng_jax.rewards.registry import EXTRA_REWARDS, REWARD_NAMES
from ng_jax.rl import loop


def _apply(config: mlc.ConfigDict, overrides: mlc.ConfigDict, prefix: str = "") -> None:
    for key, value in overrides.items():
        if isinstance(value, mlc.ConfigDict):
            if key not in config:
                raise KeyError(f"grid override {prefix}{key}: no such block in the RL config")
            _apply(config[key], value, f"{prefix}{key}.")
        else:
            if key not in config:
                raise KeyError(f"grid override {prefix}{key}: no such key in the RL config")
            config[key] = value


def run_name(method: str, normguard: bool, reward: str, seed: int) -> str:
    return f"{method}{'_normguard' if normguard else ''}_{reward}_s{seed}"


def reward_weights(grid_cfg, reward: str) -> dict[str, float]:
    """The `rewards.weights` of a grid column: a reward name (built in or registered, weight 1), or the name
    of a weighted composite in `grid.composites` (name -> {reward: weight})."""
    composites = grid_cfg.get("composites") or {}
    weights = dict(composites[reward]) if reward in composites else {reward: 1.0}
    known = REWARD_NAMES + tuple(EXTRA_REWARDS)
    for name in weights:
        if name not in known:
            raise ValueError(f"grid.rewards: unknown reward {name!r} (in {reward!r}); expected one of {known} or a "
                             f"name in grid.composites")
    return {str(k): float(v) for k, v in weights.items()}


def run_configs(config) -> dict[str, mlc.ConfigDict]:
    """name -> the RL config of every run of the grid (validated, so a typo fails before any training)."""
    g = config.grid
    out = {}
    for method in g.methods:
        for ng in g.normguard:
            for reward in g.rewards:
                weights = reward_weights(g, reward)
                for seed in g.seeds:
                    c = load_config_file(f"{method}{'_normguard' if ng else ''}.py")
                    c.seed = int(seed)
                    c.reference = config.reference
                    c.rewards.weights = mlc.ConfigDict(weights)
                    _apply(c, config.overrides)
                    name = run_name(method, bool(ng), reward, int(seed))
                    c.name = name
                    c.workdir = os.path.join(config.workdir, name)
                    check_config(c)
                    out[name] = c
    return out


RUN_CONFIG = "grid_run_config.json"
RUN_REFERENCE = "grid_run_reference.txt"  # params sha256 of the reference bundle the run started from


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _check_recorded_config(c: mlc.ConfigDict, run_dir: str, reference_sha: str) -> None:
    """A run directory is reused or resumed only by the config and the reference weights that started it:
    a grid whose settings or reference changed since must not silently mix old runs into its report."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} holds a run without {RUN_CONFIG} (not started by this grid); "
                          f"delete it or point grid workdir elsewhere")
    with open(path) as f:
        old = dict(_flatten(json.load(f)))
    new = dict(_flatten(json.loads(c.to_json_best_effort())))
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{run_dir} was started with another config ({shown}{', ...' if len(diff) > 4 else ''}); "
                          f"delete it to retrain that run")
    ref_path = os.path.join(run_dir, RUN_REFERENCE)
    recorded = "(not recorded)"
    if os.path.isfile(ref_path):
        with open(ref_path) as f:
            recorded = f.read().strip()
    if recorded != reference_sha:
        raise ConfigError(f"{run_dir} was started from another reference bundle (params sha256 {recorded[:12]}, "
                          f"now {reference_sha[:12]}); delete it to retrain that run")


def analysis_config(config, checkpoints: list[str], runs: list[str]) -> mlc.ConfigDict:
    a = load_config_file("analyze.py")
    a.reference = config.reference
    first = next(iter(run_configs(config).values()))
    a.eval = copy.deepcopy(first.eval)
    a.eval.cfg_rescale = 0.0
    a.eval.samples_per_prompt = int(config.analysis.samples_per_prompt)
    for key in ("few_steps", "cfg_rescale_phi", "guided_cfg_scale", "adjoint_prompts", "adjoint_samples"):
        a.analysis[key] = config.analysis[key]
    a.analysis.name = "all"
    a.analysis.checkpoints = ",".join(checkpoints)
    a.analysis.runs = ",".join(runs)
    return a


def run(config, workdir: str) -> int:

    t_start = time.time()
    try:
        runs = run_configs(config)
    except (KeyError, ValueError) as err:
        raise ConfigError(str(err).strip("'\"")) from None
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    started_at = report.commit()  # the code this process loaded (later commits to the checkout do not change it)
    reference_sha = bundle_fingerprint(config.reference or None)
    for i, (name, c) in enumerate(runs.items(), 1):
        run_dir = os.path.join(workdir, name)
        _check_recorded_config(c, run_dir, reference_sha)
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            print(f"[{i}/{len(runs)}] {name}: finished earlier, reused")
            continue
        print(f"[{i}/{len(runs)}] {name}: training")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, RUN_CONFIG), "w") as f:
            f.write(c.to_json_best_effort(indent=1, sort_keys=True))
        with open(os.path.join(run_dir, report.RUN_COMMIT), "w") as f:
            f.write(started_at + "\n")  # the code that trains it (the report lists these)
        with open(os.path.join(run_dir, RUN_REFERENCE), "w") as f:
            f.write(reference_sha + "\n")
        t0 = time.time()
        code = loop.run(c, run_dir)
        if code != 0 or not os.path.isfile(os.path.join(run_dir, "summary.json")):
            print(f"{name}: stopped before the end (exit {code}); rerun the command to resume it")
            return code or 1
        timings[name] = time.time() - t0
    g = config.grid
    analysed = [f"{n}={os.path.join(workdir, n)}" for n, c in runs.items()
                if c.rewards.weights.get(g.analysis_reward) and c.seed == int(g.analysis_seed)]
    a_cfg = analysis_config(config, ["reference"] + analysed, [os.path.join(workdir, n) for n in runs])
    a_dir = os.path.join(workdir, "analysis")
    record = os.path.join(a_dir, RUN_CONFIG)
    a_json = a_cfg.to_json_best_effort(indent=1, sort_keys=True)
    done = os.path.isfile(record) and all(
        os.path.isfile(os.path.join(a_dir, f"{k}.json")) for k in ("norms", "renorm", "few_step", "adjoint", "matched"))
    if done:
        with open(record) as f:
            done = f.read() == a_json
    if done and not timings:
        # Nothing was retrained and the analyses' settings are unchanged: only the report is rewritten.
        print("analyses: finished earlier with these runs and settings, reused")
    else:
        if os.path.isfile(record):
            os.remove(record)  # an interrupted analysis must not be mistaken for a finished one
        t0 = time.time()
        analyze.run(a_cfg, a_dir)
        timings["analysis"] = time.time() - t0
        with open(record, "w") as f:
            f.write(a_json)
    path = report.write_results(config, workdir, runs, timings, total_s=time.time() - t_start)
    print(f"report: {path}")
    return 0
