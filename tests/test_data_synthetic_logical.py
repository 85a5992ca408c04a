"""The synthetic 'parts' category: a global rule (count, shared colour) and defects that break it."""
import hashlib

import numpy as np
import pytest

from anomax.data.dataset import read_dataset
from anomax.data.images import read_image, read_mask
from anomax.data.synthetic import PALETTE, PARTS_COUNT, PARTS_DEFECTS, make_synthetic_dataset, parts_sample
from anomax.errors import ConfigError

SIZE = 48


def part_pixels(image: np.ndarray) -> np.ndarray:
    """Pixels of some part: far from the gray background in some channel."""
    return np.abs(image.astype(int) - 128).max(axis=-1) > 50


def count_parts(image: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(part_pixels(image))[1]


def colours(image: np.ndarray) -> set[int]:
    """Palette indices present (nearest palette colour of each coloured part pixel, not the dark
    scratch; a few strays ignored)."""
    pixels = image[part_pixels(image) & (image.max(axis=-1) > 150)].astype(float)
    nearest = np.argmin(((pixels[:, None] - np.asarray(PALETTE, float)) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(PALETTE))
    return {int(i) for i in np.flatnonzero(counts > 20)}


@pytest.mark.parametrize("defect", PARTS_DEFECTS)
def test_mask_covers_exactly_the_changed_pixels(defect):
    for seed in range(3):
        image, mask, good = parts_sample(np.random.default_rng(seed), SIZE, defect)
        assert mask.any()
        np.testing.assert_array_equal(mask, np.any(image != good, axis=-1))


def test_good_images_follow_the_rule_and_defects_break_it():
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, mask, good = parts_sample(rng, SIZE)
        assert not mask.any() and (image == good).all()
        assert count_parts(image) == PARTS_COUNT and len(colours(image)) == 1
    expected = {"too_few": PARTS_COUNT - 1, "too_many": PARTS_COUNT + 1, "mismatched": PARTS_COUNT,
                "scratch": PARTS_COUNT}
    for defect, count in expected.items():
        image, mask, good = parts_sample(rng, SIZE, defect)
        assert count_parts(image) == count, defect
        assert len(colours(image)) == (2 if defect == "mismatched" else 1), defect
        if defect in ("too_few", "too_many", "mismatched"):  # a whole part: one component of a part's size
            changed = good if defect == "too_few" else image
            assert (part_pixels(changed)[mask]).all() and count_parts(np.where(mask[..., None], changed, 128)) == 1
        else:  # a scratch lies inside a part
            assert part_pixels(good)[mask].all() and mask.sum() < part_pixels(good).sum() / PARTS_COUNT


def digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()


def test_dataset_is_deterministic_and_reads_as_mvtec(tmp_path):
    kwargs = dict(size=SIZE, n_train=3, n_test_good=2, n_test_defect=4, textures=("parts",))
    first = make_synthetic_dataset(tmp_path / "a", seed=1, **kwargs)
    assert digest(first) == digest(make_synthetic_dataset(tmp_path / "b", seed=1, **kwargs))
    assert digest(first) != digest(make_synthetic_dataset(tmp_path / "c", seed=2, **kwargs))
    dataset = read_dataset("mvtec_ad", root=first, category="parts")
    defective = [s for s in dataset.samples if s.anomaly_label == "nok"]
    assert sorted(s.defect_type for s in defective) == sorted(PARTS_DEFECTS)
    for sample in defective:
        mask = read_mask(sample.anomaly_file_name)
        assert mask.shape == (SIZE, SIZE) and mask.any()
        assert read_image(sample.image_file_name).shape == (SIZE, SIZE, 3)


def test_the_format_generates_parts_and_textures_keep_their_defects(tmp_path):
    dataset = read_dataset("synthetic", texture="parts", size=SIZE, n_train=2, n_test_good=1, n_test_defect=4,
                           validation_from_train=0.0, root=str(tmp_path))
    assert {s.defect_type for s in dataset.samples if s.anomaly_label == "nok"} == set(PARTS_DEFECTS)
    textures = make_synthetic_dataset(tmp_path / "t", size=32, n_train=1, n_test_good=1, n_test_defect=4)
    assert sorted(p.name for p in (textures / "brick" / "test").iterdir()) == ["good", "hole", "patch", "scratch",
                                                                               "stain"]
    with pytest.raises(ConfigError, match="too_few"):
        make_synthetic_dataset(tmp_path / "x", textures=("brick",), defects=("too_few",))
    with pytest.raises(ConfigError, match="parts"):
        make_synthetic_dataset(tmp_path / "y", textures=("parts",), size=16)
    # a category none of the chosen defects belong to (a ZeroDivisionError before)
    with pytest.raises(ConfigError, match=r"has none for the categories \['brick'\]"):
        make_synthetic_dataset(tmp_path / "z", textures=("brick", "parts"), defects=("too_few",))
    mixed = make_synthetic_dataset(tmp_path / "m", textures=("brick", "parts"), defects=("too_few", "hole"), size=32,
                                   n_train=1, n_test_good=1, n_test_defect=2)
    assert [sorted(p.name for p in (mixed / t / "test").iterdir()) for t in ("brick", "parts")] == [
        ["good", "hole"], ["good", "too_few"]]
