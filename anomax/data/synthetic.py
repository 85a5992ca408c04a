"""An MVTec-AD-like dataset from scikit-image's real textures with drawn defects and exact masks.

``<root>/<category>/train/good``, ``test/good``, ``test/<defect>`` and
``ground_truth/<defect>/<name>_mask.png``; read it with ``read_dataset('mvtec_ad', root=root,
category=category)``. The same arguments give the same files, byte for byte.

Categories: the textures (``brick``, ``grass``, ``gravel``) with structural defects, and
``parts``, whose rule is global (logical anomalies, as in MVTec LOCO): every good image shows
exactly ``PARTS_COUNT`` parts of one shared colour at random, non-overlapping positions and
angles. Its defects break the rule while each patch stays normal (``too_few``, ``too_many``,
``mismatched``: one part in another palette colour), plus one structural defect (``scratch``
on a part). Because the layout is random, a missing or extra part cannot be found by comparing
positions with the training images: only a model of the whole image sees it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomax.errors import ConfigError

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "hole", "stain", "patch")
PARTS = "parts"
PARTS_DEFECTS = ("too_few", "too_many", "mismatched", "scratch")
PARTS_COUNT = 3
PARTS_VERSION = 1  # of the parts generator's output
TEXTURE_SIDE = 512  # of scikit-image's textures; larger images tile them at 1:1 instead of upscaling a crop
LARGE_VERSION = 2  # of texture images larger than TEXTURE_SIDE (1 was an upscaled crop)
# Saturated colours far apart and from the gray background; every one appears in good images.
PALETTE = ((220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 30), (200, 60, 200))


def make_synthetic_dataset(
    root: str | Path,
    *,
    size: int = 64,
    n_train: int = 16,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    textures: tuple[str, ...] = ("brick",),
    defects: tuple[str, ...] | None = None,
    seed: int = 0,
    defect_area: tuple[float, float] | None = None,
) -> Path:
    """Write the dataset under ``root`` and return ``root``.

    Each texture image up to the texture's own size (512 px) is a random crop (a quarter to half of
    the texture) resized to ``size``; a larger one shows the texture at its own scale, mirror-tiled
    from a random offset, so it carries full-resolution detail instead of an 8-16x upscale. Each
    ``parts`` image is a fresh random layout. The ``n_test_defect`` defective images
    per category cycle through ``defects`` (None: all of the category's defects).
    ``defect_area`` (low, high): each texture defect covers about a fraction of the image drawn
    uniformly from that range (e.g. (0.0001, 0.001) for small-defect benchmarks on large images);
    None keeps the defects' own sizes (a few percent of the image).
    """
    known = {**{texture: DEFECTS for texture in TEXTURES}, PARTS: PARTS_DEFECTS}
    unknown = sorted(set(textures) - set(known))
    unknown += sorted({d for t in textures if t in known for d in (defects or ())} - set().union(
        *(known[t] for t in textures if t in known)))
    if unknown or not textures or defects == ():
        raise ConfigError(f"unknown or no categories/defects {unknown}; choose categories from {list(known)}, "
                          f"defects from {list(DEFECTS)} (textures) or {list(PARTS_DEFECTS)} (parts)")
    chosen = {t: [d for d in (defects or known[t]) if d in known[t]] for t in textures}
    if n_test_defect and (without := [t for t in textures if not chosen[t]]):
        raise ConfigError(f"synthetic 'defects' {list(defects)} has none for the categories {without}; add one of "
                          f"theirs ({list(DEFECTS)} for textures, {list(PARTS_DEFECTS)} for parts) or leave them out")
    if size < 16 or (PARTS in textures and size < 32):
        raise ConfigError(f"synthetic 'size' must be at least 16 pixels (32 for parts) to hold a defect, got {size}")
    if defect_area is not None:
        if len(defect_area) != 2 or not 0 < defect_area[0] <= defect_area[1] < 1:
            raise ConfigError(f"synthetic 'defect_area' must be [low, high] fractions of the image with "
                              f"0 < low <= high < 1, got {defect_area!r}")
        if PARTS in textures:
            raise ConfigError("synthetic 'defect_area' sizes the texture defects; the parts category's defects are "
                              "whole parts: leave defect_area null for it")
    root = Path(root)
    for texture_index, texture in enumerate(textures):
        rng = np.random.default_rng([seed, texture_index])
        if texture == PARTS:
            _write_parts(root / PARTS, rng, size, n_train, n_test_good, n_test_defect, chosen[PARTS])
            continue
        texture_defects = chosen[texture]
        source = _load_texture(texture)
        donor = _load_texture(TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)])  # pasted patches
        folder = root / texture
        for i in range(n_train):
            _save(_crop(source, size, rng), folder / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(_crop(source, size, rng), folder / "test" / "good" / f"{i:03d}.png")
        for i in range(n_test_defect):
            defect = texture_defects[i % len(texture_defects)]
            image, donor_image = _crop(source, size, rng), _crop(donor, size, rng)
            area = None if defect_area is None else rng.uniform(*defect_area) * size * size  # in pixels
            image, mask = DRAW[defect](image, rng, donor_image, area)
            name = f"{i // len(texture_defects):03d}"
            _save(image, folder / "test" / defect / f"{name}.png")
            _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{name}_mask.png")
    return root


def _load_texture(name: str) -> np.ndarray:
    import skimage.data  # here: slow to import, and only texture datasets need it

    return getattr(skimage.data, name)()


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if size > TEXTURE_SIDE:  # no crop reaches this size without upscaling: use the texture at 1:1
        return _mirror_tiled(texture, size, rng)
    side = int(rng.integers(texture.shape[0] // 4, texture.shape[0] // 2 + 1))
    row, col = rng.integers(0, texture.shape[0] - side + 1), rng.integers(0, texture.shape[1] - side + 1)
    crop = Image.fromarray(texture[row : row + side, col : col + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BOX))


def _mirror_tiled(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size window, at a random offset, of the plane tiled with the texture and its mirror
    images: neighbouring copies meet edge to their own reflection, so no intensity step appears at the
    joins (line structures form mirror-symmetric V shapes there, as in every image). Period: 2 sides."""
    def indices(length: int) -> np.ndarray:
        period = 2 * length
        steps = (int(rng.integers(period)) + np.arange(size)) % period
        return np.where(steps < length, steps, period - 1 - steps)

    rows, cols = indices(texture.shape[0]), indices(texture.shape[1])
    return texture[rows[:, None], cols[None, :]]


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


def _aspect(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))


