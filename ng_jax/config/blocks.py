"""The blocks every config is assembled from, each knob documented where it is set.

The job configs (`ng_jax.config.methods`: the toy world's RL runs, the real-model runs) and the files
in ng_jax/configs/ combine these and change only what differs; nothing here knows about a method or a model
family's run settings. Why the toy world's values are what they are, with the measurements behind
them: docs/DEFAULTS.md.
"""

from __future__ import annotations

import ml_collections as mlc

from ng_jax.sharding import LOGICAL_RULES

DEFAULT_DATA_DIR = "workdirs/tfds"  # where the shapes world's TFDS builders prepare their files


def mesh_config() -> mlc.ConfigDict:
    """Mesh and partitioning (ng_jax.sharding; README "Meshes and partitioning")."""
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


def ckpt_config(every: int, max_to_keep: int) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.every = every              # epochs (RL) / steps (pretraining) between checkpoints, and always after the last
    c.max_to_keep = max_to_keep  # older checkpoints are deleted
    # -1 = resume from the latest checkpoint; N = from step N (e.g. the newest intact one that the error about
    # a corrupt latest checkpoint names); the later steps are moved to <checkpoints>.abandoned/. Saves are
    # asynchronous (orbax): training goes on while a checkpoint is written, which is committed atomically.
    c.restore_step = -1
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


def normguard_config(lam: float = 0.0) -> mlc.ConfigDict:
    """NormGuard: L = L_base + lam * mean(relu(||v|| - (1 + margin) ||v_ref||) ** power [/ ||v_ref|| ** power])."""
    c = mlc.ConfigDict()
    c.lam = lam             # hinge weight; 0 turns NormGuard off (adds exactly nothing)
    c.margin = 0.0          # tolerated relative excess of ||v|| over ||v_ref|| before the hinge acts
    c.power = 1             # 1 (hinge) or 2 (squared hinge)
    c.relative = True       # divide by ||v_ref|| ** power (scale-free penalty)
    # Log the gradient norms of the base loss and of the hinge (per unit lam) separately, w.r.t. v and the
    # parameters (train/grad_v_base, grad_v_hinge, grad_param_base, grad_param_hinge; also with lam = 0, to
    # calibrate lam on a base run); one more backward pass per step
    c.log_term_grads = False
    return c


def data_config(prompt_file: str = "", balance_categories: bool = True) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.data_dir = DEFAULT_DATA_DIR
    # a .txt (one prompt per line) or .jsonl ({"prompt": ...}) file; "" = the shapes world's TFDS train split
    c.prompt_file = prompt_file
    c.balance_categories = balance_categories  # TFDS train split: draw every prompt category equally often
    return c


def rl_block(method: str, *, epochs: int, prompts_per_epoch: int, group_size: int, train_batch: int,
             micro_batch: int, num_timesteps: int, grid_fraction: float, num_steps: int, shift: float,
             cfg_scale: float, policy: str, ema_max: float, dpo_shift: float = 1.0,
             rollout_batch_size: int = 0) -> mlc.ConfigDict:
    """The `rl` block: the epoch's rollouts, its optimizer-step batches, the training timesteps, the old/EMA policy."""
    c = mlc.ConfigDict()
    c.method = method           # "nft", "awm" or "dpo"
    c.epochs = epochs           # rollout -> train cycles
    c.prompts_per_epoch = prompts_per_epoch  # distinct prompts per epoch
    c.group_size = group_size   # samples per prompt (K); advantages are group-relative
    c.global_std = False        # normalise advantages by the std of all rewards of the epoch (False: per group)
    # Samples per optimizer step; DPO counts winner/loser pairs (one per prompt, each pair two forwards).
    c.train_batch = train_batch
    c.micro_batch = micro_batch  # gradient-accumulation chunk inside the jitted step (a memory knob)
    c.inner_epochs = 1          # passes over each epoch's rollouts
    c.num_timesteps = num_timesteps  # training timesteps per sample (pair) per optimizer step
    c.grid_fraction = grid_fraction  # fraction of the rollout grid the timestep schemes draw from
    c.dpo_logit_mean = 0.0      # DPO timestep sampling: logit-normal(mean, std), then shifted by dpo_shift
    c.dpo_logit_std = 1.0
    c.dpo_shift = dpo_shift
    c.rollout = mlc.ConfigDict()
    c.rollout.num_steps = num_steps  # Euler steps per rollout
    c.rollout.shift = shift          # SD3-style sigma-grid shift
    c.rollout.cfg_scale = cfg_scale  # guidance in rollouts; 1 = CFG-free (the NFT and AWM references)
    c.rollout.sde_noise = 0.0        # Flow-SDE noise level a (0 = deterministic Euler)
    c.rollout.sde_window = (0.3, 0.9)  # sigmas where SDE noise is injected
    c.rollout.policy = policy        # "old" (the EMA/old policy, NFT) or "current"
    c.rollout.batch_size = rollout_batch_size  # rollouts per jitted call (memory); 0 = the whole epoch in one call
    c.ema = mlc.ConfigDict()
    c.ema.rate = 0.001          # old/EMA decay after each epoch: min(rate * optimizer_step, max)
    c.ema.max = ema_max
    return c


