"""The RL post-training loop (host side).

    python -m ng_jax.main --config=configs/awm_normguard.py --workdir=workdirs/awm_normguard

Per epoch: prompts -> jitted group rollout (K samples per prompt, rewards scored through host
callbacks inside the same jit) -> group-relative advantages -> optimizer steps (the fused
base-loss + NormGuard step of ng_jax.rl.step) -> old/EMA update -> periodic evaluation ->
checkpoint. An RL "step boundary" for checkpoints and SIGTERM is the end of an epoch.

The model comes from `ng_jax.models.stack.build_model_stack`: the toy world's bundle
(`config.reference`) or, with `config.model.family` "sd3"/"sd35"/"flux1_dev", a local diffusers
directory `config.model.weights_dir` (configs/sd35m_*.py, configs/flux1dev_*.py). Real-model
rollouts are latents; the rollout jit decodes them with the VAE before the reward callbacks, and
`rl.rollout.batch_size` splits an epoch's rollouts into several calls.

The workdir gets metrics.jsonl and TensorBoard events (train/* per epoch, eval/* per evaluation),
samples/<tag>.png grids, checkpoints/<epoch>/ (policy, old/EMA, optimizer, RNG, optimizer step,
prompt-stream position and the evaluation history), at the end the final policy (toy: a merged model
bundle in policy/; real models: the trainable tree, LoRA adapters or full weights, saved with orbax in
policy_params/ with policy_params.json; the base weights stay in model.weights_dir) and summary.json with
"eval_initial" and "eval" (reward, norm_ratio, norm_ratio_by_sigma [[sigma, ratio], ...], fd,
precision, recall, ...). A rerun with the same workdir resumes exactly where the checkpoint left off.

Failures stop the run with a one-line message and leave the last good checkpoint untouched: a
reward that raises, returns NaN or a wrong shape, or times out (RewardError, after
`rewards.retries` retries); a non-finite loss or gradient (TrainingError naming the epoch; the
step did not apply the update); a corrupt, mismatched or incomplete checkpoint (CheckpointError,
never a silent fresh start); an unusable prompt file (ng_jax.rl.prompts.PromptFileError). SIGTERM
checkpoints at the next epoch boundary and returns 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import logs, losses, sharding

from ng_jax.rl import epoch as rl_epoch
from ng_jax.checkpoint import CheckpointError, Checkpointer, export_params
from ng_jax.config.checks import ConfigError
from ng_jax.eval.evaluate import Evaluator, build_rewards, eval_prompts
from ng_jax.eval.analysis.checkpoints import POLICY_DIR
from ng_jax.models.bundle import ModelBundle, save_bundle
from ng_jax.models.stack import TOY, build_model_stack, model_family, trainable_init
from ng_jax.rewards.host import RewardError, make_reward_fn, reset_callback_tokens
from ng_jax.rl.prompts import load_rl_prompts, one_line, read_prompts
from ng_jax.sampling import make_sampler
from ng_jax.state import TrainState, make_optimizer
from ng_jax.rl.step import StepSpec, make_ema_update, make_train_step, policy_params_fn


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message names the epoch and the last checkpoint."""


def make_step_spec(config, grid: np.ndarray) -> StepSpec:
    rl, ng = config.rl, config.normguard
    return StepSpec(
        method=rl.method, micro_batch=int(rl.micro_batch), num_timesteps=int(rl.num_timesteps),
        grid=tuple(float(s) for s in grid[:-1]), grid_fraction=float(rl.grid_fraction),
        loss_kwargs=dict(config.loss.to_dict()), lam=float(ng.lam), margin=float(ng.margin),
        power=int(ng.power), relative=bool(ng.relative),
        dpo_logit_mean=float(rl.get("dpo_logit_mean", 0.0)), dpo_logit_std=float(rl.get("dpo_logit_std", 1.0)),
        dpo_shift=float(rl.get("dpo_shift", 1.0)))


