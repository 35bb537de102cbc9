"""Pilot: which toy-world setting makes base RL inflate the velocity norm, as the paper reports for
SD3.5 / FLUX with preference rewards? One AWM run (no NormGuard) per setting, from the shipped reference,
with the preference reward (ng_jax/rewards/preference.py), evaluated CFG-free and guided (CFG 4.5).

    python -m ng_jax.main --config=configs/experiments/pilot.py:RENDER_ROLLOUT --workdir=workdirs/pilot/RENDER_ROLLOUT

RENDER: "clip" (samples clipped to [-1, 1], overshoot earns nothing) or "soft" (soft saturation: overshoot
still brightens the image, as a VAE decoder renders latents past the data range; ng_jax/data/render.py).
ROLLOUT: "free" (CFG-free rollouts, the NFT / AWM references) or "guided" (CFG 4.5 rollouts).
Variants of one run: `:soft_free`, `:soft_guided`, `:clip_free`, `:clip_guided`; add `,lam` for
AWM + NormGuard at the default lambda (e.g. `:soft_free,lam`). The table and its commands: docs/PILOT.md.
"""

import ml_collections as mlc

from ng_jax.config import blocks, methods


def get_config(arg="soft_free"):
    parts = (arg or "soft_free").split(",")
    render, rollout = parts[0].split("_")
    c = methods.rl_config("awm", normguard_lam=1.0 if "lam" in parts else 0.0)
    c.name = "pilot_" + arg.replace(",", "_")
    c.workdir = "workdirs/pilot/" + arg.replace(",", "_")
    c.render = render
    c.rl.rollout.cfg_scale = {"free": 1.0, "guided": 4.5}[rollout]
    c.rewards = blocks.rewards_config({"preference": 1.0})
    c.rl.epochs = 40
    c.optim.lr = 1e-4            # a stronger push than the main job's 3e-5, to see where the policy drifts
    c.eval.every = 10
    c.eval.samples_per_prompt = 4           # 96 images at epochs 10, 20, 30 ...
    c.eval.final_samples_per_prompt = 16    # ... 384 before training and at the end
    c.eval.batch_size = 96
    c.eval.variants = mlc.ConfigDict({"guided": {"cfg_scale": 4.5}})
    c.ckpt.every = 10
    return c
