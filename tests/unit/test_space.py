"""The "centred" sample space: an exact change of coordinates of the toy world's model (same images, same
flow-matching losses), whose only effect is the origin of the velocity's norm."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from ng_jax import flow, losses
from ng_jax.config.checks import check_config
from ng_jax.config import methods
from ng_jax.data import prompts, world
from ng_jax.data.render import with_space, world_stack
from ng_jax.data.tfds_shapes import image_seed
from ng_jax.errors import UserError
from ng_jax.models.bundle import ModelBundle
from ng_jax.models.stack import toy_stack
from ng_jax.models.velocity import make_velocity_model
from ng_jax.sampling import make_sampler
from tests.fixtures import tiny_model_cfg, tiny_text_cfg


def test_data_mean_is_the_training_renders_mean():
    rng = np.random.default_rng(1)
    imgs = []
    for cat in world.CATEGORIES:
        ps = prompts.split_prompts(cat, "train")
        for i in range(200):
            p = ps[rng.integers(len(ps))]
            imgs.append(world.render_prompt(p, image_seed(p, i))[0])
    mean = (np.stack(imgs).astype(np.float64) / 127.5 - 1.0).mean((0, 1, 2))
    np.testing.assert_allclose(mean, world.DATA_MEAN, atol=0.02)


@pytest.fixture(scope="module")
def stacks():
    """A randomly initialised toy stack in pixel space and the same in centred space (equivariance holds
    for any parameters)."""
    from ng_jax.models.nets.text import make_text_encoder

    mcfg, tcfg = tiny_model_cfg(), tiny_text_cfg()
    model = make_velocity_model(mcfg)
    text = make_text_encoder(tcfg)
    velocity = model.init(jax.random.key(0))  # zero-initialised output layers: randomise every weight
    leaves, tree = jax.tree.flatten(velocity)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    velocity = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    params = {"velocity": velocity, "text": text.init(jax.random.key(1))}
    bundle = ModelBundle(model_cfg=mcfg, text_cfg=tcfg, sampling={}, params=params)
    pixel = toy_stack(bundle)
    return pixel, with_space(pixel, "centred")


def _cond(stack, n):
    return stack.encode(["a red circle", "two blue squares"] * (n // 2)), stack.uncond(n)


@pytest.mark.parametrize("sde_noise,cfg", [(0.0, 1.0), (0.7, 2.5)])
def test_sampling_gives_the_same_images_in_both_spaces(stacks, sde_noise, cfg):
    pixel, centred = stacks
    cond, uncond = _cond(pixel, 4)
    noise = jax.random.normal(jax.random.key(2), (4,) + pixel.model.sample_shape)
    outs = []
    for stack in stacks:
        sample = make_sampler(stack.model.apply, num_steps=6, cfg_scale=cfg, sde_noise=sde_noise,
                              record=("x0", "norms", "log_probs"))
        outs.append(sample(stack.ref, noise, cond, uncond, jax.random.key(3), ref_params=stack.ref))
    images = [s.decode_fn(s.decoder_params, o.x0) for s, o in zip(stacks, outs)]
    np.testing.assert_allclose(images[0], images[1], atol=2e-5)
    if sde_noise:
        np.testing.assert_allclose(outs[0].log_probs, outs[1].log_probs, rtol=1e-4, atol=1e-2)
    # the norms are not the same: centred, the origin is the data mean (here: random weights, so only inequality)
    assert not np.allclose(outs[0].norms_policy, outs[1].norms_policy, rtol=1e-3)
    assert centred.shift == tuple(world.DATA_MEAN) and pixel.shift is None


def test_velocity_is_shifted_and_flow_matching_losses_agree(stacks):
    pixel, centred = stacks
    b = jnp.asarray(world.DATA_MEAN)
    cond, _ = _cond(pixel, 4)
    k = jax.random.split(jax.random.key(4), 3)
    x0 = jnp.clip(jax.random.normal(k[0], (4,) + pixel.model.sample_shape) * 0.5 - 0.7, -1, 1)
    eps = jax.random.normal(k[1], x0.shape)
    sigma = jnp.array([0.9, 0.6, 0.3, 0.1])
    x_t, z0 = flow.interpolate(x0, eps, sigma), x0 - b
    z_t = flow.interpolate(z0, eps, sigma)
    vx = pixel.model.apply(pixel.ref, x_t, sigma, cond)
    vz = centred.model.apply(centred.ref, z_t, sigma, cond)
    np.testing.assert_allclose(vz, vx + b, atol=1e-5)
    assert float(jnp.abs(vx).mean()) > 0.1
    # a perturbed "policy" (the same perturbation in both spaces)
    pol = jax.tree.map(lambda p: p * 1.01, pixel.ref)
    px, pz = pixel.model.apply(pol, x_t, sigma, cond), centred.model.apply(pol, z_t, sigma, cond)
    adv = jnp.array([1.0, -0.5, 0.3, -1.0])
    awm = [losses.awm_loss(v, vr, vr, eps - x, sigma, adv)[0]
           for v, vr, x in ((px, vx, x0), (pz, vz, z0))]
    np.testing.assert_allclose(awm[0], awm[1], rtol=1e-4)
    nft = [losses.nft_loss(v, vr, vr, xt, x, sigma, adv)[0]
           for v, vr, xt, x in ((px, vx, x_t, x0), (pz, vz, z_t, z0))]
    np.testing.assert_allclose(nft[0], nft[1], rtol=1e-4)
    # ... and NormGuard's hinge does differ: its norm is measured from the space's origin
    # (a policy velocity 10% longer than the reference's in pixel space is the same velocity in both spaces)
    hinge = [float(jnp.mean(losses.normguard_penalty(v, vr))) for v, vr in ((1.1 * vx, vx), (1.1 * vx + b, vz))]
    assert hinge[0] == pytest.approx(0.1, rel=1e-4) and abs(hinge[1] - hinge[0]) > 1e-3


def test_space_errors_are_one_line():
    c = methods.rl_config("awm")
    c.space = "latent"
    with pytest.raises(ValueError, match="space='latent'"):
        check_config(c)
    real = mlc.ConfigDict({"space": "centred", "render": "clip"})

    class Real:
        is_toy = False
    with pytest.raises(UserError, match="toy world"):
        world_stack(Real(), real)
    with pytest.raises(UserError, match="expected one of"):
        with_space(Real(), "latent")
