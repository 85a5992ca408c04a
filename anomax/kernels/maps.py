"""Anomaly maps: patch scores upsampled to the input size and smoothed, as XLA ops."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from anomax.errors import InputError


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of size 2*int(4*sigma + 0.5) + 1, the window of anomalib's
    GaussianBlur2d and of scipy.ndimage.gaussian_filter's default truncate=4."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian smoothing of (B, H, W) with reflect padding (torch 'reflect',
    scipy 'mirror': the edge pixel is not repeated). sigma <= 0 returns maps unchanged."""
    if sigma <= 0:
        return maps
    kernel = jnp.asarray(gaussian_kernel(sigma))
    radius = kernel.shape[0] // 2
    if min(maps.shape[1:]) <= radius:
        raise InputError(f"gaussian_blur: maps of size {maps.shape[1:]} are too small for sigma={sigma} "
                         f"(reflect padding needs more than {radius} pixels); lower sigma or enlarge the input")
    x = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")[:, None]
    for shape in ((-1, 1), (1, -1)):  # rows, then columns
        x = jax.lax.conv_general_dilated(x, kernel.reshape(1, 1, *shape), (1, 1), "VALID",
                                         precision="highest")
    return x[:, 0]


UPSAMPLING = ("bilinear", "nearest")


@partial(jax.jit, static_argnames=("out_hw", "sigma", "upsample"))
def anomaly_map(patch_scores: jax.Array, out_hw: tuple[int, int], sigma: float = 4.0,
                upsample: str = "bilinear") -> jax.Array:
    """(B, h, w) patch scores -> (B, H, W): upsampling with half-pixel centres (torch
    F.interpolate(mode='bilinear', align_corners=False), or 'nearest'), then Gaussian smoothing."""
    if upsample not in UPSAMPLING:
        raise InputError(f"anomaly_map: upsample must be one of {UPSAMPLING}, got {upsample!r}")
    batch = patch_scores.shape[0]
    upsampled = jax.image.resize(patch_scores.astype(jnp.float32), (batch, *out_hw), upsample, antialias=False)
    return gaussian_blur(upsampled, sigma)
