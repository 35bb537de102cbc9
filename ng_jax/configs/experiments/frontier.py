"""The reward-quality frontier: is NormGuard better than simply staying closer to the reference?

AWM and NFT with the preference reward, in the grid's world, seeds 0 and 1: the base method; NormGuard
with lambda in {0.1, 0.3, 1, 3} (the method's calibrated margin); and the base method with a stronger
KL-to-reference term (AWM: `loss.beta`, NFT: `loss.kl_beta`, each in {0.01, 0.1, 1, 10}). The report
plots final KID against reward gain per arm: whichever family lies below the other at equal reward
dominates. The KL weight whose reward matches NormGuard's is the grid's KL control (`grid.controls`).

    python -m ng_jax.main --config=ng_jax/configs/experiments/frontier.py

Reused and resumed as the grid (ng_jax/eval/grid.py).
"""

import ml_collections as mlc

from ng_jax.config.methods import load_config_file

LAMBDAS = (0.1, 0.3, 1.0, 3.0)
KL_WEIGHTS = (0.01, 0.1, 1.0, 10.0)
KL_KEY = {"awm": "loss.beta", "nft": "loss.kl_beta"}


def _tag(x: float) -> str:
    return f"{x:g}".replace(".", "p")  # config keys cannot hold dots


def get_config(arg=None):
    c = load_config_file("experiments/calibration.py")
    c.name = "frontier"
    c.workdir = "workdirs/frontier"
    c.grid.methods = ("awm", "nft")
    arms = {"base": {"normguard": False, "set": ""}}
    for lam in LAMBDAS:
        arms[f"lam{_tag(lam)}"] = {"normguard": True, "set": f"normguard.lam={lam}"}
    for w in KL_WEIGHTS:
        arms[f"kl{_tag(w)}"] = {"normguard": False, "set": "",
                                "set_by_method": {m: f"{k}={w}" for m, k in KL_KEY.items()}}
    c.grid.arms = mlc.ConfigDict(arms)
    c.grid.normguard_arm = "lam1"
    c.results = "docs/results/frontier/RESULTS.md"
    return c
