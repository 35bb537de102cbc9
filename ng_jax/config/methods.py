"""The job configs of RL runs, assembled from `ng_jax.config.blocks`: the shapes world's (one per
method; ng_jax/configs/{nft,awm,dpo}[_normguard].py) and the real models' (SD3.5-Medium, FLUX.1-dev from a
local diffusers directory; ng_jax/configs/sd35m_*.py, ng_jax/configs/flux1dev_*.py).

Config files call these builders and change only what differs, so `ng_jax/configs/awm.py` and
`ng_jax/configs/awm_normguard.py` differ in the `normguard` block alone. Why the toy world's values are
what they are, with the measurements: docs/DEFAULTS.md.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc

from ng_jax import flow
from ng_jax.config import blocks
from ng_jax.models.nets.flux import FLUX_LORA_TARGETS

# The job configs ship inside the package (ng_jax/configs), so an installed ng_jax finds them too (`ng-jax --config=awm_normguard.py` resolves there; main.resolve_config).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_DATA_DIR = blocks.DEFAULT_DATA_DIR


def load_config_file(name: str, arg=None) -> mlc.ConfigDict:
    """`get_config(arg)` of ng_jax/configs/NAME, for config files that build on another one."""
    path = os.path.join(CONFIG_DIR, name)
    spec = importlib.util.spec_from_file_location(f"ng_config_{os.path.basename(name)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# --- RL post-training on the toy world -------------------------------------------------------------

# Per-method settings, scaled down for 2 CPU cores from the reference implementations' SD3.5 defaults
# (docs/ALGORITHMS.md secs 3-5): rollout steps, training timesteps per sample, grid fraction, rollout
# policy, old/EMA max decay, learning rate, base-loss keyword arguments.
METHODS = {
    # DiffusionNFT: 10-step deterministic rollouts from the old policy; each sample trained at a random
    # order of the grid (reference: ~99% of the 10 timesteps; here 3 of them to fit the CPU budget).
    "nft": dict(num_steps=10, num_timesteps=3, grid_fraction=0.99, policy="old", ema_max=0.5, lr=1e-4,
                loss=dict(beta=1.0, kl_beta=1e-4, adv_clip=5.0)),
    # AWM: 14-step rollouts in the reference (10 here); T=6 stratified slots over the first 90% of the
    # grid in the reference (3 here), shared by the micro-batch; lr 3e-5 (docs/DEFAULTS.md).
    "awm": dict(num_steps=10, num_timesteps=3, grid_fraction=0.9, policy="current", ema_max=0.3, lr=3e-5,
                loss=dict(beta=1e-4, ema_beta=1.0, p=0.25, clip_range=1.0, adv_clip=5.0)),
    # Flow-DPO: winner/loser = argmax/argmin reward of each group, logit-normal sigma shared by the pair.
    "dpo": dict(num_steps=10, num_timesteps=2, grid_fraction=1.0, policy="current", ema_max=0.0, lr=3e-5,
                loss=dict(beta=100.0)),
}

TOY_LORA_TARGETS = ("attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",)


def rl_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """The shapes world's RL config; `ng_jax/configs/{method}[_normguard].py` call this."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    m, dpo = METHODS[method], method == "dpo"
    c = mlc.ConfigDict()
    c.job = "rl"
    c.name = method + ("_normguard" if normguard_lam else "")
    c.seed = 0
    c.workdir = "workdirs/" + c.name
    c.reference = ""        # model bundle directory; "" = the shipped reference (ng_jax/assets/reference)
    # How samples become images for the rewards and judges: "clip" to [-1, 1], or "soft" saturation, where
    # overshooting the data range still brightens the image as a VAE decoder would (ng_jax/data/render.py)
    c.render = "clip"
    # The sample space: "pixel" (samples are the images) or "centred" (samples are the images minus the
    # data mean, as SD3 / FLUX centre their latents; the same model and images, the norm measured from the
    # data mean; ng_jax/data/render.py)
    c.space = "pixel"
    c.data = blocks.data_config()
    c.mesh = blocks.mesh_config()
    # 20 epochs: the evaluation reward peaks early and then drifts (docs/DEFAULTS.md). Two optimizer steps
    # per epoch; DPO's 8 pairs per epoch (one per prompt) make one step of 8.
    c.rl = blocks.rl_block(method, epochs=20, prompts_per_epoch=8, group_size=8, train_batch=8 if dpo else 32,
                           micro_batch=8 if dpo else 16, num_timesteps=m["num_timesteps"],
                           grid_fraction=m["grid_fraction"], num_steps=m["num_steps"], shift=1.0,
                           cfg_scale=1.0, policy=m["policy"], ema_max=m["ema_max"])
    c.loss = mlc.ConfigDict(m["loss"])  # keyword arguments of the base loss (ng_jax.losses)
    c.normguard = blocks.normguard_config(normguard_lam)
    c.rewards = blocks.rewards_config({"verifier": 1.0})
    c.lora = blocks.lora_config(rank=0, alpha=16.0, targets=TOY_LORA_TARGETS)
    c.optim = blocks.optim_config(lr=m["lr"])
    # 24 fixed prompts (4 per category) x 4 samples, 20 Euler steps, CFG-free: the distribution the RL
    # objective trains (docs/DEFAULTS.md on the sample count).
    c.eval = blocks.eval_config(every=5, num_prompts=24, samples_per_prompt=4, batch_size=48, num_steps=20,
                                shift=1.0, cfg_scale=1.0, quality=True, grid_size=32)
    c.ckpt = blocks.ckpt_config(every=10, max_to_keep=2)
    c.logging = blocks.logging_config()
    return c


