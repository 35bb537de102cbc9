"""The reproduction grid (`config.job = "grid"`, ng_jax/configs/experiments/toy_grid.py and calibration.py).

1. Every RL run of {methods} x {arms} x {rewards} x {seeds}, in this process, one after the other, each
   in WORKDIR/<method>_<arm>_<reward>_s<seed>. An arm is the base method or NormGuard (the method's
   config file without or with `_normguard`) plus optional settings (`set`: "normguard.lam=0.3,
   normguard.margin=0.02"; `set_by_method`: method -> such a string), optionally limited to some
   `methods` and `rewards`. A run with a summary.json is reused; an interrupted one resumes from its
   checkpoint (ng_jax.rl.loop). The reference's evaluation is computed once (`eval.initial_cache`).
2. Every run records the commit of the code that trained it; runs trained by other code than this
   checkout are refused (`grid.allow_mixed_code=True` overrides, and the report then says so), as are
   runs started with another config or reference.
3. The noise floors of the quality measures at the final evaluation's size (real renders against real
   renders of the same prompts), measured once.
4. Optionally (`grid.analysis_reward`), the analyses (ng_jax.eval.analyze) on the checkpoints of the seed
   whose base run inflates the norm most under guidance; each is recorded as it finishes
   (WORKDIR/analysis/grid_analyses.json, with its time), so that an interrupted grid reruns only the others.
5. The report (`config.results`, its JSON and figures in results/ next to it; ng_jax.eval.report).
6. Optionally (`grid.export=DIR`), a copy of the workdir without checkpoints or policies (`export`): the same
   command pointed at it, on another machine, trains only the unfinished runs and writes the same report.

`grid.worker="I/N"` trains only every N-th run from the I-th (I = 0..N-1) and stops after them: N such
commands started at once share the runs (on 2 cores, two workers train 1.2-1.3x as many runs per hour as
one: benchmarks/workers.py; on several hosts sharing a bucket, one worker each). The command without
`grid.worker` then reuses them all and does 3-5.

`grid.report_only=True` skips 1 and 4: the report of the runs finished so far (the others listed as not
finished), e.g. while the grid still trains in the background.

WORKDIR and `config.results` may be in a bucket (gs://...): every file is read and written through ng_jax.storage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import ml_collections as mlc
import numpy as np

from ng_jax import storage
from ng_jax.config.checks import ConfigError, check_config
from ng_jax.config.methods import METHODS, load_config_file
from ng_jax.data.render import render_fn
from ng_jax.eval import analyze, report
from ng_jax.eval.evaluate import repeat_prompts
from ng_jax.judges.features import JudgeFeatures
from ng_jax.judges.kid import noise_floors
from ng_jax.judges.toy import reference_renders
from ng_jax.models.bundle import bundle_fingerprint
from ng_jax.rewards.registry import EXTRA_REWARDS, REWARD_NAMES
from ng_jax.rl import loop
from ng_jax.rl.prompts import load_eval_prompts
from ng_jax.sampling import from_uint8, to_uint8

RUN_CONFIG = "grid_run_config.json"
RUN_REFERENCE = "grid_run_reference.txt"  # params sha256 of the reference bundle the run started from
FLOORS = "floors.json"
RESCALING = report.RESCALING_DIR  # WORKDIR/rescaling/<base run>.json: its final policy sampled with rescaling
# Where a run and the reference's cached evaluation live: inside the grid's workdir, which may move (a copy on
# another machine, a bucket), so a run's recorded config is compared without them.
LOCATION_KEYS = ("workdir", "eval.initial_cache")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    config: mlc.ConfigDict
    method: str
    arm: str
    reward: str
    seed: int


def _apply(config: mlc.ConfigDict, overrides: mlc.ConfigDict, prefix: str = "") -> None:
    for key, value in overrides.items():
        if isinstance(value, mlc.ConfigDict):
            if key not in config:
                raise KeyError(f"grid override {prefix}{key}: no such block in the RL config")
            if isinstance(config[key], mlc.ConfigDict) and not config[key].keys():  # a free-form mapping
                config[key] = copy.deepcopy(value)                                  # (eval.variants): replaced
            else:
                _apply(config[key], value, f"{prefix}{key}.")
        else:
            if key not in config:
                raise KeyError(f"grid override {prefix}{key}: no such key in the RL config")
            config[key] = value


def _set(config: mlc.ConfigDict, text: str, arm: str) -> None:
    """Apply an arm's `set` string ("a.b=1,c=x") to `config`, each value parsed as the type of the value
    it replaces."""
    for item in filter(None, (t.strip() for t in str(text or "").split(","))):
        key, sep, raw = item.partition("=")
        node, *path = key.strip().split(".")[::-1]
        parent = config
        for part in reversed(path):
            if part not in parent:
                raise KeyError(f"grid arm {arm!r}: set {key.strip()}: no such block in the RL config")
            parent = parent[part]
        if not sep or node not in parent:
            raise KeyError(f"grid arm {arm!r}: set {item!r}: expected KEY=VALUE with an existing key")
        old = parent[node]
        parent[node] = (raw.strip().lower() in ("1", "true", "yes")) if isinstance(old, bool) else type(old)(raw.strip())


def run_name(method: str, arm: str, reward: str, seed: int) -> str:
    return f"{method}_{arm}_{reward}_s{seed}"


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


def run_specs(config) -> dict[str, RunSpec]:
    """name -> RunSpec of every run of the grid (configs validated, so a typo fails before any training),
    seed by seed: the first seed of every cell trains before any cell's second, so that an interrupted grid
    already holds complete pairs across methods and rewards."""
    g = config.grid
    for key, known in (("methods", tuple(METHODS)), ("rewards", None)):
        items = (g[key],) if isinstance(g[key], (str, int)) else tuple(g[key])
        if any(isinstance(x, str) and "," in x for x in items):  # --config.grid.methods=nft,awm: one string
            raise ValueError(f"grid.{key}={g[key]!r}: one item holding a comma; on the command line write a Python "
                             f"tuple, quoted: --config.grid.{key}=\"('a', 'b')\" (with your items)")
        for item in (items if known else ()):
            if item not in known:
                raise ValueError(f"grid.{key}: unknown {key[:-1]} {item!r}; expected some of {known}")
    order = []
    for method in g.methods:
        for arm, spec in g.arms.items():
            if spec.get("methods") and method not in spec.methods:  # an arm may be limited to some cells
                continue
            for reward in g.rewards:
                if spec.get("rewards") and reward not in spec.rewards:
                    continue
                for i, seed in enumerate(report.seeds_of(g, reward)):
                    order.append((i, method, arm, spec, reward, seed))
    out = {}
    for _, method, arm, spec, reward, seed in sorted(order, key=lambda t: t[0]):  # stable: cells keep their order
        weights = reward_weights(g, reward)
        c = load_config_file(f"{method}{'_normguard' if spec.normguard else ''}.py")
        c.seed = seed
        c.reference = config.reference
        c.space = config.get("space", "pixel")
        c.render = config.get("render", "clip")
        c.rewards.weights = mlc.ConfigDict(weights)
        _apply(c, config.overrides)
        _set(c, spec.get("set", ""), arm)
        _set(c, (spec.get("set_by_method") or {}).get(method, ""), arm)
        name = run_name(method, arm, reward, seed)
        c.name = name
        c.workdir = os.path.join(config.workdir, name)
        c.eval.initial_cache = os.path.join(config.workdir, "initial_evals")
        check_config(c)
        out[name] = RunSpec(c, str(method), str(arm), str(reward), seed)
    return out


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _check_recorded_config(c: mlc.ConfigDict, run_dir: str, reference_sha: str) -> None:
    """A run directory is reused or resumed only by the config and the reference weights that started it:
    a grid whose settings or reference changed since must not silently mix old runs into its report."""
    if not storage.listdir(run_dir):
        return
    recorded_config = storage.read_json(os.path.join(run_dir, RUN_CONFIG))
    if recorded_config is None:
        raise ConfigError(f"{run_dir} holds a run without {RUN_CONFIG} (not started by this grid); "
                          f"delete it or point grid workdir elsewhere")
    old = dict(_flatten(recorded_config))
    new = dict(_flatten(json.loads(c.to_json_best_effort())))
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in LOCATION_KEYS)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{run_dir} was started with another config ({shown}{', ...' if len(diff) > 4 else ''}); "
                          f"delete it to retrain that run")
    recorded = storage.read_text(os.path.join(run_dir, RUN_REFERENCE))
    recorded = "(not recorded)" if recorded is None else recorded.strip()
    if recorded != reference_sha:
        raise ConfigError(f"{run_dir} was started from another reference bundle (params sha256 {recorded[:12]}, "
                          f"now {reference_sha[:12]}); delete it to retrain that run")


def check_code(workdir: str, names, current: str, allow: bool) -> dict | None:
    """None when every started run was trained by `current` code; else commit -> runs, or (without
    `allow`) a ConfigError naming the runs trained by other code."""
    commits = report.run_commits(workdir, names)
    others = {c: ns for c, ns in commits.items() if c != current}
    if not others:
        return None
    if not allow:
        shown = "; ".join(f"{c}: {', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''} ({len(ns)} runs)"
                          for c, ns in sorted(others.items()))
        raise ConfigError(f"{workdir}: runs trained by other code than this checkout ({current}): {shown}; delete "
                          "them to retrain, or pass --config.grid.allow_mixed_code=True (the report then says so)")
    return commits


def final_prompts(first: mlc.ConfigDict) -> list[str]:
    """The prompts of a run's final evaluation, one per image (as the evaluator repeats them)."""
    k = int(first.eval.final_samples_per_prompt or first.eval.samples_per_prompt)
    return repeat_prompts(load_eval_prompts(first), k, int(first.eval.get("min_samples_per_category", 0) or 0))


