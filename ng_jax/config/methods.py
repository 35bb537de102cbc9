"""Shared pieces of the config files in configs/ (one base for the toy world).

Every knob is documented where it is set. Config files call these builders and change only what
differs, so `configs/awm.py` and `configs/awm_normguard.py` differ in the `normguard` block alone.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def load_config_file(name: str, arg=None) -> mlc.ConfigDict:
    """`get_config(arg)` of configs/NAME, for config files that build on another one."""
    path = os.path.join(CONFIG_DIR, name)
    spec = importlib.util.spec_from_file_location(f"ng_config_{os.path.basename(name)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

# Toy-world reference and data locations (relative to the repository root).
DEFAULT_DATA_DIR = "workdirs/tfds"


def mesh_config() -> mlc.ConfigDict:
    """Mesh and partitioning (ng_jax.sharding; README "Meshes and partitioning")."""
    from ng_jax.sharding import LOGICAL_RULES

    m = mlc.ConfigDict()
    m.shape = (-1, 1, 1)  # devices along (data, fsdp, tensor); one -1 takes the remaining devices
    # THE rule table: (logical axis name, mesh axis | tuple of mesh axes | None), flax's
    # logical_axis_rules format. Parameters carry logical names from their path and rank
    # (ng_jax.sharding.PARAM_AXES: "embed" model width, "heads" attention projections, "kv" per-head
    # dim, "mlp" feed-forward hidden, "mod" adaLN modulation outputs, "vocab", "channels" latent/text
    # input features, "layers" scanned-block axis, "lora" adapter rank); activations at block boundaries
    # ("batch", "seq", "embed", "heads", "kv", "mlp"). Rules apply in table order: a rule takes the first
    # dimension of its name whose size its mesh axes divide and whose axes this tensor does not use yet
    # (size-1 axes are dropped); a second rule for a name is a fallback; names without a rule, or that no
    # rule divides, are not sharded. The default: batch over (data, fsdp), embed over fsdp (FSDP),
    # heads/mlp/mod/vocab over tensor, else over fsdp.
    m.logical_rules = LOGICAL_RULES
    # The frozen reference's (and text encoders') table; None = logical_rules. E.g. shard the reference
    # over (fsdp, tensor) while the policy keeps tensor for activations: (("embed", ("fsdp", "tensor")), ...).
    m.ref_logical_rules = None
    # Overrides checked before the table: (regex on '/'-joined parameter path, rule), first match wins.
    # "fsdp" shards the largest dimension divisible by the fsdp axis; "replicate"; or an explicit spec
    # tuple such as ("fsdp", None). Empty: the logical table places everything.
    m.rules = ()
    # Fail the run when more than this fraction of parameter bytes would be replicated on every device
    # of a mesh with fsdp or tensor > 1 (checked at start-up for the trainable state and the reference).
    m.max_replicated_fraction = 0.1
    return m


def toy_model_config() -> mlc.ConfigDict:
    """The toy MMDiT (SD3-style) used by the shapes world: ~2.5M parameters at these settings."""
    c = mlc.ConfigDict()
    c.family = "toy_mmdit"
    c.image_size = 32       # pixels; the toy world works in pixel space (no VAE)
    c.in_channels = 3
    c.patch_size = 4        # 8x8 = 64 image tokens
    c.hidden_size = 128
    c.depth = 4             # joint MMDiT blocks (the last is context-pre-only, as in SD3)
    c.num_heads = 4
    c.mlp_ratio = 4.0
    c.qk_norm = ""          # "" (SD3) or "rms_norm" (SD3.5: RMS-normalised queries and keys)
    c.context_dim = 64      # = text.width: per-token text embedding size
    c.pooled_dim = 64       # = text.pooled_dim
    c.dtype = "float32"     # compute dtype ("bfloat16" on accelerators); parameters stay float32
    c.remat = False         # rematerialise blocks in the backward pass (saves memory, costs compute)
    return c


def toy_text_config() -> mlc.ConfigDict:
    """The toy text encoder: per-token embeddings + pooled embedding, like SD3's CLIP/T5 stack."""
    c = mlc.ConfigDict()
    c.width = 64
    c.depth = 2
    c.heads = 4
    c.max_length = 16       # tokens incl. bos/eos; longer prompts are truncated
    c.pooled_dim = 64
    return c