# --- RL post-training of real models (SD3.5-Medium, FLUX.1-dev) from a local diffusers directory ------

# LoRA targets for SD3 / SD3.5: q/k/v/out of the joint attention's image and text streams, as the
# DiffusionNFT / flow_grpo / AWM SD3 configs (PEFT target_modules "attn.to_q" ... "attn.to_add_out";
# the MMDiT-X second attention "attn2" is not matched by those names, so it is not adapted here either).
SD3_LORA_TARGETS = (r"(^|/)attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",)

# Per-method settings of the reference implementations (docs/ALGORITHMS.md secs 3-5), unscaled.
REAL_METHODS = {
    # DiffusionNFT (NVlabs/DiffusionNFT config/nft.py, SD3.5-M): 10-step deterministic CFG-free rollouts from
    # the old policy; every sample trained at int(0.99 * 10) = 9 grid timesteps in a random order.
    "nft": dict(num_steps=10, num_timesteps=9, grid_fraction=0.99, policy="old", ema_max=0.5, cfg=1.0,
                lr=3e-4, loss=dict(beta=1.0, kl_beta=1e-4, adv_clip=5.0)),
    # AWM (scxue/advantage_weighted_matching config/dgx_awm.py): 14-step CFG-1 rollouts from the current
    # policy; T = 6 stratified slots over the first 90% of the grid; beta 1e-4 (PickScore), EMA anchor 1.
    "awm": dict(num_steps=14, num_timesteps=6, grid_fraction=0.9, policy="current", ema_max=0.3, cfg=1.0,
                lr=3e-4, loss=dict(beta=1e-4, ema_beta=1.0, p=0.25, clip_range=1.0, adv_clip=5.0)),
    # Flow-DPO (yifan123/flow_grpo config/dpo.py): pairs from 10-step rollouts with the SD3 pipeline's
    # CFG 4.5; one logit-normal sigma per pair and optimizer step; beta 100, lr 1e-5.
    "dpo": dict(num_steps=10, num_timesteps=1, grid_fraction=1.0, policy="current", ema_max=0.0, cfg=4.5,
                lr=1e-5, loss=dict(beta=100.0)),
}


