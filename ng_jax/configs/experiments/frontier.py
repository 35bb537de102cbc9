"""The reward-quality frontier, and NormGuard's setting carried over to NFT and DPO.

Seeds 0 and 1 (the calibration's, not the grid's), the preference reward, the grid's world; NFT, AWM and DPO:

- `base`: the method as it is;
- `ng_x0p33`, `ng_x1`, `ng_x3`: NormGuard at the margin of the method's `_normguard` config file and 1/3, 1
  and 3 times its lambda. The method's lambda is AWM's calibrated one (awm_normguard.py, chosen by
  calibration.py) times `LAMBDA_RATE[method]`, the exchange rate of the base losses' parameter gradients
  to AWM's (measured with `normguard.log_term_grads`, docs/DEFAULTS.md): a hinge of the same weight
  relative to the base loss. The calibration's rule (`grid.choose_max_gain_loss`) names the arm each
  method's config file should carry: `ng_x1` confirms it;
- `kl0p03`, `kl0p1`, `kl1`, `kl10`, `kl100` (AWM and NFT): the base method with a stronger KL-to-reference
  term (AWM `loss.beta`, NFT `loss.kl_beta`, both 1e-4 by default; the term is `mean((v - v_ref)^2)`, in the
  units of the policy loss), at these weights times the same exchange rate. `kl0p03` was added after the
  first 40 runs: of the others only `kl0p1` lies in NormGuard's reward range, so the KL family's KID at
  NormGuard's reward was read on a straight line from the base run to it; `kl0p03` tests that line.

The report plots final KID against reward gain per arm: whichever family lies below the other at equal reward
dominates. The KL weight whose reward matches NormGuard's (interpolated linearly in weight) becomes the grid's KL
control (`grid.controls` in toy_grid.py).

    python -m ng_jax.main --config=ng_jax/configs/experiments/frontier.py

Reused and resumed as the grid (ng_jax/eval/grid.py); trained seed by seed, so seed 0's arms are all in first.
"""

import ml_collections as mlc

from ng_jax.config.methods import load_config_file

LAMBDA_MULTIPLES = (1 / 3, 1.0, 3.0)   # of each method's shipped lambda
# base-loss parameter-gradient norm relative to AWM's (medians over epochs 2-6 in the grid's world, seed 0,
# commit 99b2d12: docs/results/calibration/gradient_scales.json)
LAMBDA_RATE = {"awm": 1.0, "nft": 6.8, "dpo": 33.0}
KL_WEIGHTS = (0.03, 0.1, 1.0, 10.0, 100.0)   # AWM's; NFT's are LAMBDA_RATE["nft"] times these
KL_KEY = {"awm": "loss.beta", "nft": "loss.kl_beta"}
METHODS = ("dpo", "nft", "awm")   # DPO and NFT first: their seed-0 arms check the carried-over lambda soonest


def _tag(x: float) -> str:
    return f"{float(f'{x:.2g}'):g}".replace(".", "p")  # 0p33, 1, 100: config keys cannot hold dots


def method_lambda(method: str, awm_lambda: float) -> float:
    """The weight of a term in `method` that weighs, relative to its base loss, what `awm_lambda` weighs in AWM
    (two significant digits)."""
    return float(f"{LAMBDA_RATE[method] * awm_lambda:.2g}")


def get_config(arg=None):
    c = load_config_file("experiments/calibration.py")
    c.name = "frontier"
    c.workdir = "workdirs/frontier"
    c.grid.methods = METHODS
    arms = {"base": {"normguard": False, "set": ""}}
    awm_lam = float(load_config_file("awm_normguard.py").normguard.lam)
    for x in LAMBDA_MULTIPLES:
        arms[f"ng_x{_tag(x)}"] = {"normguard": True, "set": "", "set_by_method": {
            m: f"normguard.lam={method_lambda(m, x * awm_lam):g}" for m in METHODS}}
    for w in KL_WEIGHTS:
        arms[f"kl{_tag(w)}"] = {"normguard": False, "set": "", "methods": tuple(KL_KEY),
                                "set_by_method": {m: f"{k}={method_lambda(m, w):g}" for m, k in KL_KEY.items()}}
    c.grid.arms = mlc.ConfigDict(arms)
    c.grid.controls = ()
    c.grid.normguard_arm = "ng_x1"
    c.grid.match_weights = mlc.ConfigDict(KL_KEY)  # the report interpolates the KL weight matching ng_x1's reward
    c.results = "docs/results/frontier/RESULTS.md"
    return c
