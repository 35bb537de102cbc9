"""The RL post-training loop (host side).

    python -m ng_jax.main --config=ng_jax/configs/awm_normguard.py --workdir=workdirs/awm_normguard

`run` reads top to bottom: set-up (prompts, mesh, model stack, state, jitted functions, resume),
then per epoch prompts -> rollout with the rewards scored inside it (`ng_jax.rl.rollout`) ->
advantages or DPO pairs (`ng_jax.rl.advantages`) -> optimizer steps (the fused base-loss + NormGuard
step, `ng_jax.rl.step`) -> old/EMA update -> periodic evaluation (`ng_jax.eval.evaluate`) ->
checkpoint; at the end the final policy and `summary.json` (`ng_jax.rl.export`). An RL "step
boundary" for checkpoints and SIGTERM is the end of an epoch.

The model comes from `ng_jax.models.stack.build_model_stack`: the toy world's bundle
(`config.reference`) or, with `config.model.family` "sd3"/"sd35"/"flux1_dev", a local diffusers
directory `config.model.weights_dir` (ng_jax/configs/sd35m_*.py, ng_jax/configs/flux1dev_*.py). Real-model
rollouts are latents; the rollout jit decodes them with the VAE before the reward callbacks, and
`rl.rollout.batch_size` splits an epoch's rollouts into several calls.

The workdir gets metrics.jsonl and TensorBoard events (train/* per epoch, eval/* per evaluation),
samples/<tag>.png grids, checkpoints/<epoch>/ (policy, old/EMA, optimizer, RNG, optimizer step and
the `RunMeta`: prompt-stream position and the evaluation history), the final policy and summary.json
with "eval_initial" and "eval" (reward, norm_ratio, norm_ratio_by_sigma [[sigma, ratio], ...], fd,
precision, recall, ...). A rerun with the same workdir resumes exactly where the checkpoint left off.
The workdir may be a bucket (`gs://bucket/run`, `ng_jax.storage`): everything above goes there.

Failures stop the run with a one-line message and leave the last good checkpoint untouched: a
reward that raises, returns NaN or a wrong shape, or times out (RewardError, after
`rewards.retries` retries); a non-finite loss or gradient (TrainingError naming the epoch; the
step did not apply the update); a corrupt, mismatched or incomplete checkpoint (CheckpointError,
never a silent fresh start); an unusable prompt file (PromptFileError). SIGTERM on any host
checkpoints every host at the next epoch boundary and returns 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import logs, sharding, storage
from ng_jax.checkpoint import Checkpointer, CheckpointError, Preemption
from ng_jax.config.checks import ConfigError
from ng_jax.data.render import world_stack
from ng_jax.data.sources import PromptStream
from ng_jax.errors import TrainingError, one_line
from ng_jax.eval.evaluate import (RunEvaluation, initial_evaluation_cache, read_cached_evaluation,
                                  write_cached_evaluation)
from ng_jax.models.stack import build_model_stack
from ng_jax.rewards.host import quiet_reward_error_logs, reward_failures
from ng_jax.rewards.registry import build_rewards
from ng_jax.rl.advantages import make_advantage_fn, train_batches
from ng_jax.rl.export import export_run
from ng_jax.rl.prompts import load_eval_prompts, load_prompt_metadata, load_rl_prompts
from ng_jax.rl.rollout import make_rollout_fn, rollouts, sampler_sigmas
from ng_jax.rl.step import bucket_centres, ema_decay, jit_train_step, make_ema_update, make_init_state, policy_params_fn
from ng_jax.state import make_optimizer


@dataclasses.dataclass
class RunMeta:
    """What a checkpoint records beside the train state (saved as JSON)."""

    method: str
    epoch: int = 0                 # epochs done
    data: dict | None = None       # the prompt stream's position
    eval_initial: dict | None = None
    evals: list = dataclasses.field(default_factory=list)  # scalar results of each evaluation, with "epoch"
    eval_last: dict | None = None  # the last full evaluation result
    seconds: float = 0.0           # wall-clock seconds of the run so far, over every resume

    @classmethod
    def restored(cls, meta: dict, step: int, directory: str, method: str) -> "RunMeta":
        """The metadata of checkpoint `step`; anything unusable is a CheckpointError."""
        where = f"checkpoint step {step} in {directory}"
        missing = sorted({"epoch", "data", "eval_initial", "evals"} - set(meta))
        if missing:
            raise CheckpointError(f"{where}: metadata lacks {missing}")
        if meta.get("method", method) != method:
            raise CheckpointError(f"{where} was written by rl.method={meta['method']!r}, this run is {method!r}")
        if int(meta["epoch"]) != step:
            raise CheckpointError(f"{where} records epoch {meta['epoch']}")
        return cls(method=method, epoch=int(meta["epoch"]), data=meta["data"], eval_initial=meta["eval_initial"],
                   evals=list(meta["evals"]), eval_last=meta.get("eval_last"), seconds=float(meta.get("seconds", 0.0)))


def check_rl_config(config, multiple: int) -> None:
    """Batch arithmetic the loop relies on (ConfigError, one line)."""
    rl = config.rl
    n_samples = int(rl.prompts_per_epoch) * int(rl.group_size)
    for name, value in (("rl.prompts_per_epoch * rl.group_size", n_samples), ("rl.micro_batch", rl.micro_batch)):
        if value % multiple:
            raise ConfigError(f"{name}={value} must be divisible by the data x fsdp devices ({multiple})")
    if int(rl.train_batch) % int(rl.micro_batch):
        raise ConfigError(f"rl.train_batch={rl.train_batch} must be a multiple of rl.micro_batch={rl.micro_batch}")
    per_epoch = int(rl.prompts_per_epoch) if rl.method == "dpo" else n_samples
    if int(rl.train_batch) > per_epoch:
        unit = "winner/loser pairs (one per prompt)" if rl.method == "dpo" else "rollouts"
        raise ConfigError(f"rl.train_batch={rl.train_batch} exceeds the {per_epoch} {unit} of an epoch: "
                          "no optimizer step would run")
    if rl.rollout.policy not in ("old", "current"):
        raise ConfigError(f"rl.rollout.policy={rl.rollout.policy!r}: expected 'old' or 'current'")
    chunk = rollout_chunk(config)
    if n_samples % chunk or chunk % multiple:
        raise ConfigError(f"rl.rollout.batch_size={chunk} must divide the {n_samples} rollouts of an epoch and be "
                          f"divisible by the data x fsdp devices ({multiple})")


def rollout_chunk(config) -> int:
    """Rollouts per jitted call (a memory knob for real models); `rl.rollout.batch_size` 0 = the whole epoch."""
    return int(config.rl.rollout.batch_size) or int(config.rl.prompts_per_epoch) * int(config.rl.group_size)


def run(config, workdir: str) -> int:
    # --- set-up: cheap checks first, so a bad prompt file or batch setting fails before anything compiles
    storage.makedirs(workdir)
    rl, k = config.rl, int(config.rl.group_size)
    prompts, eval_base, metadata = load_rl_prompts(config), load_eval_prompts(config), load_prompt_metadata(config)
    mesh = sharding.make_mesh(config.mesh.shape)
    layout, ref_layout = sharding.layouts(config.mesh)
    check_rl_config(config, sharding.batch_size_multiple(mesh))
    n_samples, chunk = int(rl.prompts_per_epoch) * k, rollout_chunk(config)
    # velocity model, placed reference, prompt encoder, decoder (+ the toy world's render)
    stack = world_stack(build_model_stack(config, mesh, ref_layout), config)
    ref, batch_sh = stack.ref, sharding.batch_sharding(mesh)
    lora_cfg = config.lora if config.lora.rank else None
    optimizer = make_optimizer(config.optim)
    init_state = make_init_state(config, optimizer, lora_cfg)
    state_abstract = jax.eval_shape(init_state, ref)
    state_sh = layout.shardings(state_abstract, mesh)
    try:  # a rule table that leaves big tensors replicated fails here, not in an out-of-memory later
        sharding.check_replication(state_abstract.params, state_sh.params, float(config.mesh.max_replicated_fraction),
                                   "trainable parameters")
        sharding.check_replication(ref, stack.ref_shardings, float(config.mesh.max_replicated_fraction),
                                   "reference parameters")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    policy_params = policy_params_fn(lora_cfg)
    weighted, prompt_table = build_rewards(config.rewards), []
    weighted.metadata = metadata  # per-prompt metadata of JSONL prompt files, for the rewards that use it
    rollout_fn = make_rollout_fn(config, stack, mesh, layout.logical_rules, state_sh, weighted, prompt_table,
                                 policy_params)
    step_fn = jit_train_step(config, stack.model.apply, optimizer, lora_cfg,
                             np.asarray(jax.device_get(sampler_sigmas(rl.rollout))), mesh, state_sh, stack.ref_shardings)
    ema_fn = jax.jit(make_ema_update(), in_shardings=(state_sh, sharding.replicated(mesh)), out_shardings=state_sh,
                     donate_argnums=(0,))
    adv_fn = make_advantage_fn(config)
    stream = PromptStream(prompts, seed=config.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.ckpt.max_to_keep))
    is_main = jax.process_index() == 0
    try:
        restore_step = config.ckpt.get("restore_step")
        state, meta = _restore_or_init(ckpt, init_state, state_abstract, state_sh, stack, stream, rl.method, workdir,
                                       None if restore_step is None or int(restore_step) < 0 else int(restore_step))
        evaluator = RunEvaluation(config.eval, stack, mesh, weighted=weighted, policy_params=policy_params,
                                  workdir=workdir, prompts=eval_base, rules=layout.logical_rules)
        uncond = jax.device_put(stack.uncond(chunk), batch_sh)
    except BaseException:
        ckpt.close()
        raise
    writer = logs.MetricWriter(workdir, enabled=is_main, logging=config.get("logging"), name=str(config.get("name", "")),
                               run_config=json.loads(config.to_json_best_effort()))
    epochs = int(rl.epochs)
    bar = logs.progress(epochs, desc=f"{rl.method}{'+normguard' if config.normguard.lam else ''}",
                        initial=min(meta.epoch, epochs), enabled=is_main)
    say = bar.write if is_main else (lambda *_: None)  # one copy of each report line, from process 0

    def evaluate(params, tag: str, step: int, cache: str | None = None) -> dict:
        t_eval = time.time()
        result = read_cached_evaluation(cache)
        cached = result is not None
        if not cached:
            with reward_failures(weighted, mesh, f"evaluation ({tag})", _last_good(ckpt)):
                result = evaluator(params, tag=tag, step=step, final=step in (0, epochs))
            if is_main:
                write_cached_evaluation(cache, result)
        writer.write(step, {**logs.scalars(result), "eval_s": time.time() - t_eval}, prefix="eval/")
        if not cached and writer.wants_images:
            _log_eval_images(writer, workdir, tag, step, result)
        say(logs.eval_line(f"epoch {step}" if step else tag, result) + (f" (cached: {cache})" if cached else ""))
        return result

    t_start, seconds_before = time.time(), meta.seconds
    with Preemption() as preemption, quiet_reward_error_logs():
        try:
            if meta.eval_initial is None:
                meta.eval_initial = evaluate(state.params, "initial", 0, initial_evaluation_cache(config, stack))
            for epoch in range(meta.epoch, epochs):
                done, t0 = epoch + 1, time.time()
                # --- prompts -> rollout with rewards (host callbacks inside the jit)
                epoch_prompts = stream.next_batch(int(rl.prompts_per_epoch))
                prompt_table[:] = epoch_prompts
                cond = jax.device_put(stack.encode(epoch_prompts, repeat=k), batch_sh)
                prompt_ids = np.repeat(np.arange(len(epoch_prompts), dtype=np.int32), k)
                r_noise, r_sde = jax.random.split(jax.random.fold_in(jax.random.key(config.seed + 7), epoch))
                noise = jax.random.normal(r_noise, (n_samples,) + tuple(stack.model.sample_shape))
                weighted.take_timing()
                with reward_failures(weighted, mesh, f"epoch {done}", _last_good(ckpt)):
                    x0, rewards, parts = rollouts(rollout_fn, chunk, batch_sh, state, ref, stack.decoder_params,
                                                  noise, cond, uncond, prompt_ids, r_sde,
                                                  weighted.device_inputs(epoch_prompts))
                    jax.block_until_ready((x0, rewards, parts))  # a failing callback surfaces here
                rewards, parts = sharding.to_host(rewards), sharding.to_host(parts)
                t_train = time.time()   # one clock reading ends the rollout and starts training: the parts add up
                t_roll, (reward_busy, reward_span) = t_train - t0, weighted.take_timing()
                # --- advantages -> optimizer steps -> old/EMA update
                advantages = np.asarray(adv_fn(jnp.asarray(rewards), jnp.asarray(prompt_ids)))
                metrics = logs.StepMetrics(bucket_centres())
                for batch in train_batches(config, x0, cond, advantages, rewards, k, epoch):
                    state, m = step_fn(state, ref, jax.device_put(batch, batch_sh))
                    m = jax.device_get(m)
                    if not bool(m["finite"]):
                        raise TrainingError(
                            f"non-finite loss or gradient at epoch {done}, optimizer step {metrics.steps + 1} of the "
                            f"epoch (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); the update was not "
                            f"applied; {_last_good(ckpt)}")
                    metrics.add(m)
                state = ema_fn(state, jnp.float32(ema_decay(config, int(state.step))))
                if metrics.steps == 0:  # e.g. DPO when every group's rewards tie
                    say(f"warning: epoch {done} took no optimizer step (rl.method={rl.method}, "
                        f"rewards {'all tie within every group' if rl.method == 'dpo' else 'gave no full batch'})")
                record, t_end = metrics.record(), time.time()
                record.update(reward=float(rewards.mean()), reward_std=float(rewards.std()), epoch=done,
                              rollout_s=t_roll, epoch_s=t_end - t0, optimizer_steps=int(state.step),
                              train_s=t_end - t_train, reward_host_s=reward_busy, reward_host_span_s=reward_span,
                              epoch_optimizer_steps=metrics.steps)
                record.update({f"reward/{name}": float(parts[:, i].mean()) for i, name in enumerate(weighted.names)})
                writer.write(done, record, prefix="train/")
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", ratio=f"{record.get('norm_ratio', float('nan')):.3f}")
                meta.epoch, meta.data = done, stream.state()
                # --- evaluation, checkpoint
                if done % int(config.eval.every) == 0 or done == epochs:
                    meta.eval_last = evaluate(state.params, f"epoch_{done:04d}", done)
                    meta.evals.append({"epoch": done, **logs.scalars(meta.eval_last)})
                stop = preemption.should_stop()  # SIGTERM on any host stops every host at this boundary
                if done % int(config.ckpt.every) == 0 or done == epochs or stop:
                    meta.seconds = seconds_before + time.time() - t_start
                    ckpt.save(done, state, dataclasses.asdict(meta))
                if stop:
                    say(f"SIGTERM: checkpoint saved at epoch {done} in {ckpt.directory}; exiting")
                    return 0
        finally:
            bar.close()
            ckpt.close()  # waits for a pending save
            writer.close()
    export_run(config, workdir, stack, state, policy_params, meta)
    return 0


def _log_eval_images(writer, workdir: str, tag: str, step: int, result: dict) -> None:
    """An evaluation's sample grids (as the evaluator saved them) and its norm-ratio plot (when it measured
    norms: `eval.norms`), as images."""
    for suffix in [""] + [f"_{name}" for name in (result.get("variants") or {})]:
        path = os.path.join(workdir, "samples", f"{tag}{suffix}.png")
        if storage.is_file(path):
            writer.write_image(step, f"samples{suffix or '_plain'}", path)
    if any(r.get("norm_ratio_by_sigma") for r in [result, *(result.get("variants") or {}).values()]):
        writer.write_image(step, "norm_ratio", logs.norm_ratio_figure(result, f"{tag}: norm ratio"))


def _restore_or_init(ckpt, init_state, state_abstract, state_sh, stack, stream, method: str, workdir: str,
                     restore_step: int | None = None):
    """The train state and RunMeta: restored from the latest checkpoint, or `restore_step` (never a silent fresh
    start when one exists but cannot be used), else initialised."""
    if ckpt.resume_step() is None:
        state = jax.jit(init_state, in_shardings=(stack.ref_shardings,), out_shardings=state_sh)(stack.ref)
        return state, RunMeta(method=method, data=stream.state())
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state_abstract, state_sh)
    state, raw, step = ckpt.restore(target, restore_step)
    meta = RunMeta.restored(raw, step, ckpt.directory, method)
    try:
        stream.restore(meta.data)
    except ValueError as err:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory}: cannot restore the prompt stream "
                              f"({one_line(err)}); was it written with other prompts or another seed?") from None
    if jax.process_index() == 0:
        logs.trim_metrics(os.path.join(workdir, "metrics.jsonl"), meta.epoch)
    print(f"resumed at epoch {meta.epoch} (optimizer step {int(state.step)}) from {ckpt.directory}")
    return state, meta


def _last_good(ckpt: Checkpointer) -> str:
    last = ckpt.latest_step()
    return f"last good checkpoint: epoch {last} in {ckpt.directory}" if last is not None else "no checkpoint yet"
