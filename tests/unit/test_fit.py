"""The blur shared by the verifier and judge trainers (ng_jax.tools.fit)."""
import jax.numpy as jnp
import numpy as np

from ng_jax.tools import fit


def test_jax_and_numpy_blurs_agree_away_from_the_border():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    smooth = np.asarray(fit.blur3x3(jnp.asarray(images, jnp.float32)))
    rounded = fit.blur3x3_uint8(images)
    # Interior: same binomial kernel, so equal up to the uint8 rounding.
    np.testing.assert_allclose(smooth[:, 1:-1, 1:-1], rounded[:, 1:-1, 1:-1], atol=0.5 + 1e-4)
    # A blur keeps a constant image and spreads a single bright pixel as 1/4 * 1/2 ... weights.
    flat = np.full((1, 5, 5, 1), 100, np.uint8)
    assert np.all(fit.blur3x3_uint8(flat) == 100)
    dot = np.zeros((1, 5, 5, 1), np.float32)
    dot[0, 2, 2, 0] = 16.0
    np.testing.assert_allclose(np.asarray(fit.blur3x3(jnp.asarray(dot)))[0, 1:4, 1:4, 0],
                               [[1, 2, 1], [2, 4, 2], [1, 2, 1]], atol=1e-6)
