"""Stage 2 of the reference: the stage-1 model (ng_jax/configs/pretrain_shapes.py) grown to a 4-layer text
encoder and an 8-block MMDiT, then trained on.

The growth is function-preserving (ng_jax/models/grow.py): step 0 computes exactly what the stage-1
bundle does, the new blocks start as the identity. Stage 2 (ng_jax/assets/reference_stage2, the
starting point of stage 3 in ng_jax/configs/pretrain_shapes_deeper.py, which made the shipped reference) was
produced from the shipped stage-1 bundle by exactly (8000 steps at batch 64, 93 min on these 2 cores;
stored in float16, 9.8 MB; it was exported to ng_jax/assets/reference, where it was the shipped
reference until stage 3 replaced it):

    python -m ng_jax.main --config=ng_jax/configs/pretrain_shapes_deep.py --workdir=workdirs/pretrain_shapes_deep \
        --config.export_dir=ng_jax/assets/reference_stage2

(To redo stage 1 as well, see ng_jax/configs/pretrain_shapes.py.)

Smoke run (seconds): add --config.train.steps=20 --config.data.images_per_category=64
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.load_config_file("pretrain_shapes.py", arg)
    c.name = "pretrain_shapes_deep"
    c.workdir = "workdirs/pretrain_shapes_deep"
    c.init_from = "ng_jax/assets/reference_stage1"  # stage 1's exported EMA bundle
    c.text.depth = 4
    c.model.depth = 8
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 200
    c.optim.decay_steps = 8000
    c.train.steps = 8000
    c.export_dtype = "float16"  # 4.9M parameters: 9.7 MB in the repository instead of 19.5 MB
    return c
