"""Anomaly maps: patch scores upsampled to the input size and smoothed, as XLA ops."""
from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from anomax.errors import InputError


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of size 2*int(4*sigma + 0.5) + 1, the window of anomalib's
    GaussianBlur2d and of scipy.ndimage.gaussian_filter's default truncate=4."""
    radius = blur_radius(sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def blur_radius(sigma: float) -> int:
    """Half the width of gaussian_kernel(sigma) (0: no smoothing); a map must be larger than it."""
    return int(4.0 * sigma + 0.5) if sigma > 0 else 0


def _check_blur_size(where: str, shape: tuple[int, ...], sigma: float) -> None:
    radius = blur_radius(sigma)
    if sigma > 0 and min(shape) <= radius:
        raise InputError(f"{where}: maps of size {tuple(shape)} are too small for sigma={sigma} "
                         f"(reflect padding needs more than {radius} pixels); lower sigma or enlarge the input")


UPSAMPLING = ("bilinear", "nearest")


@partial(jax.jit, static_argnames=("out_hw", "sigma", "upsample"))
def anomaly_map(patch_scores: jax.Array, out_hw: tuple[int, int], sigma: float = 4.0,
                upsample: str = "bilinear") -> jax.Array:
    """(B, h, w) patch scores -> (B, H, W): upsampling with half-pixel centres (torch
    F.interpolate(mode='bilinear', align_corners=False), or 'nearest'), then Gaussian smoothing
    with gaussian_kernel(sigma) and reflect padding (torch 'reflect', scipy 'mirror').

    All three steps are linear and act on rows and columns separately, so each axis's
    resize -> reflect-pad -> blur is one (H, h) matrix, built once per shape: the map is two small
    matmuls, rows @ scores @ columns.T, the cost of the bilinear resize alone. The same numbers
    as resizing, then blurring, to float rounding; exported to ONNX as two MatMuls on constants
    (a one-channel 33-tap convolution is a poor fit for the runtimes' blocked layouts)."""
    if upsample not in UPSAMPLING:
        raise InputError(f"anomaly_map: upsample must be one of {UPSAMPLING}, got {upsample!r}")
    _check_blur_size("anomaly_map", out_hw, sigma)
    (height, width), (out_height, out_width) = patch_scores.shape[1:], out_hw
    rows = jnp.asarray(_axis_operator(height, out_height, sigma, upsample))
    columns = jnp.asarray(_axis_operator(width, out_width, sigma, upsample))
    resized_columns = jnp.matmul(patch_scores.astype(jnp.float32), columns.T, precision="highest")  # (B, h, W)
    return jnp.einsum("Hh,bhW->bHW", rows, resized_columns, precision="highest")


@lru_cache(maxsize=64)
def _axis_operator(size: int, out_size: int, sigma: float, upsample: str) -> np.ndarray:
    """(out_size, size) float32: resize one axis as jax.image.resize does (antialias off), then
    reflect-pad and blur it with gaussian_kernel(sigma); composed in float64."""
    if upsample == "nearest":  # jax.image.resize's index rule, in float32 as it computes it
        source = np.floor((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * np.float32(size)
                          / np.float32(out_size)).astype(np.int64)
        resize = np.zeros((out_size, size))
        resize[np.arange(out_size), source] = 1.0
    else:  # triangle kernel at half-pixel centres; taps outside the input dropped and the rest renormalised
        centres = (np.arange(out_size) + 0.5) * size / out_size - 0.5
        resize = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(size)[None, :]))
        resize /= resize.sum(axis=1, keepdims=True)
    if sigma <= 0:
        return resize.astype(np.float32)
    kernel = gaussian_kernel(sigma).astype(np.float64)
    radius = len(kernel) // 2
    blur = np.zeros((out_size, out_size))
    for tap, weight in zip(range(-radius, radius + 1), kernel):
        source = np.arange(out_size) + tap
        source = np.where(source < 0, -source, np.where(source >= out_size, 2 * (out_size - 1) - source, source))
        np.add.at(blur, (np.arange(out_size), source), weight)  # reflect: the edge pixel is not repeated
    return (blur @ resize).astype(np.float32)