def measure_floors(first: mlc.ConfigDict, draws: int, seed: int = 0) -> dict:
    """KID and FD between two sets of real renders of the final evaluation's prompts (the same prompts,
    other scene seeds; rendered as the runs render), `draws` times, at the final evaluation's size."""
    prompts = final_prompts(first)
    render = render_fn(first.get("render", "clip"))
    features = JudgeFeatures()

    def sampler(rng, n):
        seeds = rng.integers(0, 2 ** 31, size=(2, len(prompts)))
        sets = [features.features(np.asarray(to_uint8(render(from_uint8(reference_renders(prompts, s))))))
                for s in seeds]
        return sets[0], sets[1]

    fl = noise_floors(sampler, len(prompts), draws=draws, seed=seed, paired=True)
    return {"n": len(prompts), "draws": draws, "kid_mean": fl["kid"].mean, "kid_std": fl["kid"].std,
            "fd_mean": fl["fd"].mean, "fd_std": fl["fd"].std}


def analysis_config(config, checkpoints: list[str], runs: list[str]) -> mlc.ConfigDict:
    a = load_config_file("analyze.py")
    a.reference = config.reference
    if config.grid.get("analysis_reward"):   # the evaluations report the reward the analysed runs were trained on
        a.rewards.weights = mlc.ConfigDict(reward_weights(config.grid, str(config.grid.analysis_reward)))
    a.space = config.get("space", "pixel")
    a.render = config.get("render", "clip")
    first = next(iter(run_specs(config).values())).config
    a.eval = copy.deepcopy(first.eval)
    a.eval.cfg_rescale = 0.0
    a.eval.variants = mlc.ConfigDict()
    a.eval.samples_per_prompt = int(config.analysis.samples_per_prompt)
    for key in ("few_steps", "cfg_rescale_phi", "guided_cfg_scale", "adjoint_prompts", "adjoint_samples"):
        a.analysis[key] = config.analysis[key]
    a.analysis.name = "all"
    a.analysis.checkpoints = ",".join(checkpoints)
    a.analysis.runs = ",".join(runs)
    return a


