"""The devices' CLIP preprocessing (`ng_jax.rewards.clip.device_pixels`) equals the host path's
(`preprocess_images`: Pillow's bicubic resize, centre crop, normalisation) to the bit: square images (what
the generators produce) downscaled and upscaled, crop-only and a landscape image, both crop roundings.
Pillow 13 runs its two passes vertical-first for some portrait images, which this does not reproduce (one
level off in some pixels)."""
import jax
import numpy as np
import pytest
from PIL import Image

from ng_jax.rewards.clip import device_pixels, pil_bicubic_weights, preprocess_images


@pytest.mark.parametrize("hw, size, resize", [((64, 64), 32, None), ((64, 64), 24, 29), ((512, 512), 224, None),
                                              ((20, 20), 32, None), ((224, 224), 224, None), ((32, 50), 32, None),
                                              ((37, 90), 24, None)])
@pytest.mark.parametrize("crop_rounding", ["floor", "round"])
def test_device_preprocessing_is_pillows(hw, size, resize, crop_rounding):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    levels = rng.integers(0, 256, (2, *hw, 3)).astype(np.uint8)
    levels[0, : hw[0] // 2] = 255   # hard edges: the kernel's negative lobes overshoot and are clipped
    levels[0, hw[0] // 2:, : hw[1] // 3] = 0
    floats = levels.astype(np.float32) / 127.5 - 1.0   # the levels sampling.to_uint8 gives back
    host = preprocess_images(levels, size, crop_rounding=crop_rounding, resize=resize)
    device = jax.jit(lambda x: device_pixels(x, size, crop_rounding=crop_rounding, resize=resize))(floats)
    np.testing.assert_allclose(np.asarray(device), host, rtol=0, atol=2e-6)   # one level is 0.015


def test_one_axis_matches_pillow_exactly():
    row = np.random.default_rng(0).integers(0, 256, (1, 77)).astype(np.uint8)
    for out in (20, 31, 77, 150):
        want = np.asarray(Image.fromarray(row).resize((out, 1), resample=Image.BICUBIC))[0]
        acc = pil_bicubic_weights(77, out) @ row[0].astype(np.int64) + (1 << 21)
        np.testing.assert_array_equal(np.clip(acc >> 22, 0, 255), want)
