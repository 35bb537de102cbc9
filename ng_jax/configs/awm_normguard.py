"""AWM + NormGuard on the shapes world: identical to ng_jax/configs/awm.py except the normguard block.

    python -m ng_jax.main --config=ng_jax/configs/awm_normguard.py --workdir=workdirs/awm_normguard
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.rl_config("awm")
    c.name = "awm_normguard"
    c.workdir = "workdirs/awm_normguard"
    c.normguard.lam = 1.0      # hinge weight
    c.normguard.margin = 0.0   # hinge starts at ||v|| = ||v_ref||
    c.normguard.power = 1
    c.normguard.relative = True
    return c