def _analyses(config, workdir: str, runs: dict[str, RunSpec], summaries: dict, retrained: bool) -> None:
    g = config.grid
    seed = report.most_inflating_seed(report.cells(runs, summaries), str(g.analysis_reward), str(g.base_arm))
    if seed is None:
        return
    chosen = [f"{n}={os.path.join(workdir, n)}" for n, s in runs.items()   # finished runs only (a snapshot)
              if s.reward == g.analysis_reward and s.seed == seed and s.arm in (g.base_arm, g.normguard_arm)
              and summaries.get(n)]
    a_cfg = analysis_config(config, ["reference"] + chosen, [os.path.join(workdir, n) for n in runs])
    a_dir = os.path.join(workdir, "analysis")
    record_path = os.path.join(a_dir, report.ANALYSIS_RECORD)
    settings = portable_settings(json.loads(a_cfg.to_json_best_effort(sort_keys=True)))
    record = storage.read_json(record_path) or _earlier_record(a_dir, settings, analyze.selected(a_cfg))
    # runs trained since, or other settings: all again
    if retrained or portable_settings(record.get("settings")) != settings:
        for path in (record_path, os.path.join(a_dir, RUN_CONFIG)):  # (RUN_CONFIG: earlier code's record)
            if storage.is_file(path):
                storage.path(path).unlink()
        record = {"settings": settings, "seconds": {}}
    finished = {n for n in record["seconds"] if storage.is_file(a_dir, f"{n}.json")}
    if finished >= set(analyze.selected(a_cfg)):
        print("analyses: finished earlier with these runs and settings, reused")
        return
    if finished:
        print(f"analyses: {', '.join(sorted(finished))} finished earlier with these runs and settings, reused")

    def done(name: str, seconds: float) -> None:   # recorded one by one: an interrupted grid resumes the rest
        record["seconds"][name] = seconds
        storage.write_text(record_path, json.dumps(record, indent=1))

    analyze.run(a_cfg, a_dir, skip=finished, on_finished=done)