def _scratch(image, rng, donor, area=None):
    size = image.shape[0]
    if area is None:
        start, end = _point(rng, size), _point(rng, size)
        while np.hypot(end[0] - start[0], end[1] - start[1]) < size / 3:
            end = _point(rng, size)
        width = max(1, size // 32)
    else:  # a stroke of about `area` pixels, about 12 times as long as wide
        width = max(1, round(np.sqrt(area / 12)))
        (x, y), angle = _point(rng, size, 0.25), rng.uniform(0, np.pi)
        half = 0.5 * area / width * np.array([np.cos(angle), np.sin(angle)])
        start, end = (x - half[0], y - half[1]), (x + half[0], y + half[1])
    mask = _shape_mask(size, lambda d: d.line([start, end], fill=255, width=width))
    return np.where(mask, _contrasting(image, mask), image).astype(np.uint8), mask


def _hole(image, rng, donor, area=None):
    size = image.shape[0]
    if area is None:
        (x, y), (rx, ry) = _point(rng, size, 0.25), rng.integers(size // 16, size // 6, 2)
    else:  # an ellipse of area pi rx ry = area
        (x, y), aspect = _point(rng, size, 0.25), _aspect(rng)
        rx = np.sqrt(area / (np.pi * aspect))
        ry = aspect * rx
    mask = _shape_mask(size, lambda d: d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255))
    return np.where(mask, 10, image).astype(np.uint8), mask


def _stain(image, rng, donor, area=None):
    size = image.shape[0]
    (x, y), radius = _point(rng, size, 0.25), size / 8 if area is None else np.sqrt(area / np.pi)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = radius * rng.uniform(0.6, 1.4, 9)
    polygon = [(x + r * np.cos(a), y + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
    mask = _shape_mask(size, lambda d: d.polygon(polygon, fill=255))
    tinted = 0.4 * image + 0.6 * _contrasting(image, mask)  # translucent: the texture shows through
    return np.where(mask, tinted, image).astype(np.uint8), mask


def _patch(image, rng, donor, area=None):
    size = image.shape[0]
    if area is None:
        (x, y), (half_w, half_h) = _point(rng, size, 0.25), rng.integers(size // 10, size // 5, 2)
    else:  # a rectangle of about `area` pixels
        (x, y), aspect = _point(rng, size, 0.25), _aspect(rng)
        half_w = 0.5 * np.sqrt(area * aspect)
        half_h = 0.25 * area / half_w
    mask = _shape_mask(size, lambda d: d.rectangle([x - half_w, y - half_h, x + half_w, y + half_h], fill=255))
    return np.where(mask, donor, image).astype(np.uint8), mask


DRAW = {"scratch": _scratch, "hole": _hole, "stain": _stain, "patch": _patch}


# ---- parts: a global rule (count and shared colour) ------------------------------------------

def _write_parts(folder: Path, rng: np.random.Generator, size: int, n_train: int, n_test_good: int,
                 n_test_defect: int, defects) -> None:
    for split, count in (("train", n_train), ("test", n_test_good)):
        for i in range(count):
            _save(parts_sample(rng, size)[0], folder / split / "good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        defect = defects[i % len(defects)]
        image, mask, _ = parts_sample(rng, size, defect)
        name = f"{i // len(defects):03d}"
        _save(image, folder / "test" / defect / f"{name}.png")
        _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{name}_mask.png")


def parts_sample(rng: np.random.Generator, size: int, defect: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``parts`` image (size, size, 3) uint8, its defect mask (size, size) bool and the good
    image of the same layout it was made from (equal to the image when ``defect`` is None).
    The mask is exactly the pixels the defect changed: the removed, added or recoloured part,
    or the scratch on a part."""
    if defect is not None and defect not in PARTS_DEFECTS:
        raise ConfigError(f"unknown parts defect {defect!r}; choose from {list(PARTS_DEFECTS)}")
    colour = int(rng.integers(len(PALETTE)))
    # One layout slot more than needed: 'too_many' places the extra part without overlap.
    poses = _layout(rng, size, PARTS_COUNT + 1)
    good_parts = [(pose, colour) for pose in poses[:PARTS_COUNT]]
    noise_seed = int(rng.integers(2**31))
    good = _render(good_parts, size, noise_seed)
    parts, scratch = list(good_parts), None

    def footprint(pose):
        return _shape_mask(size, lambda d: d.polygon(_outline(pose, size), fill=255))

    mask = np.zeros((size, size), bool)
    if defect == "too_few":
        mask = footprint(parts.pop(int(rng.integers(PARTS_COUNT)))[0])
    elif defect == "too_many":
        parts.append((poses[PARTS_COUNT], colour))
        mask = footprint(poses[PARTS_COUNT])
    elif defect == "mismatched":
        index = int(rng.integers(PARTS_COUNT))
        other = (colour + 1 + int(rng.integers(len(PALETTE) - 1))) % len(PALETTE)
        parts[index] = (parts[index][0], other)
        mask = footprint(parts[index][0])
    elif defect == "scratch":
        pose = parts[int(rng.integers(PARTS_COUNT))][0]
        angle = pose[2] + rng.uniform(-0.3, 0.3)  # along the part, clipped to it below
        half = 0.5 * _part_length(size)
        ends = [(pose[0] + sign * half * np.cos(angle), pose[1] + sign * half * np.sin(angle)) for sign in (-1, 1)]
        scratch = mask = _shape_mask(size, lambda d: d.line(ends, fill=255, width=max(2, size // 40))) & footprint(pose)
    image = good if defect is None else _render(parts, size, noise_seed, scratch)
    return image, mask, good


def _part_length(size: int) -> float:
    return 0.26 * size


def _outline(pose: tuple[float, float, float], size: int) -> list[tuple[float, float]]:
    """A 'screw': an oblong body with a wider head at one end, so its angle shows."""
    x, y, angle = pose
    length, body, head = _part_length(size), 0.06 * size, 0.11 * size
    local = [(-length / 2, -body), (length / 4, -body), (length / 4, -head), (length / 2, -head),
             (length / 2, head), (length / 4, head), (length / 4, body), (-length / 2, body)]
    cos, sin = np.cos(angle), np.sin(angle)
    return [(x + u * cos - v * sin, y + u * sin + v * cos) for u, v in local]


def _layout(rng: np.random.Generator, size: int, count: int) -> list[tuple[float, float, float]]:
    """``count`` poses (x, y, angle) whose parts lie inside the image and never touch."""
    reach = 0.5 * np.hypot(_part_length(size), 0.22 * size)  # circumradius of a part
    for _ in range(1000):
        poses: list[tuple[float, float, float]] = []
        for _ in range(200):
            x, y = rng.uniform(reach + 1, size - reach - 1, 2)
            if all(np.hypot(x - px, y - py) > 2 * reach + 2 for px, py, _ in poses):
                poses.append((float(x), float(y), float(rng.uniform(0, 2 * np.pi))))
                if len(poses) == count:
                    return poses
    raise ConfigError(f"cannot place {count} parts without overlap in {size} px images")


def _render(parts, size: int, noise_seed: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Gray background with mild noise; each part filled with its palette colour, lit by the same
    noise; the scratch dark."""
    noise = np.random.default_rng(noise_seed).normal(0, 6, (size, size, 1))
    image = np.full((size, size, 3), 128.0) + noise
    for pose, colour in parts:
        inside = _shape_mask(size, lambda d, pose=pose: d.polygon(_outline(pose, size), fill=255))
        image[inside] = np.asarray(PALETTE[colour], float) + noise[inside]
    if scratch is not None:
        image[scratch] = 20.0 + noise[scratch]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
