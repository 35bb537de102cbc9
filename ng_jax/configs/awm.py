"""AWM post-training of the shipped reference on the shapes world (baseline, no NormGuard).

    python -m ng_jax.main --config=ng_jax/configs/awm.py --workdir=workdirs/awm
"""

from ng_jax.config import methods


def get_config(arg=None):
    return methods.rl_config("awm")
