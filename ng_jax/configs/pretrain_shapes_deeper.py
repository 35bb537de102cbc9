"""Stage 3 of the reference: the stage-2 model (ng_jax/configs/pretrain_shapes_deep.py) grown to an 8-layer text
encoder and a 12-block MMDiT, then trained on.

The growth is function-preserving (ng_jax/models/grow.py): step 0 computes exactly what the stage-2
bundle does, the new blocks start as the identity. The shipped reference (ng_jax/assets/reference, 7.5M
parameters, 14.9 MB in float16) was produced by exactly (7000 steps at batch 64, 2 h 0 min on these 2
cores; the stage-2 bundle was then at ng_jax/assets/reference, the same files as
ng_jax/assets/reference_stage2 now, so that run named it with --config.init_from=ng_jax/assets/reference):

    python -m ng_jax.main --config=ng_jax/configs/pretrain_shapes_deeper.py --workdir=workdirs/pretrain_shapes_deeper \
        --config.export_dir=ng_jax/assets/reference

(To redo the earlier stages as well, see ng_jax/configs/pretrain_shapes.py and ng_jax/configs/pretrain_shapes_deep.py.)

Smoke run (seconds): add --config.train.steps=20 --config.data.images_per_category=64
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.load_config_file("pretrain_shapes_deep.py", arg)
    c.name = "pretrain_shapes_deeper"
    c.workdir = "workdirs/pretrain_shapes_deeper"
    c.init_from = "ng_jax/assets/reference_stage2"  # stage 2's exported EMA bundle
    c.text.depth = 8
    c.model.depth = 12
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 200
    c.optim.decay_steps = 7000
    c.train.steps = 7000
    return c
