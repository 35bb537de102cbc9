"""NFT + NormGuard on the shapes world: identical to ng_jax/configs/nft.py except the normguard block.

    python -m ng_jax.main --config=ng_jax/configs/nft_normguard.py --workdir=workdirs/nft_normguard

Lambda 20, margin 0.05: AWM's calibrated setting (ng_jax/configs/awm_normguard.py) carried over at the
exchange rate of the base losses: NFT's parameter gradient is 6.8x AWM's (docs/DEFAULTS.md), so a hinge
of the same relative weight is 6.8 x 3 = 20. Checked on NFT by ng_jax/configs/experiments/frontier.py.
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.rl_config("nft")
    c.name = "nft_normguard"
    c.workdir = "workdirs/nft_normguard"
    c.normguard.lam = 20.0      # hinge weight (see above)
    c.normguard.margin = 0.05  # hinge starts at ||v|| = 1.05 ||v_ref||
    c.normguard.power = 1
    c.normguard.relative = True
    return c
