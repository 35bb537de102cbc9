"""What a finished RL run leaves behind: the final policy and `summary.json`.

Toy world: the policy as a self-contained model bundle (LoRA merged) in `WORKDIR/policy/`, which the
analyses and the evaluate job read. Real models: the trainable tree (LoRA adapters or full float32
weights) saved with orbax in `WORKDIR/policy_params/` with `policy_params.json` saying how to use it;
the base weights stay in `model.weights_dir` (a merged SD3.5 / FLUX copy would duplicate them).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ng_jax import logs, sharding, storage
from ng_jax.checkpoint import export_params
from ng_jax.errors import UserError, one_line
from ng_jax.eval.analysis.checkpoints import POLICY_DIR
from ng_jax.models.bundle import ModelBundle, save_bundle

POLICY_PARAMS_DIR = "policy_params"  # real models: the trainable tree (orbax) + policy_params.json


def export_run(config, workdir: str, stack, state, policy_params, meta) -> dict:
    """Writes the final policy and `summary.json` (evaluation before and after, history); returns the
    summary. Every process must call it (the real-model export is a collective save)."""
    is_main = jax.process_index() == 0
    summary = {"config": config.name, "method": config.rl.method, "normguard": config.normguard.to_dict(),
               "rewards": {str(k): float(v) for k, v in config.rewards.weights.items()}, "seed": int(config.seed),
               "epochs": int(config.rl.epochs), "eval_initial": meta.eval_initial, "eval": meta.eval_last,
               "history": meta.evals, "wall_s": meta.seconds,
               "finished_at": time.time()}  # unix time: with wall_s, when the run trained (the grid's wall clock)
    if stack.is_toy:
        bundle = stack.bundle
        policy = sharding.tree_to_host(jax.jit(policy_params)(state.params, stack.ref))
        if is_main:
            save_bundle(os.path.join(workdir, POLICY_DIR),
                        ModelBundle(model_cfg=bundle.model_cfg, text_cfg=bundle.text_cfg, sampling=bundle.sampling,
                                    params={"text": bundle.params["text"], "velocity": policy},
                                    info={"rl_config": config.name, "epochs": int(config.rl.epochs),
                                          "reference": config.reference or "shipped",
                                          "optimizer_steps": int(state.step)}))
    else:
        lora = config.lora.to_dict() if config.lora.rank else None
        summary["policy_export"] = export_params(os.path.join(workdir, POLICY_PARAMS_DIR), state.params, {
            "rl_config": config.name, "family": stack.family, "model": config.model.to_dict(),
            "trainable": "lora_adapters" if lora else "full_weights_float32", "lora": lora,
            "optimizer_steps": int(state.step), "use": "policy = lora_merge(base from model.weights_dir, "
            "adapters, alpha, rank) (ng_jax.models.nets.lora); full weights replace the base"})
    if is_main:
        logs.write_json(os.path.join(workdir, "summary.json"), summary)
        print(f"summary: {os.path.join(workdir, 'summary.json')}")
    return summary


class ExportError(UserError, RuntimeError):
    pass


def read_policy(workdir: str) -> tuple[dict, dict]:
    """(policy_params.json, the trainable tree as numpy) of a finished real-model run."""
    directory = os.path.join(workdir, POLICY_PARAMS_DIR)
    note_path = os.path.join(directory, POLICY_PARAMS_DIR + ".json")
    if not storage.is_file(note_path):
        if storage.path(os.path.join(workdir, POLICY_DIR)).is_dir():
            raise ExportError(f"{workdir} is a toy-world run: its policy is the model bundle {workdir}/{POLICY_DIR} "
                              "already (load it with ng_jax.models.bundle.load_bundle); nothing to convert")
        raise ExportError(f"{workdir}: no {POLICY_PARAMS_DIR}/{POLICY_PARAMS_DIR}.json (not a finished RL run on a "
                          "real model)")
    note = json.loads(storage.path(note_path).read_text())
    try:
        tree = ocp.StandardCheckpointer().restore(storage.canonical(os.path.join(directory, "params")))
    except Exception as err:  # noqa: BLE001 - orbax raises many types
        raise ExportError(f"{directory}/params: cannot read the trained parameters ({one_line(err)})") from None
    return note, jax.tree.map(np.asarray, tree)
