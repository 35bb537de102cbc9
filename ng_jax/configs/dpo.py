"""DPO post-training of the shipped reference on the shapes world (baseline, no NormGuard).

    python -m ng_jax.main --config=ng_jax/configs/dpo.py --workdir=workdirs/dpo
"""

from ng_jax.config import methods


def get_config(arg=None):
    return methods.rl_config("dpo")
