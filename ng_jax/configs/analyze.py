"""The paper's analyses (ng_jax.eval.analyze) on the toy world.

    python -m ng_jax.eval.analyze all --checkpoints=reference,workdirs/awm,workdirs/awm_normguard \
        --runs=workdirs/awm,workdirs/awm_normguard --out=workdirs/analysis

equivalently: python -m ng_jax.main --config=ng_jax/configs/analyze.py --config.analysis.name=all \
        --config.analysis.checkpoints=reference,workdirs/awm --workdir=workdirs/analysis
"""

import ml_collections as mlc

from ng_jax.config import blocks, methods


def get_config(arg=None):
    rl = methods.rl_config("awm")
    c = mlc.ConfigDict()
    c.job = "analyze"
    c.name = "analysis"
    c.seed = 0
    c.workdir = "workdirs/analysis"
    c.reference = ""              # the reference bundle the checkpoints are compared with ("" = shipped)
    c.render = rl.render          # how samples become images: "clip" or "soft" (ng_jax/data/render.py)
    c.space = rl.space            # "pixel" or "centred" sample space (ng_jax/data/render.py)
    c.mesh = blocks.mesh_config()
    c.rewards = rl.rewards        # the reward(s) reported by every evaluation (verifier by default)
    c.eval = rl.eval              # prompts, samples, steps, CFG of every evaluation (see methods.rl_config)
    c.eval.samples_per_prompt = 4
    c.eval.cfg_rescale = 0.0      # CFG-rescale phi of the plain evaluations (the renorm analysis varies it)

    c.analysis = mlc.ConfigDict()
    c.analysis.name = "all"       # norms | renorm | few_step | adjoint | matched | judge | all
    c.analysis.checkpoints = "reference"  # comma-separated [label=]path: "reference", bundle dirs, RL workdirs
    c.analysis.runs = ""          # comma-separated RL workdirs (summary.json) for the matched-reward control
    c.analysis.few_steps = (4, 6, 10, 20, 40)  # Euler step counts of the few-step evaluation
    c.analysis.cfg_rescale_phi = 0.7           # the CFG-rescale variant of the renorm analysis
    c.analysis.guided_cfg_scale = 4.5          # the guided evaluations of the renorm analysis (SD3's default CFG)
    c.analysis.adjoint_prompts = 8             # eval prompts used by the adjoint analysis
    c.analysis.adjoint_samples = 2             # samples per prompt there (one reverse pass each)
    c.analysis.adjoint_steps = 0               # sampler steps there (0 = eval.num_steps)
    c.analysis.judge_url = ""                  # OpenAI-compatible base URL, e.g. http://localhost:8000/v1
    c.analysis.judge_model = ""                # the served vision-language model's name
    c.analysis.judge_rubrics = ("quality", "realism")
    c.analysis.judge_images = 32               # images judged per checkpoint
    c.analysis.judge_timeout_s = 60.0
    return c
