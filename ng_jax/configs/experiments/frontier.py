"""The reward-quality frontier, and NormGuard's setting carried over to NFT and DPO.

Seeds 0 and 1 (the calibration's, not the grid's), the preference reward, the grid's world; NFT, AWM and DPO:

- `base`: the method as it is;
- `ng_x0p33`, `ng_x1`, `ng_x3`: NormGuard at 1/3, 1 and 3 times the lambda of the method's `_normguard` config
  file, at its margin. AWM's lambda and margin come from the calibration sweep (calibration.py); NFT's and
  DPO's lambda were carried over from AWM's by matching the ratio of the hinge's gradient to the base loss's
  (docs/DEFAULTS.md), and these arms check that choice with the calibration's rule (`grid.choose_max_gain_loss`);
- `kl0p1`, `kl1`, `kl10` (AWM and NFT): the base method with a stronger KL-to-reference term (AWM `loss.beta`,
  NFT `loss.kl_beta`, both 1e-4 by default; the term is `mean((v - v_ref)^2)`, in the units of the policy loss).

The report plots final KID against reward gain per arm: whichever family lies below the other at equal reward
dominates. The KL weight whose reward matches NormGuard's (interpolated in log weight) becomes the grid's KL
control (`grid.controls` in toy_grid.py).

    python -m ng_jax.main --config=ng_jax/configs/experiments/frontier.py

Reused and resumed as the grid (ng_jax/eval/grid.py); trained seed by seed, so seed 0's arms are all in first.
"""

import ml_collections as mlc

from ng_jax.config.methods import load_config_file

LAMBDA_FACTORS = (1 / 3, 1.0, 3.0)
KL_WEIGHTS = (0.1, 1.0, 10.0)
KL_KEY = {"awm": "loss.beta", "nft": "loss.kl_beta"}
METHODS = ("nft", "awm", "dpo")


def _tag(x: float) -> str:
    return f"{x:.2g}".replace(".", "p")  # config keys cannot hold dots


def get_config(arg=None):
    c = load_config_file("experiments/calibration.py")
    c.name = "frontier"
    c.workdir = "workdirs/frontier"
    c.grid.methods = METHODS
    lam = {m: float(load_config_file(f"{m}_normguard.py").normguard.lam) for m in METHODS}
    arms = {"base": {"normguard": False, "set": ""}}
    for f in LAMBDA_FACTORS:
        arms[f"ng_x{_tag(f)}"] = {"normguard": True, "set": "",
                                  "set_by_method": {m: f"normguard.lam={lam[m] * f:.4g}" for m in METHODS}}
    for w in KL_WEIGHTS:
        arms[f"kl{_tag(w)}"] = {"normguard": False, "set": "", "methods": tuple(KL_KEY),
                                "set_by_method": {m: f"{k}={w}" for m, k in KL_KEY.items()}}
    c.grid.arms = mlc.ConfigDict(arms)
    c.grid.normguard_arm = "ng_x1"
    c.results = "docs/results/frontier/RESULTS.md"
    return c
