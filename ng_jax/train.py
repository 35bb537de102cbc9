"""The RL post-training loop (host side).

    python -m ng_jax.main --config=configs/awm_normguard.py --workdir=workdirs/awm_normguard

Per epoch: prompts -> jitted group rollout (K samples per prompt, rewards scored through host
callbacks inside the same jit) -> group-relative advantages -> optimizer steps (the fused
base-loss + NormGuard step of ng_jax.train_step) -> old/EMA update -> periodic evaluation ->
checkpoint. An RL "step boundary" for checkpoints and SIGTERM is the end of an epoch.

Failures stop the run with a clear message and leave the last good checkpoint untouched: a reward
that raises, returns NaN/wrong shapes or times out (RewardError), a non-finite loss (detected in
the step, whose update is then not applied), a corrupt or mismatched checkpoint.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from ng_jax import losses, parallel, reporting
from ng_jax.checkpoint import Checkpointer
from ng_jax.config_checks import ConfigError
from ng_jax.evaluate import Evaluator, build_rewards
from ng_jax.models.bundle import load_bundle
from ng_jax.models.text import EMPTY_PROMPT, make_text_encoder, tokenize
from ng_jax.models.velocity import make_velocity_model
from ng_jax.rewards.host import RewardError, make_reward_fn
from ng_jax.sampling import make_sampler
from ng_jax.state import TrainState, make_optimizer
from ng_jax.train_step import StepSpec, TrainBatch, bucket_centres, make_ema_update, make_train_step, \
    policy_params_fn


class TrainingError(RuntimeError):
    pass


def load_rl_prompts(config) -> list[str]:
    from ng_jax.data.sources import read_prompt_file
    from ng_jax.data.tfds_shapes import load_prompts

    if config.data.get("prompt_file"):
        return read_prompt_file(config.data.prompt_file)
    source = load_prompts(config.data.data_dir, "train")
    return [source[i]["prompt"] if isinstance(source[i]["prompt"], str) else source[i]["prompt"].decode()
            for i in range(len(source))]


def make_step_spec(config, grid: np.ndarray) -> StepSpec:
    rl, ng = config.rl, config.normguard
    return StepSpec(
        method=rl.method, micro_batch=int(rl.micro_batch), num_timesteps=int(rl.num_timesteps),
        grid=tuple(float(s) for s in grid[:-1]), grid_fraction=float(rl.grid_fraction),
        loss_kwargs=dict(config.loss.to_dict()), lam=float(ng.lam), margin=float(ng.margin),
        power=int(ng.power), relative=bool(ng.relative),
        dpo_logit_mean=float(rl.get("dpo_logit_mean", 0.0)), dpo_logit_std=float(rl.get("dpo_logit_std", 1.0)),
        dpo_shift=float(rl.get("dpo_shift", 1.0)))


def ema_decay(config, step: int) -> float:
    """Old/EMA decay after an epoch: min(rate * optimizer_step, max) (DiffusionNFT / AWM schedules)."""
    return float(min(config.rl.ema.rate * step, config.rl.ema.max))


def dpo_pairs(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (winner index, loser index, valid) with valid False when all rewards tie."""
    r = rewards.reshape(-1, group_size)
    base = np.arange(r.shape[0]) * group_size
    return base + r.argmax(1), base + r.argmin(1), r.max(1) > r.min(1)


class _Sigterm:
    def __init__(self):
        self.requested = False
        self._prev = signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.requested = True

    def close(self):
        signal.signal(signal.SIGTERM, self._prev)


