"""The one mapping from config dtype names to JAX dtypes (model.dtype, model.param_dtype, model.text.dtype, ...)."""

from __future__ import annotations

import jax.numpy as jnp

from ng_jax.config.checks import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name, what: str = "model.dtype", optional: bool = False):
    """The JAX dtype a config names ("float32", "bfloat16", "float16"); a dtype object passes through.

    `optional=True`: None or "" mean "not set" and give None (e.g. `model.param_dtype`: keep the
    parameters' own dtype). Anything else is a one-line ConfigError (a ValueError) naming `what`."""
    if optional and (name is None or name == ""):
        return None
    if not isinstance(name, str) and name is not None:
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"{what}={name!r}: expected one of {sorted(DTYPES)}") from None
