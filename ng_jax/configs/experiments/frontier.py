"""The reward-quality frontier, and NormGuard's setting carried over to NFT and DPO.

Seeds 0 and 1 (the calibration's, not the grid's), the preference reward, the grid's world; NFT, AWM and DPO:

- `base`: the method as it is;
- `ng_lam0p1`, `ng_lam0p3`, `ng_lam1`: NormGuard at the margin of the method's `_normguard` config file, with
  lambda = `LAMBDA_RATE[method]` x {0.1, 0.3, 1}: AWM's lambdas of the calibration sweep (calibration.py), carried
  over to NFT and DPO at the exchange rate of their base losses' parameter gradients to AWM's (measured with
  `normguard.log_term_grads`, docs/DEFAULTS.md): a hinge of the same weight relative to the base loss. The
  calibration's rule (`grid.choose_max_gain_loss`) names the arm each method's config file should carry;
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

AWM_LAMBDAS = (0.1, 0.3, 1.0)
# base-loss parameter-gradient norm relative to AWM's (medians over epochs 2-6 in the grid's world, seed 0,
# commit 99b2d12: docs/results/calibration/gradient_scales.json)
LAMBDA_RATE = {"awm": 1.0, "nft": 6.8, "dpo": 33.0}
KL_WEIGHTS = (0.1, 1.0, 10.0)
KL_KEY = {"awm": "loss.beta", "nft": "loss.kl_beta"}
METHODS = ("dpo", "nft", "awm")   # DPO and NFT first: their seed-0 arms check the carried-over lambda soonest


def _tag(x: float) -> str:
    return f"{x:.2g}".replace(".", "p")  # config keys cannot hold dots


def method_lambda(method: str, awm_lambda: float) -> float:
    """The lambda of `method` whose hinge weighs, relative to its base loss, what `awm_lambda` weighs in AWM."""
    return float(f"{LAMBDA_RATE[method] * awm_lambda:.2g}")


def get_config(arg=None):
    c = load_config_file("experiments/calibration.py")
    c.name = "frontier"
    c.workdir = "workdirs/frontier"
    c.grid.methods = METHODS
    arms = {"base": {"normguard": False, "set": ""}}
    for lam in AWM_LAMBDAS:
        arms[f"ng_lam{_tag(lam)}"] = {"normguard": True, "set": "", "set_by_method": {
            m: f"normguard.lam={method_lambda(m, lam):g}" for m in METHODS}}
    for w in KL_WEIGHTS:
        arms[f"kl{_tag(w)}"] = {"normguard": False, "set": "", "methods": tuple(KL_KEY),
                                "set_by_method": {m: f"{k}={w}" for m, k in KL_KEY.items()}}
    c.grid.arms = mlc.ConfigDict(arms)
    c.grid.normguard_arm = "ng_lam0p3"
    c.results = "docs/results/frontier/RESULTS.md"
    return c