def run(config, workdir: str) -> int:
    from ng_jax.data.sources import PromptStream

    os.makedirs(workdir, exist_ok=True)
    rl = config.rl
    mesh = parallel.make_mesh(config.mesh.shape)
    rules = [tuple(r) for r in config.mesh.rules]
    multiple = parallel.batch_size_multiple(mesh)
    k = int(rl.group_size)
    n_samples = int(rl.prompts_per_epoch) * k
    for name, value in (("rl.prompts_per_epoch * rl.group_size", n_samples), ("rl.micro_batch", rl.micro_batch)):
        if value % multiple:
            raise ConfigError(f"{name}={value} must be divisible by the data x fsdp devices ({multiple})")
    if int(rl.train_batch) % int(rl.micro_batch):
        raise ConfigError(f"rl.train_batch={rl.train_batch} must be a multiple of rl.micro_batch={rl.micro_batch}")

    bundle = load_bundle(config.reference or None)
    model = make_velocity_model(bundle.model_cfg)
    text = make_text_encoder(bundle.text_cfg)
    text_params = bundle.params["text"]
    lora_cfg = config.lora if config.lora.rank else None
    replicated = parallel.replicated(mesh)
    ref_shardings = parallel.param_shardings(bundle.params["velocity"], mesh, rules)
    ref = jax.device_put(bundle.params["velocity"], ref_shardings)

    def init_trainable():
        if lora_cfg is None:
            return jax.tree.map(jnp.copy, ref)
        from ng_jax.models.lora import lora_init

        return lora_init(ref, jax.random.key(config.seed + 1), rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                         targets=tuple(lora_cfg.targets))

    optimizer = make_optimizer(config.optim)

    def init_state():
        trainable = init_trainable()
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, ema=trainable,
                          opt_state=optimizer.init(trainable), rng=jax.random.key(config.seed))

    state_sh = parallel.param_shardings(jax.eval_shape(init_state), mesh, rules)
    state = jax.jit(init_state, out_shardings=state_sh)()
    policy_params = policy_params_fn(lora_cfg)
    batch_sh = parallel.batch_sharding(mesh)

    # --- rollout + rewards (host callbacks inside shard_map), one jit -------------------------
    ro = rl.rollout
    sampler = make_sampler(model.apply, num_steps=int(ro.num_steps), shift=float(ro.shift),
                           cfg_scale=float(ro.cfg_scale), sde_noise=float(ro.sde_noise),
                           sde_window=tuple(ro.sde_window))
    weighted = build_rewards(config.rewards)
    prompt_table: list[str] = []
    reward_fn = make_reward_fn(weighted, prompt_table, mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))

    def rollout(trainable, ema, ref_params, noise, cond, uncond, prompt_ids, rng):
        source = ema if ro.policy == "old" else trainable
        out = sampler(policy_params(source, ref_params), noise, cond, uncond, rng)
        total, parts = reward_fn(out.x0, prompt_ids)
        return out.x0, total, parts

    rollout_fn = jax.jit(rollout, in_shardings=(state_sh.params, state_sh.ema, ref_shardings, batch_sh, batch_sh,
                                                batch_sh, batch_sh, replicated),
                         out_shardings=(batch_sh, batch_sh, batch_sh))
    encode_fn = jax.jit(text.encode)
    grid = np.asarray(jax.device_get(sampler_sigmas(ro)))
    spec = make_step_spec(config, grid)
    step_fn = jax.jit(make_train_step(model.apply, optimizer, spec, lora_cfg),
                      in_shardings=(state_sh, ref_shardings, batch_sh), out_shardings=(state_sh, replicated),
                      donate_argnums=(0,))
    ema_fn = jax.jit(make_ema_update(), in_shardings=(state_sh, replicated), out_shardings=state_sh,
                     donate_argnums=(0,))
    adv_fn = jax.jit(lambda r, g: losses.group_advantages(r, g, global_std=bool(rl.global_std)))

    # --- prompts, evaluation, checkpoints --------------------------------------------------------
    prompts = load_rl_prompts(config)
    stream = PromptStream(prompts, seed=config.seed)
    evaluator = Evaluator(config.eval, model, text, text_params, ref, mesh, weighted=weighted,
                          policy_params=policy_params, workdir=workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.ckpt.max_to_keep))
    meta = {"epoch": 0, "data": stream.state(), "eval_initial": None, "evals": []}
    if ckpt.latest_step() is not None:
        state, meta, _ = ckpt.restore(state)
        stream.restore(meta["data"])
        print(f"resumed at epoch {meta['epoch']} (optimizer step {int(state.step)})")
    is_main = jax.process_index() == 0
    writer = reporting.MetricWriter(workdir, enabled=is_main)
    uids, umask = tokenize(text.tokenizer, [EMPTY_PROMPT] * n_samples)
    uncond = jax.device_put(encode_fn(text_params, uids, umask), batch_sh)

    if meta["eval_initial"] is None:
        meta["eval_initial"] = evaluator(state.params, tag="initial", step=0)
        writer.write(0, _scalars(meta["eval_initial"]), prefix="eval/")
        print(_eval_line("initial", meta["eval_initial"]))

    epochs = int(rl.epochs)
    sigterm = _Sigterm()
    bar = reporting.progress(epochs, desc=f"{rl.method}{'+normguard' if config.normguard.lam else ''}",
                             initial=meta["epoch"], enabled=is_main)
    try:
        for epoch in range(meta["epoch"], epochs):
            t0 = time.time()
            epoch_prompts = stream.next_batch(int(rl.prompts_per_epoch))
            prompt_table[:] = epoch_prompts
            ids, mask = tokenize(text.tokenizer, [p for p in epoch_prompts for _ in range(k)])
            cond = jax.device_put(encode_fn(text_params, ids, mask), batch_sh)
            prompt_ids = np.repeat(np.arange(len(epoch_prompts), dtype=np.int32), k)
            rng = jax.random.fold_in(jax.random.key(config.seed + 7), epoch)
            r_noise, r_sde = jax.random.split(rng)
            noise = jax.random.normal(r_noise, (n_samples,) + model.sample_shape)
            try:
                x0, rewards, parts = rollout_fn(state.params, state.ema, ref, jax.device_put(noise, batch_sh), cond,
                                                uncond, jax.device_put(prompt_ids, batch_sh), r_sde)
                rewards = np.asarray(jax.device_get(rewards))
            except Exception as err:
                raise _reward_failure(err, weighted, ckpt) from None
            t_roll = time.time() - t0
            advantages = np.asarray(adv_fn(jnp.asarray(rewards), jnp.asarray(prompt_ids)))
            metrics_sum: dict = {}
            n_steps = 0
            for batch in _train_batches(config, x0, cond, advantages, rewards, k, epoch):
                state, m = step_fn(state, ref, jax.device_put(batch, batch_sh))
                m = jax.device_get(m)
                if not bool(m["finite"]):
                    last = ckpt.latest_step()
                    raise TrainingError(
                        f"non-finite loss or gradient at epoch {epoch} (loss={float(m['loss'])}, grad_norm="
                        f"{float(m['grad_norm'])}); the update was not applied; last good checkpoint: "
                        f"{'epoch ' + str(last) if last is not None else 'none'} in {ckpt.directory}")
                for key, val in m.items():
                    metrics_sum[key] = metrics_sum.get(key, 0) + np.asarray(val, np.float64)
                n_steps += 1
            state = ema_fn(state, jnp.float32(ema_decay(config, int(state.step))))
            record = {key: v / max(n_steps, 1) for key, v in metrics_sum.items() if key not in ("finite",)}
            record.update(reward=float(rewards.mean()), reward_std=float(rewards.std()), epoch=epoch + 1,
                          rollout_s=t_roll, epoch_s=time.time() - t0, optimizer_steps=int(state.step))
            for i, name in enumerate(weighted.names):
                record[f"reward/{name}"] = float(np.asarray(parts)[:, i].mean())
            if "norm_ratio_by_bucket" in record:
                by_bucket = record.pop("norm_ratio_by_bucket")
                counts = record.pop("bucket_count")
                for c, r, n in zip(bucket_centres(), by_bucket, counts):
                    if n > 0:
                        record[f"norm_ratio_sigma_{c:.1f}"] = float(r)
            writer.write(epoch + 1, record, prefix="train/")
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", ratio=f"{record.get('norm_ratio', float('nan')):.3f}")
            meta["epoch"] = epoch + 1
            meta["data"] = stream.state()
            done = epoch + 1
            if done % int(config.eval.every) == 0 or done == epochs:
                result = evaluator(state.params, tag=f"epoch_{done:04d}", step=done)
                meta["evals"].append({"epoch": done, **_scalars(result)})
                writer.write(done, _scalars(result), prefix="eval/")
                bar.write(_eval_line(f"epoch {done}", result))
            if done % int(config.ckpt.every) == 0 or done == epochs or sigterm.requested:
                ckpt.save(done, state, meta)
            if sigterm.requested:
                bar.write(f"SIGTERM: checkpoint saved at epoch {done}; exiting")
                ckpt.wait()
                return 0
    finally:
        bar.close()
        sigterm.close()
        ckpt.wait()
        writer.close()
    final = meta["evals"][-1] if meta["evals"] else None
    final_full = evaluator.last if evaluator.last is not None else final
    summary = {"config": config.name, "method": rl.method, "normguard": config.normguard.to_dict(),
               "epochs": epochs, "eval_initial": meta["eval_initial"], "eval": final_full,
               "history": meta["evals"]}
    if is_main:
        reporting.write_json(os.path.join(workdir, "summary.json"), summary)
        print(f"summary: {os.path.join(workdir, 'summary.json')}")
    return 0


