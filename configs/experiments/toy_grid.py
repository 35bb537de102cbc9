"""The reproduction grid on the toy world: {NFT, AWM, DPO} x {base, +NormGuard} x {verifier, JPEG
compressibility} x seeds, then every analysis, then docs/RESULTS.md.

    python -m ng_jax.main --config=configs/experiments/toy_grid.py

Runs whose `summary.json` exists are reused (an interrupted run resumes from its checkpoint), so
repeating the command only redoes the analyses and the report. Tiny smoke version (minutes):
    --config.grid.methods=awm, --config.grid.seeds=0, --config.grid.rewards=verifier, \
    --config.overrides.rl.epochs=2 --config.results=/tmp/RESULTS.md
"""

import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict()
    c.job = "grid"
    c.name = "toy_grid"
    c.seed = 0
    c.workdir = "workdirs/toy_grid"   # one sub-directory per run, plus analysis/
    # The reference bundle of every run ("" = the shipped one). The grid runs from the stage-1 reference
    # (4-block MMDiT): its 24 runs fit the 2-hour budget on 2 CPU cores, which the 12-block shipped
    # reference (about 3x the block count) does not; docs/RESULTS.md was measured from it.
    c.reference = "ng_jax/assets/reference_stage1"

    c.grid = mlc.ConfigDict()
    c.grid.methods = ("nft", "awm", "dpo")        # each run is configs/{method}[_normguard].py
    c.grid.normguard = (False, True)              # base and +NormGuard (the config file's normguard block)
    # one reward per run: a registered name (weight 1) or a name in grid.composites
    c.grid.rewards = ("verifier", "jpeg_compressibility")
    c.grid.composites = mlc.ConfigDict({"verifier_colour": {"verifier": 1.0, "colourfulness": 0.01}})
    c.grid.seeds = (0, 1)
    c.grid.analysis_reward = "verifier"           # the checkpoint analyses use these runs ...
    c.grid.analysis_seed = 0                      # ... of this seed (plus the reference)

    # Applied to every run's config (dotted keys as on the command line). The grid must fit in 2
    # hours on 2 CPU cores: 24 runs of 40 epochs (twice the main job's 20), then the analyses.
    c.overrides = mlc.ConfigDict()
    c.overrides.rl = mlc.ConfigDict({"epochs": 40})
    c.overrides.eval = mlc.ConfigDict({"every": 20, "num_prompts": 24, "samples_per_prompt": 4})

    c.analysis = mlc.ConfigDict()                 # settings of the analyses (see configs/analyze.py)
    c.analysis.samples_per_prompt = 4
    c.analysis.few_steps = (4, 6, 10, 20, 40)
    c.analysis.cfg_rescale_phi = 0.7
    c.analysis.guided_cfg_scale = 4.5
    c.analysis.adjoint_prompts = 8
    c.analysis.adjoint_samples = 2

    c.results = "docs/RESULTS.md"                 # the report (figures go to docs/results/)
    return c
