"""Feature adaptor shared by all heads: backbone taps -> one (B, h, w, D) patch-feature map.

Steps, in anomalib's order: local average pooling per tap, resize the coarser taps to
the finest chosen resolution (or every tap to ``grid_tap``'s), concatenate channels in tap order,
optional projection.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.errors import ConfigError, InputError
from anomax.settings import MAX_SEED, Settings, setting


def random_projection(seed: int, in_dim: int, out_dim: int) -> np.ndarray:
    """Seeded Gaussian random projection (in_dim, out_dim), scaled by 1/sqrt(out_dim) so
    that squared distances are preserved in expectation (Johnson-Lindenstrauss).
    Drawn with numpy so the matrix does not depend on JAX's PRNG implementation."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def average_pool(x: jax.Array, size: int) -> jax.Array:
    """size x size mean, stride 1, zero 'same' padding, divided by size**2 also at the
    border: torch AvgPool2d(size, 1, size // 2) with its default count_include_pad=True."""
    if size == 1:
        return x
    pad = size // 2
    summed = jax.lax.reduce_window(
        x, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))
    )
    return summed / (size * size)


@dataclasses.dataclass(frozen=True)
class AdaptorConfig(Settings):
    """taps: backbone tap names, concatenated in this order (null: the backbone's taps, which the
    pipeline fills in). pool_size: odd local-average window (3 for PatchCore, 1 = none for PaDiM).
    resize: 'bilinear' (half-pixel centres like torch F.interpolate(align_corners=False),
    PatchCore) or 'nearest' (anomalib PaDiM). projection_dim: null keeps all channels; otherwise
    'random' (Gaussian projection) or 'subset' (random channel subset, the PaDiM paper), both seeded.
    grid_tap: the tap whose resolution the patch grid takes (null: the finest tap's). A finer tap is
    then averaged into it, each f x f block to its mean (whatever ``resize``: plain interpolation
    would keep one pixel or the centre of each block). This adds a stride-4 tap's detail to a
    stride-8 grid without 4x the patches."""

    section: ClassVar[str] = "model.head.adaptor"
    taps: tuple[str, ...] | None = None
    pool_size: int = setting(3, ge=1, odd=True)
    projection_dim: int | None = setting(None, ge=1)
    projection: Literal["random", "subset"] = "random"
    resize: Literal["bilinear", "nearest"] = "bilinear"
    seed: int = setting(0, ge=0, le=MAX_SEED)
    grid_tap: str | None = None

    def check(self) -> None:
        if self.taps is not None and not self.taps:
            self.fail("taps", "null or a non-empty list of backbone tap names")
        if self.taps is not None and len(set(self.taps)) != len(self.taps):
            self.fail("taps", f"distinct tap names (a repeated tap only repeats its channels), got {list(self.taps)}")
        if self.grid_tap is not None and self.taps is not None and self.grid_tap not in self.taps:
            self.fail("grid_tap", f"one of the taps {list(self.taps)} (or null: the finest)")


class FeatureAdaptor:
    """Backbone taps -> one (B, h, w, D) patch-feature map. ``FeatureAdaptor(AdaptorConfig(...))``
    or ``FeatureAdaptor(taps, pool_size=..., ...)``; the taps must be given (not null) here."""

    def __init__(self, taps: Sequence[str] | AdaptorConfig | None = None, **settings):
        config = taps if isinstance(taps, AdaptorConfig) else AdaptorConfig.from_dict(settings, taps=taps)
        if config.taps is None or isinstance(taps, str):
            raise ConfigError(f"model.head.adaptor.taps must be a non-empty list of backbone tap names, got {taps!r} "
                              f"(a null in the config means the backbone's taps: pass backbone.taps)")
        self.settings = config
        self.taps = config.taps

    @property
    def config(self) -> dict:
        """JSON-able settings (for the artifact): FeatureAdaptor(**config) rebuilds it."""
        return self.settings.to_dict()

    def init(self, channels: Mapping[str, int]) -> dict[str, np.ndarray]:
        """Projection parameters for a backbone with these channels per tap."""
        missing = [tap for tap in self.taps if tap not in channels]
        if missing:
            raise ConfigError(f"adaptor.taps {missing} are not backbone taps; available: {list(channels)}")
        total = sum(channels[tap] for tap in self.taps)
        dim, seed = self.settings.projection_dim, self.settings.seed
        if dim is None:
            return {}
        if dim > total:
            raise ConfigError(f"model.head.adaptor.projection_dim={dim} exceeds the {total} channels of taps "
                              f"{list(self.taps)}; lower it or set it to null")
        if self.settings.projection == "subset":
            order = np.random.default_rng(seed).permutation(total)
            return {"channels": np.sort(order[:dim]).astype(np.int32)}
        return {"matrix": random_projection(seed, total, dim)}

    def apply(self, params: Mapping[str, jax.Array], features: Mapping[str, jax.Array]) -> jax.Array:
        """Pure and jittable: features {tap: (B, h, w, C)} -> (B, h, w, D) float32."""
        missing = [tap for tap in self.taps if tap not in features]
        if missing:
            raise InputError(f"features lack the adaptor taps {missing}; got {list(features)}")
        maps = [average_pool(jnp.asarray(features[tap], jnp.float32), self.settings.pool_size) for tap in self.taps]
        grid = self.settings.grid_tap
        height, width = (maps[self.taps.index(grid)].shape[1:3] if grid is not None else
                         (max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)))
        maps = [_onto_grid(m, height, width, self.settings.resize) for m in maps]
        x = jnp.concatenate(maps, axis=-1)
        if "channels" in params:
            return jnp.take(x, params["channels"], axis=-1)
        if "matrix" in params:
            return jnp.einsum("bhwc,cd->bhwd", x, params["matrix"], precision="highest")
        return x


def _onto_grid(features: jax.Array, height: int, width: int, resize: str) -> jax.Array:
    """(B, h, w, C) onto the (height, width) grid: a finer map by an integer factor to the mean of
    each block (every position counts); otherwise plain interpolation like torch F.interpolate
    (antialias=False), as the coarser taps are enlarged."""
    batch, rows, cols, channels = features.shape
    if (rows, cols) == (height, width):
        return features
    if rows >= height and cols >= width and rows % height == 0 and cols % width == 0:
        blocks = features.reshape(batch, height, rows // height, width, cols // width, channels)
        return blocks.mean(axis=2).mean(axis=3)  # rows first: bit-identical to the bilinear halving it replaces
    return jax.image.resize(features, (batch, height, width, channels), resize, antialias=False)