def portable_settings(settings: dict | None) -> dict | None:
    """The analyses' settings as recorded and compared: the run directories they name written relative to the
    grid's workdir ("{workdir}/<run>") and the RL loop's cache location left out, so that a copy of the workdir
    elsewhere (another machine, a bucket) reuses its analyses. Settings recorded with absolute paths (earlier
    code) are read the same way: their workdir is the directory holding the runs they name."""
    if not settings or "analysis" not in settings:
        return settings
    out = copy.deepcopy(settings)
    out.get("eval", {}).pop("initial_cache", None)
    a = out["analysis"]
    runs = [r for r in str(a.get("runs") or "").split(",") if r]
    if runs and not runs[0].startswith("{workdir}/"):
        root = os.path.dirname(runs[0].rstrip("/")) + "/"
        for key in ("runs", "checkpoints"):
            a[key] = ",".join(_under(entry, root) for entry in str(a.get(key) or "").split(","))
    return out


def _under(entry: str, root: str) -> str:
    """A checkpoint entry (PATH or LABEL=PATH) with PATH under `root` written as {workdir}/..."""
    label, sep, path = entry.rpartition("=")
    return f"{label}{sep}{{workdir}}/{path[len(root):]}" if path.startswith(root) else entry


def _earlier_record(a_dir: str, settings: dict, names) -> dict:
    """The record of analyses run by earlier code: their settings in RUN_CONFIG, written once all had
    finished (their time unknown)."""
    text = storage.read_text(os.path.join(a_dir, RUN_CONFIG))
    if text is None or portable_settings(json.loads(text)) != settings:
        return {}
    return {"settings": settings, "seconds": dict.fromkeys(n for n in names if storage.is_file(a_dir, f"{n}.json"))}


def rescaling_variants(config) -> dict:
    """name -> eval overrides of the inference-time baselines applied to the base runs' final policies:
    renormalisation to the reference norm, CFG-free and guided, and CFG-rescale (guided only: it acts on the
    guided velocity alone). Guided at `analysis.guided_cfg_scale`, which must be the runs' "guided" variant's."""
    w, phi = float(config.analysis.guided_cfg_scale), float(config.analysis.cfg_rescale_phi)
    guided = (config.overrides.get("eval") or {}).get("variants", {}).get("guided")
    if guided is not None and float(guided["cfg_scale"]) != w:
        raise ConfigError(f"analysis.guided_cfg_scale={w:g} differs from the runs' guided evaluation "
                          f"(cfg_scale {guided['cfg_scale']:g}): the rescaled samples are paired with it")
    return {"renorm": {"renorm": True}, "guided_renorm": {"cfg_scale": w, "renorm": True},
            "guided_rescale": {"cfg_scale": w, "cfg_rescale": phi, "norms": "never"}}


