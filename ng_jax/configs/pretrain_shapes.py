"""Pretraining of the reference model on the shapes world (rectified flow, CFG dropout, EMA): stage 1.

Stage 1 (this config: 2-layer text encoder, 4-block MMDiT) produced ng_jax/assets/reference_stage1
(7000 steps at batch 64; 86 min of wall clock on these 2 cores, shared with other jobs for most of it),
the reference of the reproduction grid (ng_jax/configs/experiments/toy_grid.py) and the starting point of
stage 2 (ng_jax/configs/pretrain_shapes_deep.py), which in turn starts stage 3 (ng_jax/configs/pretrain_shapes_deeper.py),
the shipped reference ng_jax/assets/reference. Stage 1 was produced by exactly:

    python -m ng_jax.main --config=ng_jax/configs/pretrain_shapes.py --workdir=workdirs/pretrain_shapes \
        --config.export_dir=ng_jax/assets/reference_stage1

Smoke run (seconds): add --config.train.steps=20 --config.data.images_per_category=64
"""

import ml_collections as mlc

from ng_jax.config import blocks, methods
from ng_jax.data.world import CATEGORIES


def get_config(arg=None):
    c = mlc.ConfigDict()
    c.job = "pretrain"
    c.name = "pretrain_shapes"
    c.seed = 0
    c.workdir = "workdirs/pretrain_shapes"

    c.data = mlc.ConfigDict()
    c.data.data_dir = methods.DEFAULT_DATA_DIR  # where the TFDS builders prepare their files
    c.data.images_per_category = 4000   # renders per prompt category (split evenly over its train prompts)
    # Share of each category in every batch (0 drops it); uniform, so the 10 single-object prompts weigh
    # as much as the 539 colour-attribution prompts.
    c.data.category_weights = mlc.ConfigDict({cat: 1.0 for cat in CATEGORIES})
    c.data.prompts_per_category = None  # keep only the first N train prompts per category (tiny test builds)
    c.data.batch_size = 64

    c.model = blocks.toy_model_config()
    c.text = blocks.toy_text_config()
    c.mesh = blocks.mesh_config()
    c.optim = blocks.optim_config(lr=1e-3)
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.decay_steps = 7000
    c.optim.weight_decay = 0.0

    c.train = mlc.ConfigDict()
    c.train.steps = 7000
    c.train.cfg_dropout = 0.1   # probability of replacing a caption by the empty prompt
    c.train.ema_decay = 0.999   # EMA of text encoder + MMDiT (warm-up min(decay, (1+t)/(10+t))); exported
    c.train.logit_mean = 0.0    # logit-normal timestep sampling (SD3)
    c.train.logit_std = 1.0

    c.sample = blocks.sample_config()
    c.sample.prompts = (
        "a red circle", "a blue square", "a green triangle", "a yellow cross",
        "two purple circles", "three orange squares", "a red circle left of a blue square",
        "a green triangle above a yellow circle",
    )

    c.log_every = 50            # steps between metric lines (and the non-finite-loss check)
    c.sample_every = 1000       # steps between sample grids (WORKDIR/samples/)
    c.ckpt = blocks.ckpt_config(every=250, max_to_keep=2)  # steps between checkpoints, as RL's ckpt block
    # Warm start: a model bundle whose parameters initialise text encoder + MMDiT ("" = fresh init). Its
    # configs must match this one except for depths, which may grow (ng_jax/models/grow.py: new blocks
    # start as the identity, so step 0 computes what the bundle does).
    c.init_from = ""
    c.export_dtype = "float32"  # storage dtype of the exported bundle ("float16" halves it; loads as float32)
    c.export_dir = ""  # where the final EMA bundle is written ("" = WORKDIR/reference)
    return c
