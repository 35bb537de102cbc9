"""AWM post-training of the shipped reference on the shapes world (baseline, no NormGuard).

    python -m ng_jax.main --config=configs/awm.py --workdir=workdirs/awm
"""

from ng_jax import config_base


def get_config(arg=None):
    return config_base.rl_config("awm")