def _rescaling(config, workdir: str, runs: dict[str, RunSpec], variants: dict | None = None) -> None:
    """The inference-time baselines on every finished base run of `grid.rescaling_methods` with the analysis
    reward, on its final evaluation's prompts, noise and size, so that each pairs seed by seed with the run's
    own final evaluation (plain and guided) and with its NormGuard run's. One file per run, reused when its
    variants are unchanged; the file records the commit that sampled it."""
    g = config.grid
    methods, reward = tuple(g.get("rescaling_methods") or ()), str(g.get("analysis_reward") or "")
    if not methods or not reward:
        return
    variants = json.loads(json.dumps(variants or rescaling_variants(config)))
    todo = {}
    for name, spec in runs.items():
        path = os.path.join(workdir, RESCALING, f"{name}.json")
        if spec.arm != g.base_arm or spec.reward != reward or spec.method not in methods \
                or not storage.is_file(workdir, name, "summary.json"):
            continue
        if (storage.read_json(path) or {}).get("variants_config") != variants:
            todo[name] = path
    if not todo:
        return
    a = analysis_config(config, [f"{n}={os.path.join(workdir, n)}" for n in todo], [])
    first = next(iter(runs.values())).config
    a.eval.samples_per_prompt = int(first.eval.final_samples_per_prompt or first.eval.samples_per_prompt)
    ctx = analyze.Context(a, os.path.join(workdir, RESCALING))
    for i, (name, path) in enumerate(todo.items(), 1):
        t0 = time.time()
        results = {v: analyze.quality(ctx.evaluate(name, f"rescaling_{v}", **ov)) for v, ov in variants.items()}
        storage.write_text(path, json.dumps({"commit": report.commit(), "variants_config": variants,
                                             "results": results, "seconds": time.time() - t0}, indent=1))
        print(f"rescaling [{i}/{len(todo)}] {name}: {time.time() - t0:.0f} s")


