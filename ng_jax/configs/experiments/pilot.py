"""Pilot: which toy-world setting makes base RL inflate the velocity norm, as the paper reports for
SD3.5 / FLUX with preference rewards? One AWM run (no NormGuard) per setting, from the shipped reference,
with the preference reward (ng_jax/rewards/preference.py), evaluated CFG-free and guided (CFG 4.5).

    python -m ng_jax.main --config=ng_jax/configs/experiments/pilot.py:RENDER_ROLLOUT --workdir=workdirs/pilot/RENDER_ROLLOUT

RENDER: "clip" (samples clipped to [-1, 1], overshoot earns nothing), "soft" (soft saturation: overshoot
still brightens the image a little) or "headroom" (the data fill 70% of the display range, so overshoot renders
more saturated than any training image, as latents past the data range decode; ng_jax/data/render.py).
ROLLOUT: "free" (CFG-free rollouts, the NFT / AWM references) or "guided" (CFG 4.5 rollouts).
Variants of one run: `:soft_free`, `:soft_guided`, `:clip_free`, `:headroom_free`, ...; add `,centred` to
sample in the centred space (images minus the data mean, as SD3 / FLUX centre their latents; the same
model and images, the norm measured from the data mean), `,lam` for AWM + NormGuard at lambda 1, `,lr=3e-5` / `,epochs=30` to change the push (e.g. `:headroom_free,lr=3e-5,epochs=30`). The table and its commands: docs/PILOT.md.
"""

import ml_collections as mlc

from ng_jax.config import blocks, methods


def get_config(arg=None):
    arg = arg or "soft_free"
    parts = arg.split(",")
    lr = next((float(p[3:]) for p in parts if p.startswith("lr=")), 1e-4)
    epochs = next((int(p[7:]) for p in parts if p.startswith("epochs=")), 40)
    render, rollout = parts[0].split("_")
    c = methods.rl_config("awm", normguard_lam=1.0 if "lam" in parts else 0.0)
    tag = arg.replace(",", "_").replace("=", "")
    c.name = "pilot_" + tag
    c.workdir = "workdirs/pilot/" + tag
    c.render = render
    c.space = "centred" if "centred" in parts else "pixel"
    c.rl.rollout.cfg_scale = {"free": 1.0, "guided": 4.5}[rollout]
    c.rewards = blocks.rewards_config({"preference": 1.0})
    c.rl.epochs = epochs         # `,epochs=N`
    c.optim.lr = lr              # `,lr=X`; default 1e-4, a stronger push than the main job's 3e-5
    c.eval.every = 10
    c.eval.samples_per_prompt = 4           # 96 images at epochs 10, 20, 30 ...
    c.eval.final_samples_per_prompt = 16    # ... 384 before training and at the end
    c.eval.batch_size = 96
    c.eval.variants = mlc.ConfigDict({"guided": {"cfg_scale": 4.5}})
    c.ckpt.every = 10
    return c