def sample_config() -> mlc.ConfigDict:
    """Sampling defaults (stored in the reference bundle; evaluation uses them unless overridden)."""
    c = mlc.ConfigDict()
    c.num_steps = 20        # Euler steps
    c.shift = 1.0           # SD3-style sigma-grid shift (SD3.5-Medium uses 3)
    c.cfg_scale = 3.0       # classifier-free guidance weight w in v_u + w (v_c - v_u)
    return c


def optim_config(lr: float) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.lr = lr               # AdamW peak learning rate
    c.warmup_steps = 0      # linear warmup from 0
    c.schedule = "constant"  # "constant" or "cosine" (then decay_steps and end_lr_frac apply)
    c.decay_steps = 1
    c.end_lr_frac = 0.1
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.grad_clip = 1.0       # global-norm clipping (0 disables)
    return c


# --- RL post-training on the toy world -------------------------------------------------------------

# Per-method settings, scaled down for 2 CPU cores from the reference implementations' SD3.5 defaults
# (ALGORITHMS.md sections 3-5). Each entry: (rollout steps, training timesteps per sample, grid
# fraction, rollout policy, old/EMA max decay, learning rate, base-loss keyword arguments).
METHODS = {
    # DiffusionNFT: 10-step deterministic rollouts from the old policy; each sample trained at a random
    # order of the grid (reference: ~99% of the 10 timesteps; here 3 of them to fit the CPU budget).
    "nft": dict(num_steps=10, num_timesteps=3, grid_fraction=0.99, policy="old", ema_max=0.5, lr=1e-4,
                loss=dict(beta=1.0, kl_beta=1e-4, adv_clip=5.0)),
    # AWM: 14-step rollouts in the reference (10 here); T=6 stratified slots over the first 90% of the
    # grid in the reference (3 here), shared by the micro-batch.
    # lr 3e-5: at 1e-4 (the 2.5M-parameter toy model, full fine-tuning) the evaluation reward swung
    # 0.392 -> 0.448 -> 0.357 -> 0.375 over 80 epochs and FD doubled; 3e-5 rose steadily to 0.475.
    "awm": dict(num_steps=10, num_timesteps=3, grid_fraction=0.9, policy="current", ema_max=0.3, lr=3e-5,
                loss=dict(beta=1e-4, ema_beta=1.0, p=0.25, clip_range=1.0, adv_clip=5.0)),
    # Flow-DPO: winner/loser = argmax/argmin reward of each group, logit-normal sigma shared by the pair.
    "dpo": dict(num_steps=10, num_timesteps=2, grid_fraction=1.0, policy="current", ema_max=0.0, lr=3e-5,
                loss=dict(beta=100.0)),
}


def normguard_config(lam: float = 0.0) -> mlc.ConfigDict:
    """NormGuard: L = L_base + lam * mean(relu(||v|| - (1 + margin) ||v_ref||) ** power [/ ||v_ref|| ** power])."""
    c = mlc.ConfigDict()
    c.lam = lam             # hinge weight; 0 turns NormGuard off (adds exactly nothing)
    c.margin = 0.0          # tolerated relative excess of ||v|| over ||v_ref|| before the hinge acts
    c.power = 1             # 1 (hinge) or 2 (squared hinge)
    c.relative = True       # divide by ||v_ref|| ** power (scale-free penalty)
    return c


