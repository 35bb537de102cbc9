"""DPO + NormGuard on the shapes world: identical to ng_jax/configs/dpo.py except the normguard block.

    python -m ng_jax.main --config=ng_jax/configs/dpo_normguard.py --workdir=workdirs/dpo_normguard

Lambda 99, margin 0.05: AWM's calibrated setting (ng_jax/configs/awm_normguard.py) carried over at the
exchange rate of the base losses: DPO's parameter gradient (beta 100) is 33x AWM's (docs/DEFAULTS.md), so a
hinge of the same relative weight is 33 x 3 = 99. Checked on DPO by ng_jax/configs/experiments/frontier.py.
"""

from ng_jax.config import methods


def get_config(arg=None):
    c = methods.rl_config("dpo")
    c.name = "dpo_normguard"
    c.workdir = "workdirs/dpo_normguard"
    c.normguard.lam = 99.0      # hinge weight (see above)
    c.normguard.margin = 0.05  # hinge starts at ||v|| = 1.05 ||v_ref||
    c.normguard.power = 1
    c.normguard.relative = True
    return c
