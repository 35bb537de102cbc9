"""DiffusionNFT + NormGuard on SD3.5-Medium at 512 px with the PickScore reward.

    python -m ng_jax.main --config=ng_jax/configs/sd35m_nft_normguard.py --workdir=workdirs/sd35m_nft_normguard \
        --config.model.weights_dir=/data/stable-diffusion-3.5-medium --config.rewards.pickscore_dir=/data/PickScore_v1 \
        --config.rewards.pickscore_tokenizer_dir=/data/CLIP-ViT-H-14-laion2B-s32B-b79K \
        --config.data.prompt_file=/data/pickapic_train.txt --config.eval.prompt_file=/data/pickapic_test.txt

Validate the weights directory first (reads only headers and config.json; prints a summary and every
missing / unexpected / mis-shaped tensor, exit 0 when it would load strictly):

    python -m ng_jax.tools.check_weights --family sd35 --weights_dir /data/stable-diffusion-3.5-medium
    python -m ng_jax.tools.check_weights --family vae --weights_dir /data/stable-diffusion-3.5-medium

`--config.model.weights_dir` is required (a local diffusers save of SD3.5-Medium: transformer/, vae/,
text_encoder*/, tokenizer*/; nothing is downloaded); without it the entry point stops with one line.
The base method's settings are the reference implementation's (ng_jax/config/methods.py REAL_METHODS,
docs/ALGORITHMS.md); --config.normguard.lam=0 gives the base method alone.
Model: 512 px (64x64 latents, 1024 image tokens), sigma-grid shift 3; bf16 frozen base, float32 LoRA
r32 / alpha 64 on q/k/v/out of both attention streams (methods.SD3_LORA_TARGETS). Mesh: FSDP
over every device. Sizes (48 prompts x 24 images per epoch, micro-batches, rollout chunks) assume 8
accelerators of 80 GB; scale rl.micro_batch / rl.rollout.batch_size with the device count.
Small variants: --config.rl.epochs=..., --config.normguard.lam=..., --config.normguard.margin=...
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.sd35_medium_config("nft", normguard_lam=1.0)
    # DiffusionNFT (ALGORITHMS.md sec 3; NVlabs/DiffusionNFT config/nft.py):
    #   rl.rollout.num_steps = 10 deterministic Euler steps, CFG-free (rl.rollout.cfg_scale = 1), from the old policy
    #   rl.num_timesteps = 9 of them per sample (int(0.99 * 10)), random order, fresh noise per timestep
    #   loss: beta 1 (implicit positive/negative policies), kl_beta 1e-4, advantages clipped at 5
    #   old policy: old <- d old + (1 - d) theta after each epoch, d = min(0.001 * step, 0.5) (rl.ema)
    # NormGuard (ALGORITHMS.md sec 6): L = L_base + lam * mean(relu(||v|| - (1 + margin) ||v_ref||) / ||v_ref||)
    # name, workdir, the REQUIRED model.weights_dir / rewards.pickscore_dir and lam = 1.0 come from the builder
    c.normguard.margin = 0.0     # hinge starts at ||v|| = ||v_ref||
    c.normguard.power = 1        # 1: hinge, 2: squared hinge
    c.normguard.relative = True  # divide by ||v_ref|| (scale-free)
    return c
