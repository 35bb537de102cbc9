"""How a toy-world sample becomes an image: the toy world's stand-in for a VAE decoder.

The shapes world works in pixel space, where the images are the samples themselves, clipped to
[-1, 1] and quantised (`render = "clip"`). A model that overshoots the data range earns nothing for
it there: the clip renders 1.5 as 1.0. SD3 and FLUX sample in a VAE latent space, and a latent that
overshoots what the data produce still decodes to a valid image: a more saturated, higher-contrast
one. `render = "soft"` models that: values inside +-KNEE pass unchanged; beyond it the image keeps
brightening (ever more slowly) as the sample overshoots, `knee + (1 - knee) tanh((|x| - knee) / (1 - knee))`,
continuous with slope 1 at the knee and never leaving (-1, 1). Rewards and quality judges see the
rendered image; the norm ratio is measured on the samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KNEE = 0.8
RENDERS = ("clip", "soft")


def soft_saturate(x: jax.Array, knee: float = KNEE) -> jax.Array:
    """Identity on [-knee, knee], a tanh shoulder beyond that approaches +-1 (never reaches it)."""
    a = jnp.abs(x)
    shoulder = knee + (1.0 - knee) * jnp.tanh((a - knee) / (1.0 - knee))
    return jnp.where(a <= knee, x, jnp.sign(x) * shoulder)


def with_render(stack, render: str):
    """`stack` whose `decode_fn` renders samples with `render` ("clip": unchanged, the clip happens at
    quantisation; "soft": `soft_saturate` after the stack's own decoder)."""
    if render not in RENDERS:
        raise ValueError(f"render={render!r}: expected one of {RENDERS}")
    if render == "clip":
        return stack
    decode = stack.decode_fn
    return dataclasses.replace(stack, decode_fn=lambda params, x0: soft_saturate(decode(params, x0)))