def make_init_state(config, optimizer, lora_cfg):
    """`init_state(ref) -> TrainState` at step 0 (pure; jitted with the state's out_shardings)."""
    def init_state(ref):
        trainable = trainable_init(ref, lora_cfg, jax.random.key(config.seed + 1))
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema=jax.tree.map(jnp.copy, trainable),
                          opt_state=optimizer.init(trainable), rng=jax.random.key(config.seed))
    return init_state


def jit_train_step(config, apply_fn, optimizer, lora_cfg, grid, mesh, state_sh, ref_sh):
    """The run's jitted, sharded train step `(state, ref, batch) -> (state, metrics)`, state donated, with
    the activation rules of `mesh.logical_rules` active while it traces. `ng_jax.plan` lowers this same
    function ahead of time against abstract shapes."""
    spec = make_step_spec(config, grid)
    step = sharding.with_rules(make_train_step(apply_fn, optimizer, spec, lora_cfg), mesh,
                                   sharding.layouts(config.mesh)[0].logical_rules)
    return jax.jit(step, in_shardings=(state_sh, ref_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def ema_decay(config, step: int) -> float:
    """Old/EMA decay after an epoch: min(rate * optimizer_step, max) (DiffusionNFT / AWM schedules)."""
    return float(min(config.rl.ema.rate * step, config.rl.ema.max))


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


class _Sigterm:
    """SIGTERM -> `requested`; the loop checkpoints at the next epoch boundary and returns 0."""

    def __init__(self):
        self.requested = False
        self._prev = None
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._prev = signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.requested = True

    def close(self):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None


class _DropRewardErrorLogs(logging.Filter):
    """jax logs every failed host callback with a full traceback, once per device shard. A RewardError
    already names the reward and the problem, and the loop reports it in one line, so those records
    are dropped; any other callback failure (a bug) is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RewardError)


_CALLBACK_LOGGER = logging.getLogger("jax._src.callback")


def run(config, workdir: str) -> int:
    from ng_jax.data.sources import PromptStream

    os.makedirs(workdir, exist_ok=True)
    rl = config.rl
    # Cheap checks first: a bad prompt file or batch setting fails before anything compiles.
    prompts = load_rl_prompts(config)
    eval_base = read_prompts(
        f"eval.prompt_file={config.eval.prompt_file!r}" if config.eval.get("prompt_file")
        else f"evaluation prompts in eval.data_dir={config.eval.data_dir!r}",
        lambda: eval_prompts(config.eval, shapes_grammar=model_family(config) == TOY))
    mesh = sharding.make_mesh(config.mesh.shape)
    layout, ref_layout = sharding.layouts(config.mesh)
    check_rl_config(config, sharding.batch_size_multiple(mesh))
    k = int(rl.group_size)
    n_samples = int(rl.prompts_per_epoch) * k
    # Rollouts per jitted call (a memory knob for real models); 0 = the whole epoch in one call.
    chunk = int(rl.rollout.get("batch_size", 0) or 0) or n_samples
    if n_samples % chunk or chunk % sharding.batch_size_multiple(mesh):
        raise ConfigError(f"rl.rollout.batch_size={chunk} must divide the {n_samples} rollouts of an epoch and be "
                          f"divisible by the data x fsdp devices ({sharding.batch_size_multiple(mesh)})")

    # The model stack (ng_jax.models.stack): velocity model, placed reference, prompt encoder, decoder.
    stack = build_model_stack(config, mesh, ref_layout)
    model, ref, ref_shardings = stack.model, stack.ref, stack.ref_shardings
    dec_params, dec_shardings = stack.decoder_params, stack.decoder_shardings
    lora_cfg = config.lora if config.lora.rank else None
    replicated = sharding.replicated(mesh)
    optimizer = make_optimizer(config.optim)
    init_state = make_init_state(config, optimizer, lora_cfg)
    state_abstract = jax.eval_shape(init_state, ref)
    state_sh = layout.shardings(state_abstract, mesh)
    max_rep = float(config.mesh.get("max_replicated_fraction", 1.0))
    try:  # a rule table that leaves big tensors replicated fails here, not in an out-of-memory later
        sharding.check_replication(state_abstract.params, state_sh.params, max_rep, "trainable parameters")
        sharding.check_replication(ref, ref_shardings, max_rep, "reference parameters")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    policy_params = policy_params_fn(lora_cfg)
    batch_sh = sharding.batch_sharding(mesh)

    # --- rollout + rewards (host callbacks inside shard_map), one jit -------------------------
    ro = rl.rollout
    sampler = make_sampler(model.apply, num_steps=int(ro.num_steps), shift=float(ro.shift), mu=rl_epoch.opt(ro, "mu"),
                           s_min=rl_epoch.opt(ro, "s_min"), cfg_scale=float(ro.cfg_scale), sde_noise=float(ro.sde_noise),
                           sde_window=tuple(ro.sde_window))
    weighted = build_rewards(config.rewards)
    prompt_table: list[str] = []
    reward_fn = make_reward_fn(weighted, prompt_table, mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))

    def rollout(trainable, ema, ref_params, decoder_params, noise, cond, uncond, prompt_ids, rng):
        source = ema if ro.policy == "old" else trainable
        out = sampler(policy_params(source, ref_params), noise, cond, uncond, rng)
        # Samples -> images on device (toy: the identity; real: VAE decode), then the host rewards.
        total, parts = reward_fn(stack.decode_fn(decoder_params, out.x0), prompt_ids)
        return out.x0, total, parts

    rollout_fn = jax.jit(sharding.with_rules(rollout, mesh, layout.logical_rules),
                         in_shardings=(state_sh.params, state_sh.ema, ref_shardings, dec_shardings, batch_sh,
                                       batch_sh, batch_sh, batch_sh, replicated),
                         out_shardings=(batch_sh, batch_sh, batch_sh))
    grid = np.asarray(jax.device_get(rl_epoch.sampler_sigmas(ro)))
    step_fn = jit_train_step(config, model.apply, optimizer, lora_cfg, grid, mesh, state_sh, ref_shardings)
    ema_fn = jax.jit(make_ema_update(), in_shardings=(state_sh, replicated), out_shardings=state_sh,
                     donate_argnums=(0,))
    adv_fn = jax.jit(lambda r, g: losses.group_advantages(r, g, global_std=bool(rl.global_std)))

    # --- prompts, checkpoints (resume), evaluation -------------------------------------------------
    stream = PromptStream(prompts, seed=config.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.ckpt.max_to_keep))
    meta = {"epoch": 0, "data": stream.state(), "method": rl.method, "eval_initial": None, "evals": [],
            "eval_last": None}
    is_main = jax.process_index() == 0
    try:
        if ckpt.resume_step() is not None:
            target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  state_abstract, state_sh)
            state, meta = _resume(ckpt, target, stream, meta)
            if is_main:
                rl_epoch.trim_metrics(os.path.join(workdir, "metrics.jsonl"), meta["epoch"])
            print(f"resumed at epoch {meta['epoch']} (optimizer step {int(state.step)}) from {ckpt.directory}")
        else:
            state = jax.jit(init_state, in_shardings=(ref_shardings,), out_shardings=state_sh)(ref)
        evaluator = Evaluator(config.eval, stack, mesh, weighted=weighted, policy_params=policy_params,
                              workdir=workdir, prompts=eval_base, rules=layout.logical_rules)
        uncond = jax.device_put(stack.uncond(chunk), batch_sh)
    except BaseException:
        ckpt.close()
        raise
    writer = logs.MetricWriter(workdir, enabled=is_main)

    def evaluate(params, tag, step):
        try:
            return evaluator(params, tag=tag, step=step)
        except RewardError as err:
            raise RewardError(f"evaluation ({tag}): {one_line(err)}; {_last_good(ckpt)}") from err

    epochs = int(rl.epochs)
    sigterm = _Sigterm()
    quiet = _DropRewardErrorLogs()
    _CALLBACK_LOGGER.addFilter(quiet)
    bar = logs.progress(epochs, desc=f"{rl.method}{'+normguard' if config.normguard.lam else ''}",
                             initial=min(meta["epoch"], epochs), enabled=is_main)
    say = bar.write if is_main else (lambda *_: None)  # one copy of each report line, from process 0
    try:
        if meta["eval_initial"] is None:
            meta["eval_initial"] = evaluate(state.params, "initial", 0)
            writer.write(0, rl_epoch.scalars(meta["eval_initial"]), prefix="eval/")
            say(rl_epoch.eval_line("initial", meta["eval_initial"]))
        for epoch in range(meta["epoch"], epochs):
            done = epoch + 1
            t0 = time.time()
            epoch_prompts = stream.next_batch(int(rl.prompts_per_epoch))
            prompt_table[:] = epoch_prompts
            cond = jax.device_put(stack.encode(epoch_prompts, repeat=k), batch_sh)
            prompt_ids = np.repeat(np.arange(len(epoch_prompts), dtype=np.int32), k)
            rng = jax.random.fold_in(jax.random.key(config.seed + 7), epoch)
            r_noise, r_sde = jax.random.split(rng)
            noise = jax.random.normal(r_noise, (n_samples,) + tuple(model.sample_shape))
            weighted.clear_error()
            try:
                x0, rewards, parts = rl_epoch.rollouts(rollout_fn, chunk, batch_sh, state, ref, dec_params, noise, cond,
                                               uncond, prompt_ids, r_sde)
                # A failing host callback surfaces here, inside the try (not later, at a fetch).
                jax.block_until_ready((x0, rewards, parts))
            except Exception as err:
                _reset_callbacks(mesh)
                cause = weighted.last_error
                if cause is None and not isinstance(err, RewardError):
                    raise  # not a reward problem: keep jax's own error and traceback
                raise RewardError(f"epoch {done}: {one_line(cause or err)}; {_last_good(ckpt)}") from err
            rewards, parts = sharding.to_host(rewards), sharding.to_host(parts)
            t_roll = time.time() - t0
            advantages = np.asarray(adv_fn(jnp.asarray(rewards), jnp.asarray(prompt_ids)))
            sums: dict = {}
            n_steps = 0
            for batch in rl_epoch.train_batches(config, x0, cond, advantages, rewards, k, epoch):
                state, m = step_fn(state, ref, jax.device_put(batch, batch_sh))
                m = jax.device_get(m)
                if not bool(m["finite"]):
                    raise TrainingError(
                        f"non-finite loss or gradient at epoch {done}, optimizer step {n_steps + 1} of the epoch "
                        f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); the update was not "
                        f"applied; {_last_good(ckpt)}")
                rl_epoch.accumulate(sums, m)
                n_steps += 1
            state = ema_fn(state, jnp.float32(ema_decay(config, int(state.step))))
            record = rl_epoch.epoch_record(sums, n_steps)
            record.update(reward=float(rewards.mean()), reward_std=float(rewards.std()), epoch=done,
                          rollout_s=t_roll, epoch_s=time.time() - t0, optimizer_steps=int(state.step))
            for i, name in enumerate(weighted.names):
                record[f"reward/{name}"] = float(parts[:, i].mean())
            writer.write(done, record, prefix="train/")
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", ratio=f"{record.get('norm_ratio', float('nan')):.3f}")
            meta["epoch"] = done
            meta["data"] = stream.state()
            if done % int(config.eval.every) == 0 or done == epochs:
                result = evaluate(state.params, f"epoch_{done:04d}", done)
                meta["evals"].append({"epoch": done, **rl_epoch.scalars(result)})
                meta["eval_last"] = result
                writer.write(done, rl_epoch.scalars(result), prefix="eval/")
                say(rl_epoch.eval_line(f"epoch {done}", result))
            # SIGTERM on any host stops every host at this same boundary (a collective on multi-host runs).
            stop = sharding.any_process(sigterm.requested)
            if done % int(config.ckpt.every) == 0 or done == epochs or stop:
                ckpt.save(done, state, meta)
            if stop:
                say(f"SIGTERM: checkpoint saved at epoch {done} in {ckpt.directory}; exiting")
                return 0
    finally:
        _CALLBACK_LOGGER.removeFilter(quiet)
        bar.close()
        sigterm.close()
        ckpt.close()  # waits for a pending save
        writer.close()
    summary = {"config": config.name, "method": rl.method, "normguard": config.normguard.to_dict(),
               "rewards": {str(k): float(v) for k, v in config.rewards.weights.items()}, "seed": int(config.seed),
               "epochs": epochs, "eval_initial": meta["eval_initial"], "eval": meta["eval_last"],
               "history": meta["evals"]}
    if stack.is_toy:
        # The final policy as a self-contained bundle (LoRA merged), for the analyses and for sampling.
        bundle = stack.bundle
        policy = sharding.tree_to_host(jax.jit(policy_params)(state.params, ref))
        if is_main:
            save_bundle(os.path.join(workdir, POLICY_DIR),
                        ModelBundle(model_cfg=bundle.model_cfg, text_cfg=bundle.text_cfg, sampling=bundle.sampling,
                                    params={"text": bundle.params["text"], "velocity": policy},
                                    info={"rl_config": config.name, "epochs": epochs, "reference": config.reference or
                                          "shipped", "optimizer_steps": int(state.step)}))
    else:
        # Real models: no merged bundle (a merged SD3.5/FLUX copy would duplicate the base weights, and
        # the analyses read toy bundles only). The trainable tree (LoRA adapters or full float32 weights)
        # is exported with orbax; the base weights stay in model.weights_dir.
        lora = config.lora.to_dict() if config.lora.rank else None
        summary["policy_export"] = export_params(os.path.join(workdir, POLICY_PARAMS_DIR), state.params, {
            "rl_config": config.name, "family": stack.family, "model": config.model.to_dict(),
            "trainable": "lora_adapters" if lora else "full_weights_float32", "lora": lora,
            "optimizer_steps": int(state.step), "use": "policy = lora_merge(base from model.weights_dir, "
            "adapters, alpha, rank) (ng_jax.models.nets.lora); full weights replace the base"})
    if is_main:
        logs.write_json(os.path.join(workdir, "summary.json"), summary)
        print(f"summary: {os.path.join(workdir, 'summary.json')}")
    return 0


POLICY_PARAMS_DIR = "policy_params"  # real models: the trainable tree (orbax) + policy_params.json


def _resume(ckpt: Checkpointer, target, stream, fresh_meta: dict):
    """Restore state and metadata; anything unusable is a CheckpointError (never a silent fresh start)."""
    state, meta, step = ckpt.restore(target)
    missing = sorted(set(fresh_meta) - set(meta) - {"eval_last", "method"})
    if missing:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory}: metadata lacks {missing}")
    if meta.get("method", fresh_meta["method"]) != fresh_meta["method"]:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} was written by rl.method="
                              f"{meta['method']!r}, this run is {fresh_meta['method']!r}")
    if int(meta["epoch"]) != step:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory} records epoch {meta['epoch']}")
    try:
        stream.restore(meta["data"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint step {step} in {ckpt.directory}: cannot restore the prompt stream "
                              f"({one_line(err)}); was it written with other prompts or another seed?") from None
    meta.setdefault("eval_last", None)
    meta["method"] = fresh_meta["method"]
    return state, meta


def _last_good(ckpt: Checkpointer) -> str:
    last = ckpt.latest_step()
    return f"last good checkpoint: epoch {last} in {ckpt.directory}" if last is not None else "no checkpoint yet"


def _reset_callbacks(mesh) -> None:
    """After a failed host callback: replace jax's failed callback tokens (see rewards.host)."""
    try:
        reset_callback_tokens(mesh)
    except Exception:  # noqa: BLE001 - never mask the reward error being reported
        pass


