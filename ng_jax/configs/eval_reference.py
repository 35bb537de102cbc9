"""Score a model bundle (default: the shipped reference) on the held-out TEST prompts.

    python -m ng_jax.main --config=ng_jax/configs/eval_reference.py --workdir=workdirs/eval_reference

Prints the per-category verifier accuracy table of the README (20 Euler steps, the bundle's CFG).
Another bundle: --config.reference=DIR. A trained policy against its reference: --config.policy=WORKDIR
(a finished RL run; for real models add the run's model block, e.g. --config=ng_jax/configs/sd35m_awm_normguard.py's).
"""

import ml_collections as mlc

from ng_jax.config import blocks, methods


def get_config(arg=None):
    rl = methods.rl_config("awm")
    c = mlc.ConfigDict()
    c.job = "evaluate"
    c.name = "eval_reference"
    c.seed = 0
    c.workdir = "workdirs/eval_reference"
    c.reference = ""
    c.policy = ""                   # a finished RL workdir: score its final policy against the reference
    c.render = rl.render            # "clip" or "soft" (ng_jax/data/render.py)
    c.space = rl.space            # "pixel" or "centred" sample space (ng_jax/data/render.py)
    c.mesh = blocks.mesh_config()
    c.rewards = rl.rewards
    c.eval = rl.eval
    c.eval.split = "test"
    c.eval.cfg_scale = 3.0          # the bundle's sampling CFG (the RL evaluations are CFG-free)
    c.eval.num_prompts = 0          # all test prompts
    c.eval.samples_per_prompt = 2
    # ... and more for the categories with few test prompts (1 counting, 2 single-object, 2 two-object
    # prompts): each category gets at least this many samples, so its accuracy is not a handful of draws.
    c.eval.min_samples_per_category = 64
    c.eval.batch_size = 64
    c.eval.grid_size = 64
    return c
