"""An MVTec-AD-like dataset from scikit-image's real textures with drawn defects and exact masks.

``<root>/<texture>/train/good``, ``test/good``, ``test/<defect>`` and
``ground_truth/<defect>/<name>_mask.png``; read it with ``read_dataset('mvtec_ad', root=root,
category=texture)``. The same arguments give the same files, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomax.errors import ConfigError

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "hole", "stain", "patch")


def make_synthetic_dataset(
    root: str | Path,
    *,
    size: int = 64,
    n_train: int = 16,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    textures: tuple[str, ...] = ("brick",),
    defects: tuple[str, ...] = DEFECTS,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` and return ``root``.

    Each image is a random crop (a quarter to half of the 512 px texture) resized to ``size``;
    the ``n_test_defect`` defective images per texture cycle through ``defects``.
    """
    unknown = sorted(set(textures) - set(TEXTURES)) + sorted(set(defects) - set(DEFECTS))
    if unknown or not textures or not defects:
        raise ConfigError(f"unknown or no textures/defects {unknown}; choose from {list(TEXTURES)} and {list(DEFECTS)}")
    if size < 16:
        raise ConfigError(f"synthetic 'size' must be at least 16 pixels to hold a defect, got {size}")
    root = Path(root)
    for texture_index, texture in enumerate(textures):
        rng = np.random.default_rng([seed, texture_index])
        source = _load_texture(texture)
        donor = _load_texture(TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)])  # pasted patches
        folder = root / texture
        for i in range(n_train):
            _save(_crop(source, size, rng), folder / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(_crop(source, size, rng), folder / "test" / "good" / f"{i:03d}.png")
        for i in range(n_test_defect):
            defect = defects[i % len(defects)]
            image, mask = DRAW[defect](_crop(source, size, rng), rng, _crop(donor, size, rng))
            name = f"{i // len(defects):03d}"
            _save(image, folder / "test" / defect / f"{name}.png")
            _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{name}_mask.png")
    return root


def _load_texture(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("the synthetic dataset needs scikit-image: pip install scikit-image") from None
    return getattr(skimage.data, name)()


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(texture.shape[0] // 4, texture.shape[0] // 2 + 1))
    row, col = rng.integers(0, texture.shape[0] - side + 1), rng.integers(0, texture.shape[1] - side + 1)
    crop = Image.fromarray(texture[row : row + side, col : col + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX))


def _shape_mask(size: int, draw) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _point(rng: np.random.Generator, size: int, margin: float = 0.15) -> tuple[int, int]:
    low, high = int(margin * size), int((1 - margin) * size)
    return int(rng.integers(low, high)), int(rng.integers(low, high))


def _contrasting(image: np.ndarray, mask: np.ndarray) -> int:
    """A gray value far from the texture under the defect, so the defect is visible."""
    return 15 if image[mask].mean() > 127 else 240


def _scratch(image, rng, donor):
    size = image.shape[0]
    start, end = _point(rng, size), _point(rng, size)
    while np.hypot(end[0] - start[0], end[1] - start[1]) < size / 3:
        end = _point(rng, size)
    width = max(1, size // 32)
    mask = _shape_mask(size, lambda d: d.line([start, end], fill=255, width=width))
    return np.where(mask, _contrasting(image, mask), image).astype(np.uint8), mask


def _hole(image, rng, donor):
    size = image.shape[0]
    (x, y), (rx, ry) = _point(rng, size, 0.25), rng.integers(size // 16, size // 6, 2)
    mask = _shape_mask(size, lambda d: d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255))
    return np.where(mask, 10, image).astype(np.uint8), mask


def _stain(image, rng, donor):
    size = image.shape[0]
    (x, y), radius = _point(rng, size, 0.25), size / 8
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = radius * rng.uniform(0.6, 1.4, 9)
    polygon = [(x + r * np.cos(a), y + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
    mask = _shape_mask(size, lambda d: d.polygon(polygon, fill=255))
    tinted = 0.4 * image + 0.6 * _contrasting(image, mask)  # translucent: the texture shows through
    return np.where(mask, tinted, image).astype(np.uint8), mask


def _patch(image, rng, donor):
    size = image.shape[0]
    (x, y), (half_w, half_h) = _point(rng, size, 0.25), rng.integers(size // 10, size // 5, 2)
    mask = _shape_mask(size, lambda d: d.rectangle([x - half_w, y - half_h, x + half_w, y + half_h], fill=255))
    return np.where(mask, donor, image).astype(np.uint8), mask


DRAW = {"scratch": _scratch, "hole": _hole, "stain": _stain, "patch": _patch}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