def parse_worker(text: str) -> tuple[int, int]:
    """`grid.worker` "I/N" -> (I, N); "" -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ConfigError(f"grid.worker={text!r}: expected 'I/N' with 0 <= I < N, e.g. '0/2' and '1/2' for two workers")
    return i, n


def run(config, workdir: str) -> int:
    t_start = time.time()
    config = copy.deepcopy(config)
    config.workdir = workdir   # the runs' directories and the reference's cached evaluation go under the one given
    try:
        runs = run_specs(config)
    except (KeyError, ValueError) as err:
        raise ConfigError(str(err).strip("'\"")) from None
    worker, workers = parse_worker(str(config.grid.get("worker", "") or ""))
    storage.makedirs(workdir)
    timings = {}
    started_at = report.commit()  # the code this process loaded (later commits to the checkout do not change it)
    report_only = bool(config.grid.get("report_only", False))
    if report_only:  # the finished runs as they are, whatever code trained them (the report lists the commits)
        commits = report.run_commits(workdir, runs)
        mixed = commits if len(commits) > 1 else None
    else:
        mixed = check_code(workdir, runs, started_at, bool(config.grid.allow_mixed_code))
    reference_sha = bundle_fingerprint(config.reference or None)
    left = 0 if report_only else sum(not storage.is_file(os.path.join(workdir, n), "summary.json")
                                     for j, n in enumerate(runs) if j % workers == worker)
    for i, (name, spec) in enumerate(runs.items() if not report_only else (), 1):
        if (i - 1) % workers != worker:
            continue
        run_dir = os.path.join(workdir, name)
        _check_recorded_config(spec.config, run_dir, reference_sha)
        if storage.is_file(run_dir, "summary.json"):
            print(f"[{i}/{len(runs)}] {name}: finished earlier, reused")
            continue
        print(f"[{i}/{len(runs)}] {name}: training")
        storage.makedirs(run_dir)
        storage.write_text(os.path.join(run_dir, RUN_CONFIG), spec.config.to_json_best_effort(indent=1, sort_keys=True))
        commit_path = os.path.join(run_dir, report.RUN_COMMIT)
        if not storage.is_file(commit_path):  # kept when an interrupted run resumes
            storage.write_text(commit_path, started_at + "\n")
        storage.write_text(os.path.join(run_dir, RUN_REFERENCE), reference_sha + "\n")
        t0 = time.time()
        code = loop.run(spec.config, run_dir)
        if code != 0 or not storage.is_file(run_dir, "summary.json"):
            print(f"{name}: stopped before the end (exit {code}); rerun the command to resume it")
            return code or 1
        timings[name] = time.time() - t0
        left -= 1
        mean = sum(timings.values()) / len(timings)
        print(f"{name}: trained in {timings[name] / 60:.1f} min; {left} run(s) left for this process, about "
              f"{left * mean / 3600:.1f} h at its mean so far")
    if workers > 1 and not report_only:
        print(f"worker {worker}/{workers}: its runs are finished; once every worker's are, the command without "
              "grid.worker reuses them and writes the report")
        return 0
    floors_path = os.path.join(workdir, FLOORS)
    floors = storage.read_json(floors_path)
    first = next(iter(runs.values())).config
    want_n = len(final_prompts(first))
    if int(config.grid.floor_draws) > 0 and (floors is None or floors.get("n") != want_n
                                             or floors.get("draws") != int(config.grid.floor_draws)):
        floors = measure_floors(first, int(config.grid.floor_draws))
        storage.write_text(floors_path, json.dumps(floors, indent=1))
    # The analyses and the rescaling sample finished policies and train nothing: they run under report_only too
    # (grid.analysis_reward="" skips both, e.g. for a quick snapshot).
    trained_now = bool(timings)
    _rescaling(config, workdir, runs)
    summaries = report.read_summaries(workdir, runs)
    if config.grid.get("analysis_reward"):
        _analyses(config, workdir, runs, summaries, trained_now)
    path = report.write_results(config, workdir, runs, total_s=time.time() - t_start, floors=floors,
                                mixed_code=mixed, summaries=summaries)
    print(f"report: {path}")
    if config.grid.get("export"):
        export(config, workdir, runs, summaries, str(config.grid.export))
    return 0


def export(config, workdir: str, runs: dict[str, RunSpec], summaries: dict, dest: str) -> None:
    """A copy of the grid's workdir without checkpoints or policies (local or gs://): every finished run's
    records (summary, metrics, config, commit, reference) and, for the seed whose final samples the report
    shows, those samples; the reference's cached evaluations, the noise floors, the analyses' results and
    the rescaled samples' scores. The same command at the same commit, pointed at the copy, reuses all of it
    and writes the same report; unfinished runs are left out (they train from the start there)."""
    base_arm = str(config.grid.base_arm)
    grouped = report.cells(runs, summaries)
    shown = {r: report.most_inflating_seed(grouped, r, base_arm) for r in {s.reward for s in runs.values()}}
    files = [FLOORS]
    for name, spec in runs.items():
        if not summaries.get(name):
            continue
        files += [os.path.join(name, f) for f in ("summary.json", "metrics.jsonl", RUN_CONFIG, report.RUN_COMMIT,
                                                  RUN_REFERENCE)]
        if spec.seed == shown[spec.reward]:
            final = f"epoch_{int(spec.config.rl.epochs):04d}"
            files += [os.path.join(name, "samples", f"{final}{s}.png") for s in ("", "_guided")]
    for sub, ends in (("initial_evals", (".json",)), ("analysis", (".json", ".png")), (RESCALING, (".json",))):
        files += [os.path.join(sub, f) for f in storage.listdir(os.path.join(workdir, sub)) if f.endswith(ends)]
    size = 0
    for f in files:
        src = os.path.join(workdir, f)
        if storage.is_file(src):
            data = storage.path(src).read_bytes()
            storage.write_bytes(os.path.join(dest, f), data)
            size += len(data)
    print(f"copy without checkpoints: {dest} ({sum(bool(s) for s in summaries.values())} finished runs, "
          f"{size / 2**20:.1f} MiB)")
