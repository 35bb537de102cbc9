"""How a toy-world sample becomes an image: the toy world's stand-in for a VAE decoder.

The shapes world works in pixel space, where the images are the samples themselves, clipped to
[-1, 1] and quantised (`render = "clip"`). A model that overshoots the data range earns nothing for
it there: the clip renders 1.5 as 1.0. SD3 and FLUX sample in a VAE latent space, and a latent that
overshoots what the data produce still decodes to a valid image: a more saturated, higher-contrast
one. `render = "soft"` models that: values inside +-KNEE pass unchanged; beyond it the image keeps
brightening (ever more slowly) as the sample overshoots, `knee + (1 - knee) tanh((|x| - knee) / (1 - knee))`,
continuous with slope 1 at the knee and never leaving (-1, 1). That shoulder leaves little to gain past
the data range (x = 1 already renders at 0.95). `render = "headroom"` gives the display the headroom a
VAE's latent space has: the data fill `HEADROOM_GAIN` (70%) of the display range, `soft(gain * x)`, so a
sample that overshoots the data range by up to 1 / gain renders brighter and more saturated than any
training image, as over-saturated decodes do. Rewards and quality judges see the rendered image (the
real renders the judges compare with are rendered the same way); the norm ratio is measured on the samples.

The sample space (`space`): "pixel" samples are the images themselves. SD3 and FLUX normalise their
latents to about zero mean (the VAE's shift factor); the shapes world's pixels are not (the dark
background puts the data mean near -0.71, so the mean carries 80% of an image's energy and an object
that grows can even lower it). `space = "centred"` samples `z = x - DATA_MEAN` (`with_space`): an exact
change of coordinates of the same reference (`models.velocity.ShiftedVelocityModel`), the same images
and the same flow-matching losses; only the origin of `||v||` moves, to the data mean, as in the
latent spaces the paper measures.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ng_jax.data.world import DATA_MEAN
from ng_jax.errors import UserError
from ng_jax.models.velocity import ShiftedVelocityModel

KNEE = 0.8
HEADROOM_GAIN = 0.7
RENDERS = ("clip", "soft", "headroom")
SPACES = ("pixel", "centred")


def soft_saturate(x: jax.Array, knee: float = KNEE) -> jax.Array:
    """Identity on [-knee, knee], a tanh shoulder beyond that approaches +-1 (never reaches it)."""
    a = jnp.abs(x)
    shoulder = knee + (1.0 - knee) * jnp.tanh((a - knee) / (1.0 - knee))
    return jnp.where(a <= knee, x, jnp.sign(x) * shoulder)


def render_fn(render: str):
    """`x -> image` in [-1, 1] for `render` ("clip": the identity, the clip happens at quantisation; "soft":
    `soft_saturate`; "headroom": `soft_saturate(HEADROOM_GAIN * x)`)."""
    if render not in RENDERS:
        raise ValueError(f"render={render!r}: expected one of {RENDERS}")
    if render == "clip":
        return lambda x: x
    gain = HEADROOM_GAIN if render == "headroom" else 1.0
    return lambda x: soft_saturate(gain * x)


def with_render(stack, render: str):
    """`stack` whose `decode_fn` renders samples with `render` after the stack's own decoder (see render_fn),
    and whose `render` is that function (the evaluator renders the real images with it too)."""
    fn = render_fn(render)
    if render == "clip":
        return stack
    decode = stack.decode_fn
    return dataclasses.replace(stack, decode_fn=lambda params, x0: fn(decode(params, x0)), render=render)


def with_space(stack, space: str):
    """`stack` sampling in `space` (see the module docstring): "pixel" returns it unchanged; "centred"
    (toy world only) wraps its velocity model in `ShiftedVelocityModel(model, DATA_MEAN)`, decodes
    `z0 + DATA_MEAN`, and records the shift on the stack."""
    if space not in SPACES:
        raise UserError(f"space={space!r}: expected one of {SPACES}")
    if space == "pixel":
        return stack
    if not stack.is_toy:
        raise UserError(f"space={space!r} is the toy world's; real models sample in their VAE's latent space "
                        "(use space='pixel')")
    decode, shift = stack.decode_fn, tuple(DATA_MEAN)
    return dataclasses.replace(stack, model=ShiftedVelocityModel(stack.model, shift), shift=shift,
                               decode_fn=lambda params, z0: decode(params, z0 + jnp.asarray(shift, z0.dtype)))


def world_stack(stack, config):
    """The run's stack as its config's `space` and `render` say (`with_space`, then `with_render`)."""
    return with_render(with_space(stack, str(config.get("space", "pixel"))), config.render)
