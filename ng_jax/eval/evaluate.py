"""Fixed-prompt evaluation: rewards, verifier accuracy per category, norm ratio against the
reference per sigma along the sampling trajectory, Fréchet distance and k-NN precision/recall
against real renders of the same prompts, and a PNG grid.

Also the `evaluate` job, which scores a model bundle (default: the shipped reference):

    python -m ng_jax.main --config=ng_jax/configs/eval_reference.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import Counter, defaultdict

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from ng_jax import flow, logs, sharding, storage
from ng_jax.config.checks import ConfigError, norms_problem
from ng_jax.data import world
from ng_jax.data.prompts import category_of
from ng_jax.data.render import render_fn, world_stack
from ng_jax.judges.toy import QualityJudge, reference_renders
from ng_jax.eval.analysis.checkpoints import POLICY_DIR
from ng_jax.models.bundle import bundle_fingerprint, load_bundle
from ng_jax.models.stack import build_model_stack
from ng_jax.rewards.registry import build_rewards
from ng_jax.rewards.verifier import VerifierReward
from ng_jax.rl.export import read_policy
from ng_jax.rl.prompts import eval_prompts
from ng_jax.rl.step import policy_params_fn
from ng_jax.sampling import from_uint8, make_sampler, to_uint8


def _category(prompt: str) -> str:
    """The shapes-world category of a prompt; free-form prompts (real models) are "other"."""
    try:
        return category_of(prompt)
    except world.PromptError:
        return "other"


@jax.jit
def _out_of_range(x0):
    """Per sample, the fraction of values with |x| > 1 (before clipping / rendering)."""
    return jnp.mean((jnp.abs(x0) > 1.0).astype(jnp.float32), axis=tuple(range(1, x0.ndim)))


def norms_mode(value, key: str = "eval.norms") -> str:
    """An `eval.norms` setting, checked: which evaluations measure the norm ratio ("always"; "final": only
    before training and after the last epoch; "never")."""
    problem = norms_problem(key, value)
    if problem:
        raise ConfigError(problem)
    return value


def repeat_prompts(prompts: list[str], samples_per_prompt: int, min_per_category: int = 0) -> list[str]:
    """Each prompt `samples_per_prompt` times, consecutively; a category with few prompts (the test split
    holds 1 counting and 2 single-object prompts) gets more samples per prompt, so that it has at least
    `min_per_category` samples in all."""
    per_cat = Counter(_category(p) for p in prompts)
    return [p for p in prompts for _ in range(max(samples_per_prompt, -(-min_per_category // per_cat[_category(p)])))]


class Evaluator:
    """Callable `(trainable_params, tag, step) -> results dict`; keeps the last full result.

    `stack` is the run's `ng_jax.models.stack.ModelStack`: its velocity model and reference
    params, its prompt encoder, and its decoder (samples -> images; the identity in the toy world,
    the VAE for real models). The verifier accuracy and the FD / precision / recall judges are the
    toy world's (`eval.accuracy`, `eval.quality`; off in the real-model configs)."""

    def __init__(self, eval_cfg, stack, mesh, *, weighted, policy_params, workdir: str | None,
                 prompts: list[str] | None = None, policy_is_ref: bool = False,
                 rules=sharding.LOGICAL_RULES, record_norms: bool | None = None):
        model, ref_params = stack.model, stack.ref
        self.cfg, self.model, self.mesh, self.stack = eval_cfg, model, mesh, stack
        self.weighted, self.policy_params, self.ref = weighted, policy_params, ref_params
        self.workdir = workdir
        self.last = None
        self.last_out_of_range = None  # the last call's fraction of sample values past [-1, 1] (toy world)
        self.last_images = None  # uint8 [n, H, W, 3] of the last call
        self.last_detections = None  # the verifier's objects per image of the last call (when it ran)
        k = int(eval_cfg.samples_per_prompt)
        base = list(prompts) if prompts is not None else eval_prompts(eval_cfg, shapes_grammar=stack.is_toy)
        self.prompts = repeat_prompts(base, k, int(eval_cfg.get("min_samples_per_category", 0) or 0))
        self.categories = [_category(p) for p in self.prompts]
        if float(eval_cfg.get("cfg_rescale", 0.0)) and float(eval_cfg.cfg_scale) == 1.0:
            raise ConfigError(f"eval.cfg_rescale={eval_cfg.cfg_rescale} acts only on a guided velocity, but "
                              "eval.cfg_scale=1 (CFG-free); set eval.cfg_scale (e.g. 4.5) or eval.cfg_rescale=0")
        # The norm ratio needs a second (reference) forward pass per sampling step; without it the result's
        # norm_ratio keys are None ("not measured"). Default: as `eval.norms` ("never" turns it off).
        self.record_norms = (norms_mode(eval_cfg.get("norms", "always")) != "never") if record_norms is None \
            else bool(record_norms)
        self.batch = int(eval_cfg.batch_size)
        multiple = sharding.batch_size_multiple(mesh)
        if self.batch % multiple:
            raise ValueError(f"eval.batch_size={self.batch} must be divisible by data x fsdp ({multiple})")
        pad = (-len(self.prompts)) % self.batch
        self.n = len(self.prompts)
        prompts_padded = [self.prompts[i % self.n] for i in range(self.n + pad)]  # pad may exceed n
        self.conds = [stack.encode(prompts_padded[i:i + self.batch]) for i in range(0, len(prompts_padded), self.batch)]
        self.uncond = stack.uncond(self.batch)
        seeds = np.arange(len(prompts_padded)) + int(eval_cfg.get("seed", 0)) * 100_003
        self.noise = [jax.random.normal(jax.random.key(int(eval_cfg.get("seed", 0))), (len(prompts_padded),)
                                        + model.sample_shape)[i:i + self.batch]
                      for i in range(0, len(prompts_padded), self.batch)]
        opt = lambda key: None if eval_cfg.get(key) is None else float(eval_cfg[key])  # noqa: E731
        self.sampler = make_sampler(model.apply, num_steps=int(eval_cfg.num_steps), shift=float(eval_cfg.shift),
                                    mu=opt("mu"), s_min=opt("s_min"), cfg_scale=float(eval_cfg.cfg_scale),
                                    record=("x0", "norms") if self.record_norms else ("x0",),
                                    renorm_to_ref=bool(eval_cfg.get("renorm", False)),
                                    cfg_rescale_phi=float(eval_cfg.get("cfg_rescale", 0.0)))
        # Inputs are batch-sharded; outputs are left to the compiler (the grid `sigmas` and the
        # [steps, batch] norms cannot take the batch sharding on their first axis).
        sh = sharding.batch_sharding(mesh)
        self.noise = [jax.device_put(n, sh) for n in self.noise]
        self.conds = [jax.device_put(c, sh) for c in self.conds]
        self.uncond = jax.device_put(self.uncond, sh)
        # Scoring the reference itself (`policy_is_ref`): its norms are the policy's, so the sampler skips
        # the second (reference) forward pass per step that the norm ratio otherwise needs.
        ref_pass = (self.record_norms and not policy_is_ref) or bool(eval_cfg.get("renorm", False))
        # Activations are placed by the run's rule table (`rules`), as in the rollout.
        sample = lambda p, r, noise, c, u: self.sampler(policy_params(p, r), noise, c, u, None,  # noqa: E731
                                                        ref_params=r if ref_pass else None)
        self._sample = jax.jit(sharding.with_rules(sample, mesh, rules))
        self._verifier = None
        self._decode = jax.jit(stack.decode_fn)  # samples -> float images (toy: the identity)
        self.judge = QualityJudge() if eval_cfg.get("quality", True) else None
        self.real = reference_renders(self.prompts, seeds[: self.n]) if self.judge else None
        if self.real is not None and stack.render != "clip":  # the real images go through the same display
            self.real = np.asarray(to_uint8(render_fn(stack.render)(from_uint8(self.real))))

    def sample(self, trainable):
        xs, pol, ref, over = [], [], [], []
        for noise, cond in zip(self.noise, self.conds):
            out = self._sample(trainable, self.ref, noise, cond, self.uncond)
            xs.append(sharding.to_host(to_uint8(self._decode(self.stack.decoder_params, out.x0))))
            if self.stack.is_toy:  # the fraction of image values past [-1, 1] before rendering
                shift = 0.0 if self.stack.shift is None else jnp.asarray(self.stack.shift, out.x0.dtype)
                over.append(sharding.to_host(_out_of_range(out.x0 + shift)))
            if self.record_norms:
                pol.append(sharding.to_host(out.norms_policy))
                ref.append(pol[-1] if out.norms_ref is None else sharding.to_host(out.norms_ref))
        sigmas = sharding.to_host(out.sigmas)
        self.last_out_of_range = float(np.concatenate(over)[: self.n].mean()) if over else None
        if not self.record_norms:
            return np.concatenate(xs)[: self.n], None, None, sigmas
        return (np.concatenate(xs)[: self.n], np.concatenate(pol, 1)[:, : self.n],
                np.concatenate(ref, 1)[:, : self.n], sigmas)

    def __call__(self, trainable, *, tag: str, step: int) -> dict:
        images, norm_p, norm_r, sigmas = self.sample(trainable)
        total, parts = self.weighted.score_host(images, self.prompts)
        result = {"step": int(step), "n_images": int(self.n), "reward": float(np.mean(total)),
                  "norm_ratio": None, "norm_ratio_by_sigma": None, "norm_ratio_spread_by_sigma": None}
        if norm_p is not None:
            ratio = np.asarray(flow.norm_ratio(norm_p, norm_r))  # [N_steps, n], as the train step's
            result.update(norm_ratio=float(ratio.mean()),
                          norm_ratio_by_sigma=[[float(s), float(r)] for s, r in zip(sigmas[:-1], ratio.mean(1))],
                          norm_ratio_spread_by_sigma=[[float(s), float(r)] for s, r in zip(sigmas[:-1], ratio.std(1))])
        for name, vals in parts.items():
            result[f"reward_{name}"] = float(np.mean(vals))
        if self.last_out_of_range is not None:
            result["out_of_range"] = self.last_out_of_range
        verifier = self.weighted.rewards.get("verifier") if hasattr(self.weighted, "rewards") else None
        if verifier is None and self.cfg.get("accuracy", True):
            if self._verifier is None:  # loaded once, on the first evaluation that needs it
                self._verifier = VerifierReward()
            verifier = self._verifier
        detections = None
        if verifier is not None:
            detections = verifier.detect(images)
            correct = np.asarray(verifier.judge(images, self.prompts, detections), bool)
            result["accuracy"] = float(correct.mean())
            by_cat = defaultdict(list)
            for c, ok in zip(self.categories, correct):
                by_cat[c].append(ok)
            result["accuracy_by_category"] = {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}
            # GenEval's "overall" is the mean of its task scores, so that a category with many prompts
            # (here colour attribution: 133 of the 155 test prompts) does not stand for all of them.
            result["accuracy_overall"] = float(np.mean(list(result["accuracy_by_category"].values())))
        if self.judge is not None:
            result.update(self.judge.evaluate(images, self.real))
        else:  # eval.quality=False: the keys stay, marked as not measured
            result.update(fd=None, precision=None, recall=None, kid=None)
        if self.workdir:
            show = min(len(images), int(self.cfg.get("grid_size", 32)))
            scale = max(1, 96 // max(images.shape[1:3]))  # 32 px toy images x3; 512 px real ones x1
            logs.save_grid(os.path.join(self.workdir, "samples", f"{tag}.png"), images[:show],
                                labels=self.prompts[:show], cols=8, scale=scale)
        self.last, self.last_images, self.last_detections = result, images, detections
        return result


class RunEvaluation:
    """The evaluations of an RL run, as one callable `(params, tag=, step=, final=) -> result dict`.

    The configured evaluation (`eval.*`) runs every `eval.every` epochs; the `final=True` ones (before
    training and after the last epoch) use `eval.final_samples_per_prompt` samples per prompt instead
    when it is set (> 0), so that the numbers a run is judged by rest on more images. Each evaluation
    also runs the variants of `eval.variants` (name -> overrides of the eval block, e.g.
    `{"guided": {"cfg_scale": 4.5}, "steps4": {"num_steps": 4}}`) on the same prompts and noise; their
    results come back under `variants`, and their numbers flattened as `<name>/<key>` for the logs. A
    variant with `final_only: True` runs only in the final evaluations.
    Evaluators are built on first use and reused."""

    def __init__(self, eval_cfg, stack, mesh, **evaluator_kwargs):
        self.cfg, self.stack, self.mesh, self.kwargs = eval_cfg, stack, mesh, evaluator_kwargs
        self._evaluators: dict = {}

    def evaluator(self, final: bool, variant: str = "") -> Evaluator:
        overrides = {k: v for k, v in (self.cfg.variants[variant].items() if variant else ()) if k != "final_only"}
        mode = (norms_mode(overrides["norms"], f"eval.variants.{variant}.norms") if "norms" in overrides
                else norms_mode(self.cfg.get("norms", "always")))
        n_final = int(self.cfg.final_samples_per_prompt)
        own = final and (n_final > 0 or mode == "final")  # the final evaluations get their own evaluator
        key = (own, variant)
        if key not in self._evaluators:
            cfg = copy.deepcopy(self.cfg)
            if own and n_final > 0:
                cfg.samples_per_prompt = n_final
            for k, v in overrides.items():
                cfg[k] = v
            self._evaluators[key] = Evaluator(cfg, self.stack, self.mesh, **self.kwargs,
                                              record_norms=mode == "always" or (mode == "final" and own))
        return self._evaluators[key]

    def __call__(self, params, *, tag: str, step: int, final: bool = False) -> dict:
        result = self.evaluator(final)(params, tag=tag, step=step)
        if self.cfg.variants:
            result["variants"] = {}
            for name in self.cfg.variants:
                if self.cfg.variants[name].get("final_only", False) and not final:
                    continue
                r = self.evaluator(final, name)(params, tag=f"{tag}_{name}", step=step)
                result["variants"][name] = r
                result.update({f"{name}/{k}": v for k, v in logs.scalars(r).items() if k != "step"})
        return result


def initial_evaluation_cache(config, stack) -> str | None:
    """The file that caches the reference's evaluation under this run's evaluation settings
    (`eval.initial_cache`, a directory; "" = no cache), or None. Runs that differ only in what they
    train (method, NormGuard, seed, optimizer) start from the same reference and evaluate it on the same
    prompts and noise, so a grid computes that evaluation once. The key covers everything it depends on:
    the reference's parameter checksum, the eval block, the rewards, the sample space and the render.
    Not the cache's own location: a moved workdir keeps its entries. Toy world only (a real model's weights
    directory has no checksum)."""
    directory = str(config.eval.get("initial_cache") or "")
    if not directory or not stack.is_toy:
        return None
    settings = {k: v for k, v in json.loads(config.eval.to_json_best_effort()).items() if k != "initial_cache"}
    key = json.dumps([bundle_fingerprint(config.get("reference") or None), settings,
                      json.loads(config.rewards.to_json_best_effort()), config.get("space", "pixel"), config.render],
                     sort_keys=True)
    return os.path.join(directory, hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def read_cached_evaluation(path: str | None) -> dict | None:
    return storage.read_json(path) if path else None


def write_cached_evaluation(path: str | None, result: dict) -> None:
    if path:
        logs.write_json(path, result)  # atomic: a reader sees the whole file or none


def constraint_failures(prompts, detections) -> dict[str, dict[str, float]]:
    """Per prompt category, the fraction of samples failing each atomic constraint of their prompt
    (`world.constraint_scores`: g{i}_count is the shape, g{i}_color / g{i}_size the attributes,
    relation, no_extra_objects) on the verifier's detected objects: what an accuracy table hides."""
    fails: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for prompt, objects in zip(prompts, detections):
        spec = world.parse_prompt(prompt)
        for name, ok in world.constraint_scores(spec, objects).items():
            seen[spec.category][name] += 1
            fails[spec.category][name] += not ok
    return {c: {k: fails[c][k] / n for k, n in sorted(seen[c].items())} for c in sorted(seen)}


def policy_to_score(config, stack, mesh):
    """(trainable params, policy_params fn, is the reference) of the evaluate job's `policy`: "" scores the
    reference itself; a finished RL workdir scores its final policy against the reference (the toy world's
    policy bundle, or a real model's trainable tree: full weights, or LoRA adapters merged on the fly)."""
    path = str(config.get("policy") or "")
    if not path:
        return stack.ref, (lambda p, r: p), True
    if stack.is_toy:
        inner = os.path.join(path, POLICY_DIR)
        bundle = load_bundle(inner if storage.path(inner).is_dir() else path)
        if dict(bundle.model_cfg) != dict(stack.bundle.model_cfg):
            ref = config.get("reference") or "the shipped reference"
            raise ConfigError(f"policy={path!r}: its velocity model differs from the reference's ({ref}); evaluate it "
                              "against the reference it was trained from")
        return bundle.params["velocity"], (lambda p, r: p), False
    note, trainable = read_policy(path)
    if str(note["model"].get("weights_dir")) != str(config.model.weights_dir):
        raise ConfigError(f"policy={path!r} was trained from {note['model'].get('weights_dir')!r}, not "
                          f"model.weights_dir={config.model.weights_dir!r}")
    lora = note.get("lora")
    if lora:
        trainable = jax.device_put(trainable, sharding.replicated(mesh))
    else:
        trainable = jax.device_put(trainable, stack.ref_shardings)
    return trainable, policy_params_fn(mlc.ConfigDict(lora) if lora else None), False


def run(config, workdir: str) -> int:
    """The `evaluate` job: score a bundle, or a finished RL run's policy (`policy`), or with a `model` block a
    real model's reference weights or trained policy, on fixed prompts; print a per-category accuracy table."""
    storage.makedirs(workdir)
    mesh = sharding.make_mesh(config.mesh.shape)
    layout, ref_layout = sharding.layouts(config.mesh)
    # The toy reference stays on the host, as this job always had it; real weights are placed by the rules.
    stack = world_stack(build_model_stack(config, None if "model" not in config else mesh, ref_layout), config)
    trainable, policy_params, is_ref = policy_to_score(config, stack, mesh)
    evaluator = Evaluator(config.eval, stack, mesh, weighted=build_rewards(config.rewards),
                          policy_params=policy_params, workdir=workdir, policy_is_ref=is_ref,
                          rules=layout.logical_rules)
    result = evaluator(trainable, tag="evaluate", step=0)
    if stack.is_toy and evaluator.last_detections is not None:
        result["constraint_failures"] = constraint_failures(evaluator.prompts, evaluator.last_detections)
    logs.write_json(os.path.join(workdir, "eval.json"), result)
    counts = Counter(evaluator.categories)
    print("| category | prompts x samples | verifier accuracy |\n|---|---|---|")
    for c, acc in result.get("accuracy_by_category", {}).items():
        print(f"| {c} | {counts[c]} | {acc:.3f} |")
    print(f"| **overall** (mean of the categories, as GenEval) | {evaluator.n} | "
          f"{result.get('accuracy_overall', float('nan')):.3f} |")
    print(f"| all samples pooled | {evaluator.n} | {result.get('accuracy', float('nan')):.3f} |")
    quality = " ".join(f"{k}={'n/a' if result.get(k) is None else format(result[k], '.3f')}"
                       for k in ("fd", "precision", "recall"))
    print(f"reward={result['reward']:.4f} {quality}")
    if result.get("kid") is not None:
        print(f"kid={result['kid']:.2f} [95% CI {result['kid_ci_low']:.2f}, {result['kid_ci_high']:.2f}] (paired, judge "
              f"features) saturation-real={result['saturation_diff']:+.4f} contrast-real={result['contrast_diff']:+.4f}")
    for c, rates in result.get("constraint_failures", {}).items():
        worst = sorted(rates.items(), key=lambda kv: -kv[1])
        print(f"failed constraints, {c}: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    return 0
