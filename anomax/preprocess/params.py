"""Preprocess parameters (HALCON's ``create_dl_preprocess_param``) and the pure per-image functions.

Order, as in HALCON: domain (crop or keep) → channels (1 ↔ 3) → resize → normalisation.
This runs per image in the data loader, so numpy and PIL serve; nothing here is jitted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

from anomax.errors import ConfigError, InputError
from anomax.settings import Settings, setting

RESIZE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "area": Image.Resampling.BOX}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PreprocessParams(Settings):
    """Validated, hashable preprocess parameters (HALCON's names); build them with
    ``create_dl_preprocess_param``.

    ``domain`` is a box ``(row1, col1, row2, col2)`` in original-image pixels, inclusive, or the
    path of a mask image (pixels > 0 inside); ``crop_domain`` crops to it (a mask to its bounding
    box), ``keep_domain`` keeps the size and sets image and ground truth to 0 outside it.
    """

    section: ClassVar[str] = "preprocess"
    width: int = setting(256, ge=1)
    height: int = setting(256, ge=1)
    num_channels: Literal[1, 3] = 3
    range_min: float = -127.0
    range_max: float = 128.0
    normalization_type: Literal["none", "all_channels", "first_channel", "constant_values"] = "none"
    # the per-image stretches' ends: the image's p-th and (100 - p)-th percentile gray values instead of
    # its darkest and brightest (p = 0, HALCON's); values beyond them stay beyond, not clipped
    stretch_percentile: float = setting(0.0, ge=0.0, lt=50.0)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    domain_handling: Literal["full_domain", "crop_domain", "keep_domain"] = "full_domain"
    domain: tuple[int, ...] | str | None = None
    resize: Literal["bilinear", "area"] = "bilinear"

    def check(self) -> None:
        if self.range_min >= self.range_max:
            self.fail("range_max", f"greater than range_min = {self.range_min}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if self.normalization_type == "constant_values" and len(values) not in (1, self.num_channels):
                self.fail(key, f"1 or num_channels = {self.num_channels} values")
        if self.stretch_percentile > 0 and self.normalization_type not in ("all_channels", "first_channel"):
            self.fail("stretch_percentile", f"0 unless normalization_type is all_channels or first_channel "
                                            f"(the per-image stretches), got normalization_type={self.normalization_type}")
        if any(s <= 0 for s in self.std):
            self.fail("std", "a list of positive numbers")
        object.__setattr__(self, "domain", _checked_domain(self.domain, self.domain_handling))


def create_dl_preprocess_param(**kwargs) -> PreprocessParams:
    """Preprocess parameters from keyword arguments; an unknown key is a ConfigError."""
    if isinstance(kwargs.get("domain"), os.PathLike):  # a mask file, given as a Path
        kwargs["domain"] = os.fspath(kwargs["domain"])
    return PreprocessParams.from_dict(kwargs)


def preprocess_image(params: PreprocessParams, image: np.ndarray) -> np.ndarray:
    """uint8 image (H, W) or (H, W, C) → float32 (height, width, num_channels) model input."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise InputError(f"preprocess_image needs a uint8 image (H, W, 1|3), got {image.dtype} {image.shape}")
    image = _convert_channels(crop_to_domain(params, image), params.num_channels)
    channels = [_resize(channel, params, RESIZE_FILTERS[params.resize]) for channel in np.moveaxis(image, -1, 0)]
    if params.domain_handling != "keep_domain":
        return _normalize(params, np.stack(channels, axis=-1)).astype(np.float32)
    inside = _resize(_domain_inside(params, image.shape[:2]).astype(np.float32), params, Image.Resampling.NEAREST) > 0
    normalized = _normalize(params, np.stack(channels, axis=-1), inside)  # what lies outside sets no contrast
    return np.where(inside[..., None], normalized, 0.0).astype(np.float32)


def pixel_scale(params: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 per channel (or one for all): a model input is ``pixels * scale +
    offset`` with the pixels in [0, 1], as resized (the per-image stretches: as stretched), so that
    augmentations defined on pixels (efficientad's colour jitter) can work on model inputs."""
    if params.normalization_type == "constant_values":
        mean, std = np.asarray(params.mean, np.float32), np.asarray(params.std, np.float32)
        return 1.0 / std, -mean / std
    return np.float32(params.range_max - params.range_min), np.float32(params.range_min)


def preprocess_mask(params: PreprocessParams, mask: np.ndarray) -> np.ndarray:
    """Ground-truth mask (H, W), nonzero = defect → uint8 {0, 1} (height, width), nearest resize."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"preprocess_mask needs a mask (H, W), got shape {mask.shape}")
    mask = crop_to_domain(params, (mask != 0).astype(np.float32))
    if params.domain_handling == "keep_domain":
        mask = mask * _domain_inside(params, mask.shape)  # at the input size: nearest resizing follows
    return (_resize(mask, params, Image.Resampling.NEAREST) > 0).astype(np.uint8)


def crop_to_domain(params: PreprocessParams, array: np.ndarray) -> np.ndarray:
    """The part of an image (or mask) that the model sees: its domain box with 'crop_domain',
    the whole array otherwise. Anomaly maps cover this part, so pictures draw them over it."""
    if params.domain_handling != "crop_domain":
        return array
    row1, col1, row2, col2 = domain_box(params, array.shape[:2])
    return array[row1 : row2 + 1, col1 : col2 + 1]


def domain_box(params: PreprocessParams, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    if isinstance(params.domain, str):
        inside = _read_domain_mask(params.domain, shape)  # not empty: checked there
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))  # np.nonzero: 100x slower
        return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])
    row1, col1, row2, col2 = params.domain
    if row2 >= shape[0] or col2 >= shape[1]:
        raise InputError(
            f"preprocess 'domain' box {params.domain} lies outside the {shape[0]}x{shape[1]} (rows x cols) image"
        )
    return params.domain


def _domain_inside(params: PreprocessParams, shape: tuple[int, int]) -> np.ndarray:
    """The 'keep_domain' region of an input image of ``shape``, bool."""
    if isinstance(params.domain, str):
        return _read_domain_mask(params.domain, shape)
    row1, col1, row2, col2 = domain_box(params, shape)
    inside = np.zeros(shape, bool)
    inside[row1 : row2 + 1, col1 : col2 + 1] = True
    return inside


@functools.lru_cache(maxsize=8)
def _read_domain_mask_file(path: str, version: tuple | None) -> np.ndarray:
    """Cached by the file's version too (modification and change times, inode, size): a mask edited in
    place is read again, also when its modification time was set back (the change time cannot be)."""
    from anomax.data.images import read_mask  # images is data I/O; only a mask domain needs it

    return read_mask(path)


def _read_domain_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    try:
        status = os.stat(path)
    except OSError:
        status = None  # read_mask names the missing file
    version = status and (status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_size)
    inside = _read_domain_mask_file(path, version)
    if inside.shape != tuple(shape):
        raise InputError(f"domain mask {path} is {inside.shape} (rows, cols) but the image is {tuple(shape)}")
    if not inside.any():
        raise InputError(f"domain mask {path} is empty; it must mark the region of interest with pixels > 0")
    return inside


def _convert_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
    if image.shape[-1] == num_channels:
        return image
    if num_channels == 3:
        return np.repeat(image, 3, axis=-1)
    return np.asarray(Image.fromarray(image).convert("L"))[..., None]  # ITU-R 601-2 luma


def _resize(channel: np.ndarray, params: PreprocessParams, resample) -> np.ndarray:
    if channel.shape == (params.height, params.width):
        return channel.astype(np.float32)
    resized = Image.fromarray(channel.astype(np.float32)).resize((params.width, params.height), resample)
    return np.asarray(resized)


def _normalize(params: PreprocessParams, image: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """``inside`` (bool, the image's height and width): the pixels the per-image stretches are taken on."""
    low, high = params.range_min, params.range_max
    if params.normalization_type == "none":
        return image / 255.0 * (high - low) + low
    if params.normalization_type == "constant_values":
        return (image / 255.0 - np.asarray(params.mean, np.float32)) / np.asarray(params.std, np.float32)
    reference = image if params.normalization_type == "all_channels" else image[..., 0]
    if inside is not None and inside.any():  # (a domain too small to survive the resize leaves all zeros anyway)
        reference = reference[inside]
    minimum, maximum = reference.min(), reference.max()
    if params.stretch_percentile > 0:  # robust ends: a few very bright or dark pixels do not set the scale
        low_end, high_end = np.percentile(reference, (params.stretch_percentile, 100 - params.stretch_percentile))
        if high_end > low_end:  # else a uniform part with a small spot: keep min/max, or the spot is lost
            minimum, maximum = low_end, high_end
    if maximum == minimum:  # a flat image has no contrast to stretch
        return np.full_like(image, low)
    return (image - minimum) / (maximum - minimum) * (high - low) + low


def _checked_domain(domain, domain_handling: str):
    if domain_handling == "full_domain":
        if domain is not None:
            raise ConfigError("preprocess 'domain' is only used with domain_handling 'crop_domain' or 'keep_domain'")
        return None
    if isinstance(domain, (str, Path)):
        if not Path(domain).is_file():
            raise ConfigError(f"preprocess 'domain' mask file {domain} does not exist")
        return str(Path(domain).absolute())
    if (
        isinstance(domain, (tuple, list))
        and len(domain) == 4
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in domain)
        and 0 <= domain[0] <= domain[2]
        and 0 <= domain[1] <= domain[3]
    ):
        return tuple(int(v) for v in domain)
    raise ConfigError(
        f"preprocess 'domain' must be a box (row1, col1, row2, col2) with 0 <= row1 <= row2, 0 <= col1 <= col2, "
        f"or a mask file, for domain_handling '{domain_handling}'; got {domain!r}"
    )
