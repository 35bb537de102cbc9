"""DPO + NormGuard on the shapes world: identical to ng_jax/configs/dpo.py except the normguard block.

    python -m ng_jax.main --config=ng_jax/configs/dpo_normguard.py --workdir=workdirs/dpo_normguard
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.rl_config("dpo")
    c.name = "dpo_normguard"
    c.workdir = "workdirs/dpo_normguard"
    c.normguard.lam = 1.0      # hinge weight
    c.normguard.margin = 0.0   # hinge starts at ||v|| = ||v_ref||
    c.normguard.power = 1
    c.normguard.relative = True
    return c
