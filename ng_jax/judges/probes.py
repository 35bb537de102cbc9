"""Direct probes of over-saturation: pixel statistics that need no judge network.

Over-saturation (the failure mode that norm guarding targets: the sampled velocity's norm grows, the
final sample overshoots the data range and is clipped into flat, garish colours) shows up directly in the
pixels. Three probes, each per image ([B] arrays) and as batch means:

- ``out_of_range_fraction``: the fraction of pixel values (over H, W and the 3 channels) with |x| > 1 in
  model space, BEFORE the clip to [-1, 1] that turns samples into uint8 images. Needs the raw float
  sample (a uint8 image is already clipped). Real renders are in range by construction (0).
- ``mean_saturation``: mean HSV saturation, S = (max(R,G,B) - min(R,G,B)) / max(R,G,B) per pixel (0
  where max = 0, i.e. black), on RGB scaled to [0, 1]; 0 for grey images, 1 for pure primaries.
- ``rms_contrast``: RMS contrast, the (population) standard deviation over pixels of the luminance
  Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma, PIL's "L"), on RGB scaled to [0, 1].

(Colourfulness, the Hasler-Suesstrunk metric, lives in its own module and is not repeated here.)

Saturation and contrast take uint8 images [B, H, W, 3] in [0, 255] or float images in [-1, 1] model space;
floats are clipped to [-1, 1] first, as ``ng_jax.sampling.to_uint8`` does, so that the probes describe the
image that is shown. ``compare_probes`` reports the probes of generated images beside real renders of
the same prompts and their difference (generated - real) with its standard error.
"""
from __future__ import annotations

import numpy as np

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _check_images(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [B, H, W, 3] RGB batch, got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any():
        raise ValueError(f"{name} contains NaN values")
    return images


def _unit_rgb(images, name: str) -> np.ndarray:
    """RGB in [0, 1] (float64) from uint8 [0, 255] or float [-1, 1] (clipped) images."""
    images = _check_images(images, name)
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    return (np.clip(images.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0


def out_of_range_fraction(images) -> np.ndarray:
    """Per image [B]: fraction of values outside [-1, 1] of a float model-space batch before clipping."""
    images = _check_images(images, "images")
    if images.dtype == np.uint8:
        raise ValueError("out_of_range_fraction needs the raw float sample in model space; uint8 images are already clipped")
    return np.mean(np.abs(images.astype(np.float64)) > 1.0, axis=(1, 2, 3))


def hsv_saturation(images) -> np.ndarray:
    """Per-pixel HSV saturation [B, H, W] in [0, 1] (0 where the pixel is black)."""
    rgb = _unit_rgb(images, "images")
    hi, lo = rgb.max(-1), rgb.min(-1)
    return np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)


def mean_saturation(images) -> np.ndarray:
    """Per image [B]: mean HSV saturation over pixels."""
    return hsv_saturation(images).mean(axis=(1, 2))


def luminance(images) -> np.ndarray:
    """Per-pixel BT.601 luma [B, H, W] in [0, 1]."""
    return _unit_rgb(images, "images") @ LUMA_WEIGHTS


def rms_contrast(images) -> np.ndarray:
    """Per image [B]: RMS contrast, the standard deviation (ddof=0) of the luminance over pixels."""
    return luminance(images).std(axis=(1, 2))


def probe_values(images) -> dict[str, np.ndarray]:
    """All per-image probes [B] of a batch; ``out_of_range`` only for float (unclipped) batches."""
    images = _check_images(images, "images")
    out = {"saturation": mean_saturation(images), "contrast": rms_contrast(images)}
    if images.dtype != np.uint8:
        out["out_of_range"] = out_of_range_fraction(images)
    return out


def probe_means(images) -> dict[str, float]:
    """Batch means of `probe_values`."""
    return {k: float(v.mean()) for k, v in probe_values(images).items()}


def compare_probes(generated, real, paired: bool = False) -> dict[str, dict[str, float]]:
    """Probes of generated images beside real renders of the same prompts.

    `generated`: float model-space samples BEFORE clipping (all three probes) or uint8 images
    (saturation and contrast only); `real`: uint8 renders (or floats). Returns, per probe,
    ``{"generated", "real", "diff", "diff_se"}``: batch means, diff = generated - real, and the standard
    error of the diff: independent samples, sqrt(var_g / n_g + var_r / n_r); with `paired` (image i of
    both batches shows one prompt; equal sizes), the std of the per-image differences / sqrt(n), which
    removes the prompt-to-prompt spread. A uint8 real batch has out-of-range fraction 0 by construction."""
    generated = _check_images(generated, "generated")
    real = _check_images(real, "real")
    if paired and generated.shape[0] != real.shape[0]:
        raise ValueError(f"paired probes need batches of equal size, got {generated.shape[0]} and {real.shape[0]}")
    gen, ref = probe_values(generated), probe_values(real)
    if "out_of_range" in gen and "out_of_range" not in ref:
        ref["out_of_range"] = np.zeros(real.shape[0])
    report = {}
    for name in ("out_of_range", "saturation", "contrast"):
        if name not in gen:
            continue
        g, r = gen[name], ref[name]
        if paired:
            se = (g - r).std(ddof=1) / np.sqrt(g.size) if g.size > 1 else float("nan")
        else:
            se = np.sqrt(g.var(ddof=1) / g.size + r.var(ddof=1) / r.size) if min(g.size, r.size) > 1 else float("nan")
        report[name] = {"generated": float(g.mean()), "real": float(r.mean()), "diff": float(g.mean() - r.mean()),
                        "diff_se": float(se)}
    return report
