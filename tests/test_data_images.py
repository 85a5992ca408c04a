"""Image and mask files: modes, and clear errors naming the file."""

import numpy as np
import pytest
from PIL import Image

from anomax.data.images import read_image, read_mask, read_pair
from anomax.errors import DatasetError


def test_modes(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(read_image(tmp_path / "gray.png"), gray[..., None])
    assert np.array_equal(read_image(tmp_path / "rgba.png"), np.stack([gray] * 3, -1))
    assert np.array_equal(read_image(tmp_path / "deep.png"), gray[..., None])
    # an opaque alpha channel is not a defect; every pixel > 0 of a colour channel is
    assert np.array_equal(read_mask(tmp_path / "rgba.png"), gray > 0)
    assert read_mask(tmp_path / "gray.png").dtype == bool


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(DatasetError, match="cannot read image file .*text.png"):
        read_image(tmp_path / "text.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    with pytest.raises(DatasetError, match="cannot read image file .*cut.png"):
        read_image(tmp_path / "cut.png")


def test_mask_size_must_match_image(tmp_path):
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(DatasetError, match=r"mask .*mask.png has size 5x4 but its image .*image.png has 6x4"):
        read_pair(tmp_path / "image.png", tmp_path / "mask.png")
    image, mask = read_pair(tmp_path / "image.png", None)
    assert image.shape == (4, 6, 1) and mask.shape == (4, 6) and not mask.any()
