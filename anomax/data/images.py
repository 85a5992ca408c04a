"""Reading image and mask files, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomax.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file {path} does not exist; check the dataset paths")
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte, so a truncated file fails here and not later
            return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image file {path} ({error}); replace or remove the file") from None


def read_image(path: str | Path) -> np.ndarray:
    """The image as uint8 (H, W, C) with C = 1 (gray) or 3 (colour); 16-bit images are scaled to 8 bits."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float64)
        return np.round(np.clip(gray / 257.0, 0, 255)).astype(np.uint8)[..., None]
    if image.mode in ("1", "L", "LA", "F"):
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """The ground-truth mask as bool (H, W): every pixel > 0 in any channel is a defect."""
    image = _open(path)
    if image.mode in ("RGBA", "LA", "PA", "P"):
        image = image.convert("RGB")  # an opaque alpha channel must not mark every pixel as defect
    mask = np.asarray(image)
    return mask.any(axis=-1) if mask.ndim == 3 else mask > 0


def read_pair(image_path: str | Path, mask_path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask (all False without a mask file); their sizes must agree."""
    image = read_image(image_path)
    if mask_path is None:
        return image, np.zeros(image.shape[:2], bool)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"mask {mask_path} has size {mask.shape[1]}x{mask.shape[0]} but its image {image_path} has "
            f"{image.shape[1]}x{image.shape[0]} (width x height); the mask must match its image"
        )
    return image, mask
