"""Calibration of NormGuard's lambda and margin: AWM with the preference reward, base and every
lambda x margin in {0.1, 0.3, 1, 3} x {0, 0.02, 0.05}, seeds 0 and 1, in the grid's world (centred space,
headroom render). The report is a table of every arm against the base, paired by seed (reward gain, norm
ratios, KID), and the arm the rule below chooses. The chosen setting is carried over to NFT and DPO and
checked there by frontier.py.

    python -m ng_jax.main --config=ng_jax/configs/experiments/calibration.py

Runs are reused and resumed as in the grid (ng_jax/eval/grid.py). The seeds here (0, 1) are not the
confirmatory grid's (100-104).
"""

import ml_collections as mlc

from ng_jax.config.methods import load_config_file

LAMBDAS = (0.1, 0.3, 1.0, 3.0)
MARGINS = (0.0, 0.02, 0.05)


def _name(lam, margin=None):
    """An arm's name: lam0p3_m0p02 (config keys cannot hold dots)."""
    name = f"lam{lam:g}" + ("" if margin is None else f"_m{margin:g}")
    return name.replace(".", "p")


def get_config(arg=None):
    c = load_config_file("experiments/toy_grid.py")
    c.name = "calibration"
    c.workdir = "workdirs/" + c.name
    c.grid.rewards = ("preference",)
    c.grid.seeds = (0, 1)
    c.grid.seeds_by_reward = mlc.ConfigDict()
    c.grid.floor_draws = 10
    c.grid.analysis_reward = ""
    c.grid.rescaling_methods = ()
    # The choice rule, fixed after seed 0 of 12 of the 13 AWM arms and before any seed-1 result: the largest KID reduction among the arms that lose at
    # most 10% of the base gain (half the grid's non-inferiority margin, so the confirmation has room for noise).
    c.grid.choose_max_gain_loss = 0.1
    arms = {"base": {"normguard": False, "set": ""}}
    if arg in (None, ""):
        c.grid.methods = ("awm",)
        for lam in LAMBDAS:
            for margin in MARGINS:
                arms[_name(lam, margin)] = {"normguard": True,
                                                   "set": f"normguard.lam={lam},normguard.margin={margin}"}
    else:
        raise ValueError(f"calibration.py: unknown variant {arg!r}; it has none")
    c.grid.arms = mlc.ConfigDict(arms)
    c.grid.controls = ()
    c.grid.normguard_arm = _name(1.0, 0.02)
    # cheaper evaluations than the grid's: 204 images at epoch 10, 272 before and after (CFG-free and guided)
    c.overrides.eval.every = 10
    c.overrides.eval.final_samples_per_prompt = 16
    c.overrides.eval.batch_size = 68
    c.overrides.eval.variants = mlc.ConfigDict({"guided": {"cfg_scale": 4.5, "final_only": True}})
    c.results = f"docs/results/{c.name}/RESULTS.md"
    return c
