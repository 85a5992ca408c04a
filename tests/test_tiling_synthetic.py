"""Synthetic small-defect data for tiling benchmarks: dataset.defect_area sizes the texture defects."""
import numpy as np
import pytest

from anomax.data.dataset import read_dataset
from anomax.data.images import read_image, read_mask
from anomax.data.synthetic import make_synthetic_dataset
from anomax.errors import ConfigError


def test_defects_cover_the_requested_fraction_of_the_image(tmp_path):
    low, high = 0.001, 0.004
    dataset = read_dataset("synthetic", root=str(tmp_path), size=512, n_train=1, n_test_good=1, n_test_defect=8,
                           defect_area=[low, high], validation_from_train=0.0)
    masks = [read_mask(s.anomaly_file_name) for s in dataset.samples if s.anomaly_label == "nok"]
    assert len(masks) == 8 and {m.shape for m in masks} == {(512, 512)}
    fractions = np.array([m.mean() for m in masks])
    assert (fractions > 0.5 * low).all() and (fractions < 1.5 * high).all(), fractions


def test_without_defect_area_the_files_are_unchanged(tmp_path):
    """The default keeps the generator's output byte for byte (and its cache folder name)."""
    make_synthetic_dataset(tmp_path / "a", size=32, n_train=1, n_test_good=1, n_test_defect=4, seed=3)
    make_synthetic_dataset(tmp_path / "b", size=32, n_train=1, n_test_good=1, n_test_defect=4, seed=3,
                           defect_area=None)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.parametrize("area, textures, match", [
    ((0.01, 0.001), ("brick",), "0 < low <= high < 1"), ((0.0, 0.1), ("brick",), "0 < low"),
    ((0.1,), ("brick",), "low, high"), ((0.001, 0.01), ("parts",), "parts")])
def test_bad_defect_areas_are_refused(tmp_path, area, textures, match):
    with pytest.raises(ConfigError, match=match):
        make_synthetic_dataset(tmp_path, size=64, n_train=1, n_test_good=1, n_test_defect=1, textures=textures,
                               defect_area=area)


def _detail(image: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: what upscaling smooths away."""
    image = np.squeeze(image).astype(float)
    return (np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean()) / 2


def test_large_images_carry_the_texture_at_full_resolution(tmp_path):
    """Above the texture's own 512 px an image shows the texture at 1:1 (mirror-tiled), so it has the
    texture's pixel-level detail; the upscaled crop used before (8-16x at 2048 px) had about a tenth of it."""
    import skimage.data

    dataset = read_dataset("synthetic", root=str(tmp_path), size=2048, n_train=3, n_test_good=1, n_test_defect=1,
                           defect_area=[0.0001, 0.001], validation_from_train=0.0)
    good = [read_image(s.image_file_name) for s in dataset.samples if s.anomaly_label == "ok"]
    assert len(good) == 4 and {g.shape for g in good} == {(2048, 2048, 1)}
    ratios = np.array([_detail(g) for g in good]) / _detail(skimage.data.brick())
    assert ((ratios > 0.9) & (ratios < 1.1)).all(), ratios
    assert len({g.tobytes() for g in good}) == 4  # a fresh offset per image