def rewards_config(weights: dict) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.weights = mlc.ConfigDict(weights)  # name -> weight; names: ng_jax.rewards.registry.REWARD_NAMES
    c.timeout_s = 120.0          # a reward call slower than this stops the run (0 = no limit)
    c.retries = 0                # retries of a failing reward call before giving up
    c.remote_url = ""            # for the "remote" reward: http://host:port/ of a reward server
    # its wire format: "ng_jax" (JSON, ng_jax.rewards.remote), "flow_factory" (JSON) or "flow_grpo" (pickle)
    c.remote_protocol = "ng_jax"
    c.remote_allow_pickle = False  # flow_grpo's servers reply in pickle, which runs the server's code: opt in
    c.remote_score_key = ""      # the reply's list of scores ("" = scores / rewards / scores by protocol)
    c.remote_options = mlc.ConfigDict()  # extra request fields, e.g. {"only_strict": True} for flow_grpo GenEval
    # Real reward models from local weights (ng_jax.rewards.clip): transformers CLIPModel directories.
    c.clip_score_dir = ""         # e.g. openai/clip-vit-large-patch14 saved locally
    c.pickscore_dir = ""          # yuvalkirstain/PickScore_v1 saved locally
    c.pickscore_tokenizer_dir = ""  # its tokenizer (laion CLIP-ViT-H-14); "" = from pickscore_dir
    c.hpsv2_dir = ""              # `python -m ng_jax.rewards.open_clip_convert HPS_v2_compressed.pt --out DIR` output
    c.clip_backend = "auto"       # "torch" (if installed) or "numpy" (never JAX: host callbacks)
    c.clip_device = "cpu"         # torch device for the CLIP rewards
    # name -> "host" (default: a host callback) or "device": the CLIP-family rewards (clip_score, pickscore,
    # hpsv2) jitted on the mesh inside the rollout, batch-sharded, equal to the host path (images at the
    # CLIP model's input size; evaluations always score on the host)
    c.placement = mlc.ConfigDict()
    return c


def lora_config(rank: int, alpha: float, targets: tuple) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.rank = rank                # 0 = full fine-tuning; > 0 trains LoRA adapters on a frozen base
    c.alpha = alpha
    c.targets = targets          # regexes on the '/'-joined parameter path of the adapted kernels
    return c


def eval_config(*, every: int, num_prompts: int, samples_per_prompt: int, batch_size: int, num_steps: int,
                shift: float, cfg_scale: float, quality: bool, grid_size: int) -> mlc.ConfigDict:
    """Fixed-prompt evaluation before, during (every `every` epochs) and after a run (ng_jax.eval.evaluate)."""
    c = mlc.ConfigDict()
    c.every = every              # epochs between evaluations (and always after the last)
    c.data_dir = DEFAULT_DATA_DIR
    c.split = "eval"             # fixed, category-balanced evaluation prompts (TFDS)
    c.prompt_file = ""           # or a prompt file (.txt / .jsonl)
    c.num_prompts = num_prompts  # 0 = all
    c.samples_per_prompt = samples_per_prompt
    c.batch_size = batch_size
    c.num_steps = num_steps      # Euler steps
    c.shift = shift
    c.cfg_scale = cfg_scale      # guidance of the evaluated samples (1 = CFG-free)
    c.seed = 0                   # the evaluation noise (fixed: every evaluation scores the same prompts and noise)
    c.renorm = False             # inference-time renormalisation to the reference norm (baseline)
    c.cfg_rescale = 0.0          # CFG-rescale phi (baseline; acts only with cfg_scale != 1)
    c.norms = "always"           # which evaluations measure the norm ratio against the reference (one more
                                 # model forward per sampling step): "always"; "final" (before training and
                                 # after the last epoch only); "never" (the keys are None); variants may override
    c.min_samples_per_category = 0  # top up prompt categories with few prompts to this many samples
    c.quality = quality          # FD and k-NN precision/recall against real renders (the shapes world's judges)
    c.accuracy = quality         # verifier accuracy per prompt category (the shapes world's verifier)
    c.grid_size = grid_size      # images in WORKDIR/samples/<tag>.png
    # RL runs: samples per prompt of the evaluations before training and after the last epoch (0 = as
    # samples_per_prompt), and evaluation variants run beside each evaluation on the same prompts and noise:
    # name -> overrides of this block, e.g. {"guided": {"cfg_scale": 4.5}, "steps4": {"num_steps": 4}};
    # a variant with "final_only": True runs only before training and after the last epoch
    c.final_samples_per_prompt = 0
    c.variants = mlc.ConfigDict()
    # A directory caching the reference's evaluation (before training) across runs that share the reference,
    # these settings and the rewards ("" = off; the grid sets it, as its runs all start from the reference)
    c.initial_cache = ""
    return c


def logging_config() -> mlc.ConfigDict:
    """Where a run's metrics, sample grids and plots go besides WORKDIR/metrics.jsonl (ng_jax.logs.MetricWriter)."""
    c = mlc.ConfigDict()
    c.tensorboard = True         # scalars in WORKDIR/tensorboard
    c.tensorboard_images = True  # and every evaluation's sample grids and norm-ratio plot
    c.wandb = False              # Weights & Biases (pip install wandb==0.30.0): the same scalars and images
    c.wandb_project = "ng_jax"
    c.wandb_entity = ""          # "" = your default entity
    c.wandb_mode = "offline"     # "offline": written to WORKDIR/wandb, `wandb sync` uploads it; "online": live
    c.wandb_run_id = ""          # "" = derived from the workdir, so a resumed run continues the same W&B run
    return c


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
    c.attention = "auto"        # auto: cuDNN flash (GPU), splash (TPU), reference (CPU); or xla/cudnn/splash/reference
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
