"""Geometric augmentation: more good images at fit time, and test-time augmentation (TTA) at scoring.

Transforms are the exact, lossless symmetries of a pixel grid (flips, 90° rotations, transpose),
so a map computed on a transformed image is brought back onto the original pixels exactly by the
inverse transform. Which ones are right depends on the part: a solar cell looks the same flipped or
rotated, a screw seen from the side does not, so none is on by default.

- ``fit``: every good training image is also fitted in each listed transform (the head sees
  (1 + len(fit)) x the images).
- ``tta``: an image's anomaly maps are the mean, over the identity and each listed transform, of
  the maps of the transformed image with the transform undone; its scores are the mean of the
  scores. Costs (1 + len(tta)) x the inference.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Literal, Mapping

import jax
import jax.numpy as jnp

from anomax.errors import ConfigError
from anomax.settings import Settings

Transform = Literal["hflip", "vflip", "rot90", "rot180", "rot270", "transpose"]
SWAPS_AXES = ("rot90", "rot270", "transpose")  # height and width trade places: square inputs only
INVERSE = {"identity": "identity", "hflip": "hflip", "vflip": "vflip", "rot90": "rot270", "rot180": "rot180",
           "rot270": "rot90", "transpose": "transpose"}


def transform(images: jax.Array, name: str) -> jax.Array:
    """``images`` (B, H, W[, C]) in the named transform; rotations are counter-clockwise."""
    if name == "identity":
        return images
    if name == "hflip":
        return images[:, :, ::-1]
    if name == "vflip":
        return images[:, ::-1]
    if name in ("rot90", "rot180", "rot270"):
        return jnp.rot90(images, k=int(name[3:]) // 90, axes=(1, 2))
    if name == "transpose":
        return jnp.swapaxes(images, 1, 2)
    raise ConfigError(f"unknown transform {name!r}; known: {', '.join(INVERSE)}")


def undo(maps: jax.Array, name: str) -> jax.Array:
    """The inverse of ``transform(·, name)``: undo(transform(x, t), t) == x exactly."""
    return transform(maps, INVERSE[name])


@dataclasses.dataclass(frozen=True)
class AugmentConfig(Settings):
    """fit: transforms of the good training images fitted besides the originals. tta: transforms
    whose undone maps are averaged with the original's at scoring. Each of hflip, vflip, rot90,
    rot180, rot270, transpose; rot90, rot270 and transpose need square inputs."""

    section: ClassVar[str] = "augment"
    fit: tuple[Transform, ...] = ()
    tta: tuple[Transform, ...] = ()

    def check(self) -> None:
        for key in ("fit", "tta"):
            if len(set(getattr(self, key))) != len(getattr(self, key)):
                self.fail(key, "a list of distinct transforms")

    def check_input(self, height: int, width: int) -> None:
        """Transforms that swap height and width need a square input (the maps keep one shape)."""
        for key in ("fit", "tta"):
            swapping = [t for t in getattr(self, key) if t in SWAPS_AXES]
            if swapping and height != width:
                raise ConfigError(f"augment.{key} = {list(getattr(self, key))}: {', '.join(swapping)} need square "
                                  f"inputs, but preprocess is {width} x {height}; use flips and rot180, or "
                                  f"make preprocess.width = preprocess.height")


def mean_over_transforms(score: Callable[[jax.Array], Mapping[str, jax.Array]], images: jax.Array,
                   transforms: tuple[str, ...]) -> dict[str, jax.Array]:
    """Pure: the mean over the identity and ``transforms`` of ``score(transform(images))`` with maps
    (B, H, W) undone and per-image values (B,) as they are. No transforms: ``score(images)``."""
    if not transforms:
        return dict(score(images))
    outputs = []
    for name in ("identity", *transforms):
        out = score(transform(images, name))
        outputs.append({key: undo(value, name) if value.ndim == 3 else value for key, value in out.items()})
    return {key: jnp.mean(jnp.stack([out[key] for out in outputs]), axis=0) for key in outputs[0]}
