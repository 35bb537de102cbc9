"""JPEG (in)compressibility rewards: the encoded file size of each image, as in DDPO.

Host-side, plain Python + Pillow. The size is the JPEG byte count at a fixed quality, in kB
(bytes / 1000), following the DDPO reference (jannerm/ddpo, kvablack/ddpo-pytorch
``jpeg_compressibility``): compressibility rewards small files (``-size``), incompressibility
rewards large files (``+size``).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image


def check_image_batch(images: np.ndarray, who: str) -> np.ndarray:
    """Validates a host image batch: a numpy uint8 array [B, H, W, 3]; returns it unchanged."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{who}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{who}: images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{who}: images must have shape [B, H, W, 3], got {images.shape}")
    return images


def jpeg_size_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """Encoded JPEG size of each image in kB (1 kB = 1000 bytes), float32 [B]."""
    check_image_batch(images, "jpeg_size_kb")
    sizes = np.empty((images.shape[0],), np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


class JpegCompressibility:
    """Reward ``sign * jpeg_size_kb``: ``sign=-1`` rewards compressible images (the default)."""

    def __init__(self, quality: int = 95, sign: int = -1):
        if not (isinstance(quality, int) and 1 <= quality <= 100):
            raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 (compressibility) or +1 (incompressibility), got {sign!r}")
        self.quality = quality
        self.sign = sign
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def __call__(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> np.ndarray:
        check_image_batch(images, self.name)
        if prompts is not None and len(prompts) != images.shape[0]:
            raise ValueError(
                f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images; expected one per image"
            )
        return (self.sign * jpeg_size_kb(images, self.quality)).astype(np.float32)


class JpegIncompressibility(JpegCompressibility):
    """Reward ``+jpeg_size_kb``: larger (more detailed / noisier) files score higher."""

    def __init__(self, quality: int = 95):
        super().__init__(quality=quality, sign=1)