def rl_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """The shared toy-world RL config; `configs/{method}[_normguard].py` call this."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    m = METHODS[method]
    c = mlc.ConfigDict()
    c.job = "rl"
    c.name = method + ("_normguard" if normguard_lam else "")
    c.seed = 0
    c.workdir = "workdirs/" + c.name
    c.reference = ""        # model bundle directory; "" = the shipped reference (ng_jax/assets/reference)

    c.data = mlc.ConfigDict()
    c.data.data_dir = DEFAULT_DATA_DIR
    c.data.prompt_file = ""  # a .txt (one prompt per line) or .jsonl ({"prompt": ...}) file; "" = TFDS train split
    c.data.balance_categories = True  # TFDS train split: draw every prompt category equally often

    c.mesh = mesh_config()

    c.rl = mlc.ConfigDict()
    c.rl.method = method
    # Rollout -> train cycles. On the shapes world the evaluation reward peaks early and then drifts:
    # AWM + NormGuard at lr 3e-5 measured 0.392 -> 0.425..0.453 after 20 epochs in all four runs tried
    # (seeds, batch sizes), 0.381..0.475 after 80 (README, "What the main command does").
    c.rl.epochs = 20
    c.rl.prompts_per_epoch = 8  # distinct prompts per epoch
    c.rl.group_size = 8         # samples per prompt (K); advantages are group-relative
    c.rl.global_std = False     # normalise advantages by the std of all rewards of the epoch
    # Samples per optimizer step (2 steps per epoch); DPO counts winner/loser pairs, one per prompt, so
    # its 8 pairs per epoch make one step of 8 (each pair is two forwards).
    c.rl.train_batch = 8 if method == "dpo" else 32
    c.rl.micro_batch = 8 if method == "dpo" else 16  # gradient-accumulation chunk inside the jitted step
    c.rl.inner_epochs = 1       # passes over each epoch's rollouts
    c.rl.num_timesteps = m["num_timesteps"]  # training timesteps per sample (pair) per optimizer step
    c.rl.grid_fraction = m["grid_fraction"]  # fraction of the rollout grid the timestep schemes draw from
    c.rl.dpo_logit_mean = 0.0   # DPO timestep sampling: logit-normal(mean, std), then shifted
    c.rl.dpo_logit_std = 1.0
    c.rl.dpo_shift = 1.0
    c.rl.rollout = mlc.ConfigDict()
    c.rl.rollout.num_steps = m["num_steps"]
    c.rl.rollout.shift = 1.0
    # Guidance in rollouts. 1 = CFG-free, as the NFT and AWM reference implementations: training fits
    # the conditional velocity, so guided rollouts would teach it the guided (over-sharpened) samples,
    # which guidance then amplifies again at evaluation. Measured with the earlier 2500-step reference and
    # configs/awm.py: CFG-3 rollouts + evaluation left the eval reward flat (0.384 -> 0.363 in 40 epochs),
    # CFG-free ones raised it (0.319 -> 0.458 in 10 epochs).
    c.rl.rollout.cfg_scale = 1.0
    c.rl.rollout.sde_noise = 0.0     # Flow-SDE noise level a (0 = deterministic Euler)
    c.rl.rollout.sde_window = (0.3, 0.9)  # sigmas where SDE noise is injected
    c.rl.rollout.policy = m["policy"]     # "old" (the EMA/old policy, NFT) or "current"
    c.rl.ema = mlc.ConfigDict()
    c.rl.ema.rate = 0.001       # old/EMA decay after each epoch: min(rate * optimizer_step, max)
    c.rl.ema.max = m["ema_max"]

    c.loss = mlc.ConfigDict(m["loss"])  # keyword arguments of the base loss (ng_jax.losses)
    c.normguard = normguard_config(normguard_lam)

    c.rewards = mlc.ConfigDict()
    c.rewards.weights = mlc.ConfigDict({"verifier": 1.0})  # name -> weight; names: ng_jax.eval.evaluate.REWARD_NAMES
    c.rewards.timeout_s = 120.0  # a reward call slower than this stops the run (0 = no limit)
    c.rewards.retries = 0        # retries of a failing reward call before giving up
    c.rewards.remote_url = ""    # for the "remote" reward: http://host:port/ of a reward server
    # Real reward models from local weights (ng_jax.rewards.clip): transformers CLIPModel directories.
    c.rewards.clip_score_dir = ""         # e.g. openai/clip-vit-large-patch14 saved locally
    c.rewards.pickscore_dir = ""          # yuvalkirstain/PickScore_v1 saved locally
    c.rewards.pickscore_tokenizer_dir = ""  # its tokenizer (laion CLIP-ViT-H-14); "" = from pickscore_dir
    c.rewards.hpsv2_dir = ""              # `python -m ng_jax.rewards.open_clip_convert HPS_v2_compressed.pt --out DIR` output
    c.rewards.clip_backend = "auto"       # "torch" (if installed) or "numpy" (never JAX: host callbacks)
    c.rewards.clip_device = "cpu"         # torch device for the CLIP rewards

    c.lora = mlc.ConfigDict()
    c.lora.rank = 0              # 0 = full fine-tuning; > 0 trains LoRA adapters on a frozen base
    c.lora.alpha = 16.0
    c.lora.targets = ("attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",)

    c.optim = optim_config(lr=m["lr"])

    c.eval = mlc.ConfigDict()
    c.eval.every = 5             # epochs between evaluations (and always after the last)
    c.eval.data_dir = DEFAULT_DATA_DIR
    c.eval.split = "eval"        # fixed, category-balanced evaluation prompts
    c.eval.prompt_file = ""
    c.eval.num_prompts = 24      # 0 = all (the eval split holds 4 prompts per category, 24 in all)
    # 4 samples per prompt: with 2, the shipped reference's reward read 0.521 on one draw of the noise
    # and 0.392 with 4 (the 96-sample figure is the steadier one; same seed, same prompts)
    c.eval.samples_per_prompt = 4
    c.eval.batch_size = 48
    c.eval.num_steps = 20
    c.eval.shift = 1.0
    c.eval.cfg_scale = 1.0       # evaluate the distribution the RL objective trains (CFG-free)
    c.eval.seed = 0
    c.eval.renorm = False        # inference-time renormalisation to the reference norm (baseline)
    c.eval.quality = True        # FD and k-NN precision/recall against real renders
    c.eval.grid_size = 32

    c.ckpt = mlc.ConfigDict()
    c.ckpt.every = 10            # epochs between checkpoints (and always after the last)
    c.ckpt.max_to_keep = 2
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


def real_model_config(family: str) -> mlc.ConfigDict:
    """The `model` block of a real-model run (ng_jax.models.stack). The architecture comes from
    WEIGHTS_DIR/transformer/config.json; validate a directory first with
    `python -m ng_jax.tools.check_weights --family FAMILY --weights_dir DIR`."""
    flux = family == "flux1_dev"
    c = mlc.ConfigDict()
    c.family = family           # "sd35" (SD3.5-Medium: qk-norm + MMDiT-X), "sd3" or "flux1_dev"
    c.weights_dir = ""          # REQUIRED: a local diffusers save (transformer/, vae/, text_encoder*/, tokenizer*/)
    c.resolution = 512          # pixels; latent side = resolution / 8 (VAE) = 64 (SD3.5: 32x32 = 1024 tokens)
    c.dtype = "bfloat16"        # transformer compute dtype
    c.param_dtype = "bfloat16"  # the frozen base / reference weights; trainable params are always float32
    c.remat = True              # rematerialise transformer blocks in the backward pass
    c.scan_blocks = True        # one scanned module per run of identical blocks (faster compiles)
    if flux:
        c.guidance = 3.5        # FLUX.1-dev's distilled guidance (guidance embedding), FluxPipeline's default
    c.text = mlc.ConfigDict()
    c.text.max_sequence_length = 512 if flux else 256  # T5 tokens (the FluxPipeline / SD3 pipeline defaults)
    c.text.dtype = "bfloat16"         # text-encoder compute dtype (and of the TextCond)
    c.text.param_dtype = "bfloat16"   # frozen text-encoder weights
    if not flux:
        c.text.with_t5 = True         # False: zeros instead of T5 tokens (diffusers' SD3 without T5)
    c.text.batch_size = 16            # prompts per encoder call
    c.vae = mlc.ConfigDict()
    c.vae.dtype = "bfloat16"          # frozen VAE weights and decode compute ("float32" for exact decoding)
    return c


def _real_rl_config(method: str, family: str, normguard_lam: float) -> mlc.ConfigDict:
    if method not in REAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(REAL_METHODS)}")
    from ng_jax import flow

    m = REAL_METHODS[method]
    flux = family == "flux1_dev"
    c = rl_config(method, normguard_lam=normguard_lam)  # the structure; every value that matters is set below
    tag = "flux1dev" if flux else "sd35m"
    c.name = f"{tag}_{method}" + ("_normguard" if normguard_lam else "")
    c.workdir = "workdirs/" + c.name
    c.model = real_model_config(family)
    # Prompts: a .txt/.jsonl file of free-form prompts (the PickScore references train on Pick-a-Pic
    # prompts); "" falls back on the shapes world's TFDS prompts (compositional, GenEval-like).
    c.data.prompt_file = ""
    # FSDP over every device: the batch and every weight matrix's embed dimension split over "fsdp"
    # (mesh.logical_rules' defaults); (1, -1, T) adds T-way tensor parallelism over heads / MLP.
    c.mesh.shape = (1, -1, 1)

    r = c.rl
    r.epochs = 300               # rollout -> train cycles (the references run for hundreds)
    r.prompts_per_epoch = 48     # distinct prompts per epoch (flow_grpo / DiffusionNFT: 48 groups)
    r.group_size = 24            # images per prompt
    r.global_std = False         # per-group std for the advantages (True: the epoch's std)
    r.inner_epochs = 1
    r.num_timesteps = m["num_timesteps"]
    r.grid_fraction = m["grid_fraction"]
    # Optimizer-step batches: 2 steps per epoch (flow_grpo's gradient_accumulation_steps =
    # num_batches_per_epoch // 2); DPO counts winner/loser pairs (one per prompt).
    r.train_batch = 24 if method == "dpo" else 576
    # Gradient-accumulation chunk (global; a multiple of the device count): 4 samples per device on 8
    # devices for SD3.5-M, 2 for FLUX (12B); DPO: pairs, each pair two forwards.
    r.micro_batch = 8 if method == "dpo" else (16 if flux else 32)
    r.dpo_logit_mean = 0.0       # DPO sigmas: logit-normal(0, 1) ...
    r.dpo_logit_std = 1.0
    # ... shifted as the model's training grid (diffusers' SD3 training scripts index the shift-3 scheduler
    # with logit-normal draws); FLUX: unshifted
    r.dpo_shift = 1.0 if flux else 3.0
    ro = r.rollout
    ro.num_steps = m["num_steps"]
    ro.shift = 3.0               # SD3.5-Medium's grid shift (FLUX uses `mu` instead, below)
    if flux:
        # FLUX's resolution-dependent shift: mu for (512 / 16)^2 = 1024 packed image tokens (FluxPipeline).
        ro.mu = float(flow.flux_mu((c.model.resolution // 16) ** 2))
    else:
        # The SD3 pipeline's default grid (set_timesteps(N)): the linspace ends at the shifted smallest
        # training sigma, as the references' rollouts.
        ro.s_min = float(flow.shift_sigmas(1.0 / 1000, ro.shift))
    ro.cfg_scale = m["cfg"]      # 1 = CFG-free (NFT, AWM; FLUX.1-dev: its guidance embedding only)
    ro.sde_noise = 0.0           # deterministic Euler rollouts (AWM's optional Flow-SDE: 0.4 on [0.3, 0.9])
    ro.sde_window = (0.3, 0.9)
    ro.policy = m["policy"]      # "old" (NFT's old policy) or "current"
    ro.batch_size = 32 if flux else 64  # rollouts per jitted call (memory: sampler + VAE decode), 4 / 8 per device
    r.ema.rate = 0.001           # old/EMA decay after each epoch: min(0.001 * optimizer_step, max)
    r.ema.max = m["ema_max"]     # NFT 0.5, AWM 0.3 (DPO: unused)

    c.loss = mlc.ConfigDict(m["loss"])

    c.rewards.weights = mlc.ConfigDict({"pickscore": 1.0})
    c.rewards.pickscore_dir = ""            # REQUIRED: yuvalkirstain/PickScore_v1 saved locally (CLIPModel)
    c.rewards.pickscore_tokenizer_dir = ""  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer; "" = pickscore_dir
    c.rewards.clip_backend = "auto"         # torch when installed (faster), else the numpy forward
    c.rewards.timeout_s = 600.0             # a reward call slower than this stops the run

    c.lora.rank = 32             # LoRA r = 32, alpha = 64 (all three references)
    c.lora.alpha = 64.0
    if flux:
        from ng_jax.models.nets.flux import FLUX_LORA_TARGETS

        c.lora.targets = FLUX_LORA_TARGETS   # Flow-Factory's FLUX adapter targets (see ng_jax.models.nets.flux)
    else:
        c.lora.targets = SD3_LORA_TARGETS

    c.optim = optim_config(lr=m["lr"])       # AdamW: NFT / AWM 3e-4, DPO 1e-5; grad clip 1
    c.optim.weight_decay = 1e-4              # flow_grpo's adam_weight_decay

    e = c.eval
    e.every = 10                 # epochs between evaluations (and always after the last)
    e.num_prompts = 32
    e.samples_per_prompt = 2
    e.batch_size = 32            # 4 per device on 8 devices
    e.num_steps = 28 if flux else 40  # FluxPipeline's default / the references' evaluation steps
    e.shift = ro.shift
    if flux:
        e.mu = ro.mu
    else:
        e.s_min = ro.s_min
    e.cfg_scale = m["cfg"]       # evaluate the distribution the rollouts sample
    e.quality = False            # FD / precision / recall and ...
    e.accuracy = False           # ... verifier accuracy are the shapes world's judges
    e.grid_size = 16

    c.ckpt.every = 10
    c.ckpt.max_to_keep = 2
    return c


def sd35_medium_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """SD3.5-Medium (diffusers stabilityai/stable-diffusion-3.5-medium saved locally) at 512 px, PickScore."""
    return _real_rl_config(method, "sd35", normguard_lam)


def flux1_dev_config(method: str, *, normguard_lam: float = 0.0) -> mlc.ConfigDict:
    """FLUX.1-dev (black-forest-labs/FLUX.1-dev saved locally) at 512 px, guidance 3.5, PickScore."""
    return _real_rl_config(method, "flux1_dev", normguard_lam)
