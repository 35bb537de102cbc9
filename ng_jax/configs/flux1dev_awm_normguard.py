"""AWM + NormGuard on FLUX.1-dev at 512 px with the PickScore reward.

    python -m ng_jax.main --config=ng_jax/configs/flux1dev_awm_normguard.py --workdir=workdirs/flux1dev_awm_normguard \
        --config.model.weights_dir=/data/FLUX.1-dev --config.rewards.pickscore_dir=/data/PickScore_v1 \
        --config.rewards.pickscore_tokenizer_dir=/data/CLIP-ViT-H-14-laion2B-s32B-b79K \
        --config.data.prompt_file=/data/pickapic_train.txt --config.eval.prompt_file=/data/pickapic_test.txt

Validate the weights directory first (reads only headers and config.json; prints a summary and every
missing / unexpected / mis-shaped tensor, exit 0 when it would load strictly):

    python -m ng_jax.tools.check_weights --family flux1_dev --weights_dir /data/FLUX.1-dev
    python -m ng_jax.tools.check_weights --family vae --weights_dir /data/FLUX.1-dev

`--config.model.weights_dir` is required (a local diffusers save of FLUX.1-dev: transformer/, vae/,
text_encoder*/, tokenizer*/; nothing is downloaded); without it the entry point stops with one line.
The base method's settings are the reference implementation's (ng_jax/config/methods.py REAL_METHODS,
docs/ALGORITHMS.md); --config.normguard.lam=0 gives the base method alone.
Model: 512 px (64x64 latents, 1024 packed tokens, FLUX's shift mu = 0.63), distilled guidance 3.5
(model.guidance), no true CFG; bf16 frozen base, float32 LoRA r32 / alpha 64 on
ng_jax.models.nets.flux.FLUX_LORA_TARGETS (attention q/k/v/out of both streams and the feed-forwards of
the double blocks, single-block q/k/v; as Flow-Factory). Mesh: FSDP over every device. Sizes (48
prompts x 24 images per epoch, micro-batches, rollout chunks) assume 8 accelerators of 80 GB; scale
rl.micro_batch / rl.rollout.batch_size with the device count.
Small variants: --config.rl.epochs=..., --config.normguard.lam=..., --config.normguard.margin=...
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.flux1_dev_config("awm", normguard_lam=1.0)
    # AWM (ALGORITHMS.md sec 4; scxue/advantage_weighted_matching config/dgx_awm.py):
    #   rl.rollout.num_steps = 14 Euler steps, CFG 1, from the current policy
    #   rl.num_timesteps = 6 stratified slots over the first 90% of the grid (rl.grid_fraction), shared
    #   by a micro-batch, fresh noise per slot
    #   loss: generalised-Huber log-likelihood surrogate (p 0.25), PPO clip 1, advantages clipped at 5,
    #   beta 1e-4 (reference KL, the PickScore setting), ema_beta 1 (EMA anchor)
    #   EMA policy: d = min(0.3, 0.001 * step) after each epoch (rl.ema)
    # NormGuard (ALGORITHMS.md sec 6): L = L_base + lam * mean(relu(||v|| - (1 + margin) ||v_ref||) / ||v_ref||)
    # name, workdir, the REQUIRED model.weights_dir / rewards.pickscore_dir and lam = 1.0 come from the builder
    c.normguard.margin = 0.0     # hinge starts at ||v|| = ||v_ref||
    c.normguard.power = 1        # 1: hinge, 2: squared hinge
    c.normguard.relative = True  # divide by ||v_ref|| (scale-free)
    return c