def real_rl_config(method: str, family: str, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """A real-model RL run at 512 px with the PickScore reward, the reference implementations' settings."""
    if method not in REAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(REAL_METHODS)}")
    m, flux, dpo = REAL_METHODS[method], family == "flux1_dev", method == "dpo"
    c = mlc.ConfigDict()
    c.job = "rl"
    c.name = f"{'flux1dev' if flux else 'sd35m'}_{method}" + ("_normguard" if normguard_lam else "")
    c.seed = 0
    c.workdir = "workdirs/" + c.name
    c.reference = ""             # unused: the reference is model.weights_dir's transformer
    c.render = "clip"            # the VAE decodes; its images are clipped to [-1, 1]
    c.space = "pixel"            # samples are the VAE's (centred, scaled) latents
    c.model = blocks.real_model_config(family)
    # Prompts: a .txt/.jsonl file of free-form prompts (the PickScore references train on Pick-a-Pic
    # prompts); "" falls back on the shapes world's TFDS prompts (compositional, GenEval-like).
    c.data = blocks.data_config()
    # FSDP over every device: the batch and every weight matrix's embed dimension split over "fsdp"
    # (mesh.logical_rules' defaults); (1, -1, T) adds T-way tensor parallelism over heads / MLP.
    c.mesh = blocks.mesh_config()
    c.mesh.shape = (1, -1, 1)
    shift = 3.0                  # SD3.5-Medium's grid shift (FLUX uses `mu` instead, below)
    # 48 prompts x 24 images per epoch (flow_grpo / DiffusionNFT); 2 optimizer steps per epoch (flow_grpo's
    # gradient_accumulation_steps = num_batches_per_epoch // 2); micro-batches of 4 samples per device on 8
    # devices for SD3.5-M, 2 for FLUX (12B); rollouts in calls of 8 / 4 per device (sampler + VAE decode).
    c.rl = blocks.rl_block(method, epochs=300, prompts_per_epoch=48, group_size=24, train_batch=24 if dpo else 576,
                           micro_batch=8 if dpo else (16 if flux else 32), num_timesteps=m["num_timesteps"],
                           grid_fraction=m["grid_fraction"], num_steps=m["num_steps"], shift=shift,
                           cfg_scale=m["cfg"], policy=m["policy"], ema_max=m["ema_max"],
                           # DPO sigmas shifted as the model's training grid (diffusers' SD3 training scripts
                           # index the shift-3 scheduler with logit-normal draws); FLUX: unshifted
                           dpo_shift=1.0 if flux else 3.0, rollout_batch_size=32 if flux else 64)
    ro = c.rl.rollout
    if flux:
        # FLUX's resolution-dependent shift: mu for (512 / 16)^2 = 1024 packed image tokens (FluxPipeline).
        ro.mu = float(flow.flux_mu((c.model.resolution // 16) ** 2))
    else:
        # The SD3 pipeline's default grid (set_timesteps(N)): the linspace ends at the shifted smallest
        # training sigma, as the references' rollouts.
        ro.s_min = float(flow.shift_sigmas(1.0 / 1000, shift))
    c.loss = mlc.ConfigDict(m["loss"])
    c.normguard = blocks.normguard_config(normguard_lam)
    c.rewards = blocks.rewards_config({"pickscore": 1.0})
    c.rewards.timeout_s = 600.0  # PickScore (ViT-H/14) on a whole epoch's images
    # LoRA r = 32, alpha = 64 (all three references); FLUX: Flow-Factory's adapter targets
    c.lora = blocks.lora_config(rank=32, alpha=64.0, targets=FLUX_LORA_TARGETS if flux else SD3_LORA_TARGETS)
    c.optim = blocks.optim_config(lr=m["lr"])  # AdamW: NFT / AWM 3e-4, DPO 1e-5; grad clip 1
    c.optim.weight_decay = 1e-4              # flow_grpo's adam_weight_decay
    # FluxPipeline's default / the references' evaluation steps; the rollouts' guidance; the shapes world's
    # judges (FD, precision / recall, verifier accuracy) off
    c.eval = blocks.eval_config(every=10, num_prompts=32, samples_per_prompt=2, batch_size=32,
                                num_steps=28 if flux else 40, shift=shift, cfg_scale=m["cfg"], quality=False,
                                grid_size=16)
    if flux:
        c.eval.mu = ro.mu
    else:
        c.eval.s_min = ro.s_min
    c.ckpt = blocks.ckpt_config(every=10, max_to_keep=2)
    c.logging = blocks.logging_config()
    return c


def sd35_medium_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """SD3.5-Medium (diffusers stabilityai/stable-diffusion-3.5-medium saved locally) at 512 px, PickScore."""
    return real_rl_config(method, "sd35", normguard_lam)


def flux1_dev_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """FLUX.1-dev (black-forest-labs/FLUX.1-dev saved locally) at 512 px, guidance 3.5, PickScore."""
    return real_rl_config(method, "flux1_dev", normguard_lam)