def sampler_sigmas(ro):
    from ng_jax import flow

    return flow.sigma_grid(int(ro.num_steps), shift=float(ro.shift))


def _train_batches(config, x0, cond, advantages, rewards, k, epoch):
    """Split one epoch's rollout into optimizer-step batches (shuffled; DPO: winner/loser pairs)."""
    rl = config.rl
    rng = np.random.default_rng([config.seed, epoch])
    size = int(rl.train_batch)
    for _ in range(int(rl.get("inner_epochs", 1))):
        if rl.method == "dpo":
            w, l, valid = dpo_pairs(rewards, k)
            w, l = w[valid], l[valid]
            order = rng.permutation(len(w))
            usable = (len(order) // size) * size
            for s in range(0, usable, size):
                idx_w, idx_l = w[order[s:s + size]], l[order[s:s + size]]
                yield TrainBatch(x0=x0[idx_w], cond=jax.tree.map(lambda c: c[idx_w], cond),
                                 advantages=jnp.ones(size), x0_l=x0[idx_l])
        else:
            order = rng.permutation(advantages.shape[0])
            for s in range(0, (len(order) // size) * size, size):
                idx = order[s:s + size]
                yield TrainBatch(x0=x0[idx], cond=jax.tree.map(lambda c: c[idx], cond),
                                 advantages=jnp.asarray(advantages[idx]))


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float))}


def _eval_line(tag: str, r: dict) -> str:
    return (f"[eval {tag}] reward={r.get('reward', float('nan')):.4f} norm_ratio={r.get('norm_ratio', float('nan')):.4f} "
            f"fd={r.get('fd', float('nan')):.3f} precision={r.get('precision', float('nan')):.3f} "
            f"recall={r.get('recall', float('nan')):.3f}")


def _reward_failure(err, weighted, ckpt) -> Exception:
    last = ckpt.latest_step()
    where = f"last good checkpoint: epoch {last} in {ckpt.directory}" if last is not None else "no checkpoint yet"
    cause = weighted.last_error if getattr(weighted, "last_error", None) is not None else err
    if isinstance(cause, RewardError) or isinstance(err, RewardError):
        return TrainingError(f"reward failed: {cause}; {where}")
    return TrainingError(f"rollout failed: {type(err).__name__}: {str(err).splitlines()[0][:500]}; {where}")
