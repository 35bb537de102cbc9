"""Colour statistics of host image batches and the colourfulness reward.

Plain numpy on uint8 [B, H, W, 3] batches (any H, W), so they may be called from a host reward
callback. All statistics are per image, over its pixels, with population (ddof=0) moments.

- ``colourfulness``: the Hasler & Suesstrunk (2003) metric M on 0..255 RGB values,
  ``rg = R - G``, ``yb = (R + G) / 2 - B``,
  ``M = sqrt(std_rg^2 + std_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2)``.
  0 for any grey image; the paper calls photos of M ~ 15 / 33 / 59 / 109 "slightly" / "moderately" /
  "quite" / "extremely" colourful; a half-black, half-pure-red image scores 1.3 * 63.75 * sqrt(5) ~= 185.3.
- ``rms_contrast``: the standard deviation of the Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B``
  scaled to [0, 1] (Peli's RMS contrast); 0 for a flat image, 0.5 at most.
- ``mean_saturation``: the mean HSV saturation ``(max - min) / max`` (0 where max = 0), in [0, 1].

``Colourfulness`` is the host reward (name ``"colourfulness"``): ``scale * colourfulness(images)``,
prompt-independent, like the JPEG rewards.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ng_jax.rewards.jpeg import check_image_batch

__all__ = ["colourfulness", "rms_contrast", "mean_saturation", "Colourfulness", "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601


def _pixels(images: np.ndarray, who: str) -> np.ndarray:
    check_image_batch(images, who)
    if images.shape[1] * images.shape[2] == 0:
        raise ValueError(f"{who}: images must have at least one pixel, got shape {images.shape}")
    return images.reshape(images.shape[0], -1, 3).astype(np.float64)


def colourfulness(images: np.ndarray) -> np.ndarray:
    """Hasler & Suesstrunk (2003) colourfulness of each image: float32 [B] (0 for grey images)."""
    x = _pixels(images, "colourfulness")
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    spread = np.sqrt(rg.var(axis=1) + yb.var(axis=1))
    offset = np.sqrt(rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2)
    return (spread + 0.3 * offset).astype(np.float32)


def rms_contrast(images: np.ndarray) -> np.ndarray:
    """RMS contrast: the standard deviation of the Rec. 601 luma in [0, 1], float32 [B]."""
    x = _pixels(images, "rms_contrast")
    luma = x @ np.asarray(LUMA_WEIGHTS) / 255.0
    return luma.std(axis=1).astype(np.float32)


def mean_saturation(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation (max - min) / max over the pixels (0 for black pixels), float32 [B]."""
    x = _pixels(images, "mean_saturation")
    hi, lo = x.max(axis=-1), x.min(axis=-1)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)
    return sat.mean(axis=1).astype(np.float32)


class Colourfulness:
    """Host reward ``scale * colourfulness(images)`` (the prompts are checked for length, not used)."""

    name = "colourfulness"

    def __init__(self, scale: float = 1.0):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale == 0:
            raise ValueError(f"colourfulness scale must be a finite non-zero number, got {scale!r}")
        self.scale = float(scale)

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        check_image_batch(images, self.name)
        if prompts is not None and (isinstance(prompts, str) or len(prompts) != images.shape[0]):
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"{self.name}: got {got} for {images.shape[0]} images; expected one per image")
        return (np.float32(self.scale) * colourfulness(images)).astype(np.float32)
