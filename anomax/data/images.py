"""Reading image and mask files, with errors that name the file.

``MAX_IMAGE_PIXELS`` (default 150,000,000; set the environment variable ANOMAX_MAX_IMAGE_PIXELS,
or the module constant at run time) refuses larger images before they are decoded: a 24 KB PNG
can declare 14000 x 14000 pixels. PIL's own guard (a warning above its limit, an error above
twice it) is raised to this limit when lower, for anomax's own reads only, so PIL never refuses what
anomax allows.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomax._global_state import WhileInside
from anomax.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".gif"})
PIXEL_LIMIT_VARIABLE = "ANOMAX_MAX_IMAGE_PIXELS"

log = logging.getLogger("anomax")


def _pixel_limit_from_environment(default: int = 150_000_000) -> int:
    text = os.environ.get(PIXEL_LIMIT_VARIABLE, str(default))
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{PIXEL_LIMIT_VARIABLE} must be a positive integer, got {text!r}")
    return limit


MAX_IMAGE_PIXELS = _pixel_limit_from_environment()


def _too_large(path: Path, detail: str) -> DatasetError:
    return DatasetError(
        f"image file {path} {detail}, more than the limit of {MAX_IMAGE_PIXELS:,} pixels (a guard against "
        f"decompression bombs); if the image is genuine, raise the limit with the environment variable "
        f"{PIXEL_LIMIT_VARIABLE}"
    )


def _raise_pil_limit():
    """PIL's own bomb guard raised to anomax's limit while anomax opens or decodes an image (a compressed
    TIFF checks it again when it decodes), then put back: the host application may rely on it."""
    saved = Image.MAX_IMAGE_PIXELS
    if saved is not None and saved < MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return lambda: setattr(Image, "MAX_IMAGE_PIXELS", saved)


_pil_limit = WhileInside(_raise_pil_limit)


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file {path} does not exist; check the dataset paths")
    try:
        with _pil_limit, Image.open(path) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _too_large(path, f"has {width}x{height} = {width * height:,} pixels")
            image.load()  # decodes every byte, so a truncated file fails here and not later
            return image
    except Image.DecompressionBombError as error:
        raise _too_large(path, f"is too large ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image file {path} ({error}); replace or remove the file") from None


class _Tally:
    """The images read since the last report that were converted one way (reads run in threads)."""

    def __init__(self, message: str):
        self.message = message  # %-format of (context, count, plural s, example)
        self._lock = threading.Lock()
        self.count, self.example = 0, None

    def add(self, path: Path) -> None:
        with self._lock:
            self.count += 1
            self.example = self.example or path

    def take(self) -> tuple[int, Path | None]:
        with self._lock:
            taken = self.count, self.example
            self.count, self.example = 0, None
            return taken


_TALLIES = (
    _dropped_alpha := _Tally("%s: %d image%s had an alpha channel, which anomax drops (it uses the colour "
                             "channels only), e.g. %s"),
    # 12-bit (or 10-bit) camera data saved as 16 bits: 0..4095 scaled by 1/257 keeps 17 gray levels
    _narrow_16_bit := _Tally("%s: %d 16-bit image%s used only values below 4096 (e.g. %s), which anomax, reading "
                             "0..65535 as 0..255, keeps as at most 17 gray levels; scale 12- or 10-bit data to the "
                             "full 16-bit range (e.g. multiply by 16) or to 8 bits before training and applying"),
)


def log_conversions(context: str) -> None:
    """Log once per kind, with the count, the conversions of the images read since the last call."""
    for tally in _TALLIES:
        count, example = tally.take()
        if count:
            log.warning(tally.message, context, count, "s" * (count != 1), example)


def read_image(path: str | Path) -> np.ndarray:
    """The image as uint8 (H, W, C) with C = 1 (gray) or 3 (colour); 16-bit images are scaled to 8 bits
    (0..65535 to 0..255). An alpha channel (or transparency) is dropped, and a 16-bit image using only
    values below 4096 (12-bit data, which keeps 17 gray levels) is counted, for ``log_conversions``."""
    image = _open(path)
    if image.has_transparency_data:
        _dropped_alpha.add(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image, dtype=np.float64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):  # mode I holds 32-bit integers
            raise DatasetError(f"image {path} holds 32-bit integer pixels ({gray.min():.0f}..{gray.max():.0f}) "
                               "outside 0..65535, whose value range anomax cannot know; save it as an 8- or "
                               "16-bit image")
        if gray.size and 0 < gray.max() < 4096:
            _narrow_16_bit.add(Path(path))
        return np.round(np.clip(gray / 257.0, 0, 255)).astype(np.uint8)[..., None]
    if image.mode == "F":  # converting would clip to 0..255: a [0, 1] image would come out black and white
        raise DatasetError(f"image {path} holds 32-bit float pixels, whose value range anomax cannot know; "
                           "save it as an 8- or 16-bit image")
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """The ground-truth mask as bool (H, W): every pixel > 0 in any channel is a defect. With an
    alpha channel, a transparent pixel is never a defect (and an opaque alpha marks nothing). A
    palette mask is read by colour (non-black = defect) when its used entries are distinct colours
    and one is black, as a drawn mask converted to a palette is (black may sit at any index);
    otherwise by its stored indices (> 0 = defect), as a label array saved with a palette is (its
    palette may draw every index black, or index 0 white)."""
    image = _open(path)
    if image.mode in ("P", "PA"):
        indices = np.asarray(image.getchannel("P"))
        palette = np.asarray(image.getpalette() or [0, 0, 0], np.uint8).reshape(-1, 3)
        used = np.unique(indices)
        colours = palette[used] if used.max() < len(palette) else None
        by_colour = (colours is not None and len(np.unique(colours, axis=0)) == len(used)
                     and bool((colours == 0).all(axis=1).any()))
        mask = palette[indices].any(axis=-1) if by_colour else indices > 0
        return mask & (np.asarray(image.getchannel("A")) > 0) if image.mode == "PA" else mask
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):  # their raw channels mark black as > 0 (CMYK's K = 255)
        image = image.convert("RGB")
    mask = np.asarray(image)
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():  # NaN > 0 is False: it would read as no defect
        raise DatasetError(f"mask {path} has non-finite pixels (NaN or infinity); a mask marks defects with values > 0")
    if image.mode in ("RGBA", "LA"):
        return mask[..., :-1].any(axis=-1) & (mask[..., -1] > 0)
    return mask.any(axis=-1) if mask.ndim == 3 else mask > 0


def image_shape(path: str | Path) -> tuple[int, int]:
    """(rows, cols) of an image file from its header alone (cheap: nothing is decoded), under anomax's
    pixel limit; an unreadable header is a DatasetError naming the file."""
    try:
        with _pil_limit, Image.open(path) as image:
            return image.height, image.width
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path} ({error}); check the dataset paths") from None


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


_UNLISTABLE = {errno.ELOOP: ("symlink loop", "symlink loops"), errno.ENOENT: ("dangling symlink", "dangling symlinks")}


def list_files(folder: str | Path, suffixes: frozenset[str] | set[str] | None = None) -> list[Path]:
    """The files under ``folder``, recursively and sorted, optionally only those with ``suffixes``
    (lower case). Symlinked folders are followed; hidden files and folders (names starting with
    '.'), files without one of ``suffixes``, dangling symlinks, symlink loops, a folder reached again
    through a symlink and unreadable folders are skipped, each kind logged once with its count."""
    files: list[Path] = []
    skipped: dict[tuple[str, str], list[Path]] = {}  # (singular, plural) -> paths
    seen: set[tuple[int, int]] = set()

    def skip(kind: tuple[str, str], path: Path) -> None:
        skipped.setdefault(kind, []).append(path)

    def unreadable(error: OSError) -> None:
        skip(("unreadable folder", "unreadable folders"), Path(error.filename))

    for root, folders, names in os.walk(folder, followlinks=True, onerror=unreadable):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:  # a link back to an ancestor, or a second link to a folder
            skip(("folder reached again through a symlink", "folders reached again through symlinks"), Path(root))
            folders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        # hidden entries are a system's, not the user's: macOS's ._x.png beside x.png, .thumbnails/
        for hidden in [f for f in folders if f.startswith(".")]:
            skip(("hidden folder", "hidden folders"), Path(root) / hidden)
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith("."):
                if suffixes is None or path.suffix.lower() in suffixes:
                    skip(("hidden file", "hidden files"), path)
                continue
            if suffixes is not None and path.suffix.lower() not in suffixes:
                skip(("file without an image suffix", "files without an image suffix"), path)
                continue
            try:
                os.stat(path)
            except OSError as error:
                skip(_UNLISTABLE.get(error.errno, ("unreadable file", "unreadable files")), path)
                continue
            if path.is_file():
                files.append(path)
    for (singular, plural), paths in skipped.items():
        log.warning("%s: skipped %d %s (e.g. %s)", folder, len(paths), singular if len(paths) == 1 else plural,
                    min(paths))
    return sorted(files)
