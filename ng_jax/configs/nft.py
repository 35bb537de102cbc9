"""NFT post-training of the shipped reference on the shapes world (baseline, no NormGuard).

    python -m ng_jax.main --config=ng_jax/configs/nft.py --workdir=workdirs/nft
"""

from ng_jax.config import methods


def get_config(arg=None):
    return methods.rl_config("nft")
