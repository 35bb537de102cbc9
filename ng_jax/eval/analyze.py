"""The paper's analyses on any set of checkpoints, each writing JSON and PNG plots to an output dir.

    python -m ng_jax.eval.analyze ANALYSIS --checkpoints=reference,workdirs/awm,workdirs/awm_normguard \
        --out=workdirs/analysis [--runs=workdirs/awm,workdirs/awm_normguard] [--config.a.b=value ...]

ANALYSIS is one of
- `norms`: ||v_theta|| / ||v_ref|| against sigma along eval sampling trajectories (mean, spread);
- `renorm`: reward and quality plain, with inference-time renormalisation to the reference norm
  at every step, and with CFG-rescale (`analysis.cfg_rescale_phi`);
- `few_step`: reward and quality at `analysis.few_steps` Euler steps;
- `adjoint`: dR/d alpha_k of the differentiable verifier through the sampler (ng_jax.eval.analysis.adjoint);
- `matched`: the matched-reward control over RL run summaries (`--runs`);
- `judge`: an MLLM judge (OpenAI-compatible endpoint, `analysis.judge_url`) on eval samples;
- `all`: norms, renorm, few_step, adjoint, plus matched / judge when runs / a judge URL are given.

Checkpoints: see ng_jax.eval.analysis.checkpoints (`reference`, bundle dirs, finished RL workdirs).
It is also a job of the entry point: `python -m ng_jax.main --config=ng_jax/configs/analyze.py
--config.analysis.name=norms --config.analysis.checkpoints=...`. Every knob is in ng_jax/configs/analyze.py.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Callable, Collection

import jax
import numpy as np

from ng_jax import logs, sharding, storage
from ng_jax import main as entry
from ng_jax.config.checks import ConfigError
from ng_jax.config.methods import CONFIG_DIR
from ng_jax.data.render import world_stack
from ng_jax.eval.analysis import plots
from ng_jax.eval.analysis.adjoint import reward_jacobian, summarize, verifier_reward_fn
from ng_jax.eval.analysis.checkpoints import load_matching, resolve
from ng_jax.eval.analysis.matched import load_runs, matched_reward
from ng_jax.eval.evaluate import Evaluator
from ng_jax.judges.mllm import MLLMJudge
from ng_jax.models.bundle import load_bundle
from ng_jax.models.nets.text import EMPTY_PROMPT, make_text_encoder, tokenize
from ng_jax.models.stack import toy_stack
from ng_jax.rewards.registry import build_rewards
from ng_jax.rewards.verifier import load_verifier_params
from ng_jax.rl.prompts import eval_prompts
from ng_jax.sampling import make_sampler

ANALYSES = ("norms", "renorm", "few_step", "adjoint", "matched", "judge")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "analyze.py")


class Context:
    """The reference, the checkpoints and cached evaluators shared by the analyses of one run."""
    def __init__(self, config, out: str):

        self.config, self.out = config, out
        self.a = config.analysis
        self.reference = load_bundle(config.reference or None)
        # host-side reference, as the evaluator always had it; samples rendered as the run's config says
        self.stack = world_stack(toy_stack(self.reference), config)
        self.model = self.stack.model
        self.text = make_text_encoder(self.reference.text_cfg)
        self.mesh = sharding.make_mesh(config.mesh.shape)
        self.ref = self.stack.ref
        self.weighted = build_rewards(config.rewards)
        self.prompts = eval_prompts(config.eval)
        names = resolve(self.a.checkpoints, config.reference)
        self.checkpoints = {label: load_matching(path, self.reference).params["velocity"] for label, path in names}
        self._evaluators: dict = {}

    def evaluator(self, **overrides):

        key = tuple(sorted(overrides.items()))
        if key not in self._evaluators:
            cfg = copy.deepcopy(self.config.eval)
            for k, v in overrides.items():
                cfg[k] = v
            self._evaluators[key] = Evaluator(cfg, self.stack, self.mesh, weighted=self.weighted,
                                              policy_params=lambda p, r: p, workdir=self.out, prompts=self.prompts,
                                              rules=sharding.layouts(self.config.mesh)[0].logical_rules)
        return self._evaluators[key]

    def evaluate(self, label: str, tag: str, **overrides) -> dict:
        return self.evaluator(**overrides)(self.checkpoints[label], tag=f"{tag}_{label}", step=0)


def quality(r: dict) -> dict:
    """The reward and quality numbers of an evaluation result."""
    return {k: r.get(k) for k in ("reward", "accuracy", "fd", "precision", "recall", "norm_ratio", "kid", "kid_ci_low",
                                  "kid_ci_high", "saturation_diff")}


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def analyze_norms(ctx: Context) -> dict:

    out = {}
    for label in ctx.checkpoints:
        r = ctx.evaluate(label, "norms")
        by, spread = np.asarray(r["norm_ratio_by_sigma"]), np.asarray(r["norm_ratio_spread_by_sigma"])
        out[label] = {"sigma": by[:, 0].tolist(), "mean": by[:, 1].tolist(), "spread": spread[:, 1].tolist(),
                      **quality(r)}
    plots.norm_curves(os.path.join(ctx.out, "norms.png"), out)
    print("| checkpoint | mean ratio | max ratio (sigma) | reward |\n|---|---|---|---|")
    for label, c in out.items():
        i = int(np.argmax(c["mean"]))
        print(f"| {label} | {c['norm_ratio']:.4f} | {c['mean'][i]:.4f} ({c['sigma'][i]:.2f}) | {c['reward']:.4f} |")
    return out


def analyze_renorm(ctx: Context) -> dict:

    # CFG-free (what the RL objective trains) and guided (where CFG-rescale acts at all; it is a no-op
    # without guidance, so it is evaluated only there)
    phi, w = float(ctx.a.cfg_rescale_phi), float(ctx.a.guided_cfg_scale)
    guided = f"_cfg{w:g}"
    variants = {"plain": {}, "renorm": {"renorm": True}, f"plain{guided}": {"cfg_scale": w},
                f"renorm{guided}": {"cfg_scale": w, "renorm": True},
                f"cfg_rescale_{phi:g}{guided}": {"cfg_scale": w, "cfg_rescale": phi}}
    out = {label: {name: quality(ctx.evaluate(label, f"renorm_{name}", **ov)) for name, ov in variants.items()}
           for label in ctx.checkpoints}
    plots.grouped_bars(os.path.join(ctx.out, "renorm.png"), out, ("reward", "kid", "fd"),
                       "inference-time renormalisation and CFG-rescale")
    print("| checkpoint | variant | reward | accuracy | FD | precision | recall |\n|---|---|---|---|---|---|---|")
    for label, rows in out.items():
        for name, q in rows.items():
            print(f"| {label} | {name} | {_fmt(q['reward'], 4)} | {_fmt(q['accuracy'])} | {_fmt(q['fd'], 1)} | "
                  f"{_fmt(q['precision'])} | {_fmt(q['recall'])} |")
    return out


def analyze_few_step(ctx: Context) -> dict:

    steps = [int(s) for s in ctx.a.few_steps]
    out = {}
    for label in ctx.checkpoints:
        rows = [quality(ctx.evaluate(label, f"steps{n}", num_steps=n)) for n in steps]
        out[label] = {"num_steps": steps, **{k: [r[k] for r in rows] for k in rows[0]}}
    plots.lines(os.path.join(ctx.out, "few_step.png"), out, "num_steps", ("reward", "kid", "fd"),
                "few-step sampling", "Euler steps", logx=True)
    print("| checkpoint | " + " | ".join(f"{n} steps: reward / FD" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for label, s in out.items():
        cells = [f"{_fmt(r, 4)} / {_fmt(f, 1)}" for r, f in zip(s["reward"], s["fd"])]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return out


def analyze_adjoint(ctx: Context) -> dict:

    e, a = ctx.config.eval, ctx.a
    n_steps = int(a.adjoint_steps or e.num_steps)
    base = ctx.prompts[: int(a.adjoint_prompts)]
    prompts = [p for p in base for _ in range(int(a.adjoint_samples))]
    sampler = make_sampler(ctx.model.apply, num_steps=n_steps, shift=float(e.shift), cfg_scale=float(e.cfg_scale))
    ids, mask = tokenize(ctx.text.tokenizer, prompts)
    uids, umask = tokenize(ctx.text.tokenizer, [EMPTY_PROMPT] * len(prompts))
    tp = ctx.reference.params["text"]
    cond, uncond = ctx.text.encode(tp, ids, mask), ctx.text.encode(tp, uids, umask)
    noise = jax.random.normal(jax.random.key(int(e.seed) + 1), (len(prompts),) + ctx.model.sample_shape)
    reward_fn = verifier_reward_fn(load_verifier_params(), prompts)
    jac_fn = jax.jit(lambda p: reward_jacobian(sampler, reward_fn, p, noise, cond, uncond, n_steps))
    sigmas = np.asarray(jax.device_get(sampler(ctx.ref, noise[:1], jax.tree.map(lambda c: c[:1], cond),
                                               jax.tree.map(lambda c: c[:1], uncond)).sigmas))[:-1]
    out = {}
    bar = logs.progress(len(ctx.checkpoints), desc="adjoint")
    for label, params in ctx.checkpoints.items():
        out[label] = summarize(np.asarray(jac_fn(params)), sigmas)
        bar.update(1)
    bar.close()
    plots.adjoint(os.path.join(ctx.out, "adjoint.png"), out)
    print("| checkpoint | mean coherence | min sign agreement | largest |mean| (sigma) |\n|---|---|---|---|")
    for label, r in out.items():
        i = int(np.argmax(np.abs(r["mean"])))
        print(f"| {label} | {r['mean_coherence']:.3f} | {min(r['sign_agreement']):.2f} | "
              f"{r['mean'][i]:.2e} ({r['sigma'][i]:.2f}) |")
    return out


def analyze_matched(ctx: Context) -> dict:

    runs = [r for r in str(ctx.a.runs).split(",") if r.strip()]
    if not runs:
        raise ValueError("the matched analysis needs RL workdirs: --runs=DIR,DIR (analysis.runs)")
    rows = matched_reward(load_runs(runs))
    print("| NormGuard run | reward | FD | precision | matched baseline (epoch) | its reward | its FD | its precision |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['normguard_run']} | {r['reward']:.4f} | {_fmt(r['fd'], 1)} | {_fmt(r['precision'])} | "
              f"{r['baseline_run']} ({r['baseline_epoch']}) | {r['baseline_reward']:.4f} | "
              f"{_fmt(r['baseline_fd'], 1)} | {_fmt(r['baseline_precision'])} |")
    return {"rows": rows}


def analyze_judge(ctx: Context) -> dict:

    a = ctx.a
    if not a.judge_url:
        raise ValueError("the judge analysis needs analysis.judge_url (an OpenAI-compatible endpoint)")
    judges = [MLLMJudge(a.judge_url, a.judge_model, rubric=r, timeout_s=float(a.judge_timeout_s))
              for r in a.judge_rubrics]
    out = {}
    for label in ctx.checkpoints:
        ev = ctx.evaluator()
        ev(ctx.checkpoints[label], tag=f"judge_{label}", step=0)
        n = min(int(a.judge_images), len(ev.last_images))
        out[label] = {}
        for j in judges:
            res = j.score(ev.last_images[:n], ev.prompts[:n])
            res.pop("scores")
            out[label][j.rubric_name] = res
    print("| checkpoint | rubric | mean score | scored | refused | unparsed |\n|---|---|---|---|---|---|")
    for label, rows in out.items():
        for rubric, r in rows.items():
            print(f"| {label} | {rubric} | {_fmt(r['mean'])} | {r['scored']} | {r['refused']} | {r['unparsed']} |")
    return out


FUNCTIONS = {"norms": analyze_norms, "renorm": analyze_renorm, "few_step": analyze_few_step,
             "adjoint": analyze_adjoint, "matched": analyze_matched, "judge": analyze_judge}


def selected(config) -> list[str]:
    name = config.analysis.name
    if name == "all":
        names = ["norms", "renorm", "few_step", "adjoint"]
        if config.analysis.runs:
            names.append("matched")
        if config.analysis.judge_url:
            names.append("judge")
        return names
    if name not in FUNCTIONS:
        raise ValueError(f"unknown analysis {name!r}; expected one of {list(ANALYSES) + ['all']}")
    return [name]


def run(config, workdir: str, skip: Collection[str] = (),
        on_finished: Callable[[str, float], None] | None = None) -> int:
    """The selected analyses but those in `skip`, each written to WORKDIR/<name>.json as it finishes;
    `on_finished(name, seconds)` is called after each (the models' loading counted in the first)."""
    try:
        names = [n for n in selected(config) if n not in skip]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    storage.makedirs(workdir)
    t0 = time.time()
    needs_models = [n for n in names if n != "matched"]
    ctx = Context(config, workdir) if needs_models else type("C", (), {"a": config.analysis, "out": workdir})()
    for name in names:
        print(f"## {name}")
        try:
            result = FUNCTIONS[name](ctx)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        logs.write_json(os.path.join(workdir, f"{name}.json"), result)
        if on_finished is not None:
            on_finished(name, time.time() - t0)
        t0 = time.time()
    print(f"results: {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ng_jax.eval.analyze ANALYSIS --checkpoints=... --out=DIR [--runs=...] [--config=...] [--config.x=y]`"""
    argv = list(sys.argv if argv is None else argv)
    usage = ("usage: python -m ng_jax.eval.analyze {" + ",".join(ANALYSES + ("all",)) +
             "} --checkpoints=A,B --out=DIR [--runs=DIR,DIR] [--config=FILE] [--config.KEY=VALUE ...]")
    if len(argv) < 2 or argv[1] not in ANALYSES + ("all",):
        what = "missing analysis" if len(argv) < 2 or argv[1].startswith("-") else f"unknown analysis {argv[1]!r}"
        print(f"ng_jax.eval.analyze: error: {what}\n{usage}", file=sys.stderr)
        return 2
    args = [argv[0], f"--config.analysis.name={argv[1]}"]
    rest = argv[2:]
    if not any(a.startswith("--config=") for a in rest):
        args.insert(1, f"--config={DEFAULT_CONFIG}")
    for a in rest:
        if a.startswith("--checkpoints="):
            args.append("--config.analysis.checkpoints=" + a.split("=", 1)[1])
        elif a.startswith("--runs="):
            args.append("--config.analysis.runs=" + a.split("=", 1)[1])
        elif a.startswith("--out="):
            args.append("--workdir=" + a.split("=", 1)[1])
        else:
            args.append(a)
    # The config file flag must come first for ml_collections' overrides to apply.
    args = [args[0]] + [a for a in args[1:] if a.startswith("--config=")] + \
           [a for a in args[1:] if not a.startswith("--config=")]
    return entry.main(args)


if __name__ == "__main__":
    sys.exit(main())
