"""Dataset formats through the registry, and the synthetic MVTec-like generator."""

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomax.data.dataset import read_dataset
from anomax.data.images import read_image, read_mask
from anomax.errors import ConfigError, DatasetError

pytest.importorskip("skimage")
from anomax.data.synthetic import make_synthetic_dataset  # noqa: E402


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), size=32, n_train=3, n_test_good=2, n_test_defect=4, seed=5
    )


def test_synthetic_is_deterministic_with_exact_masks(synthetic, tmp_path):
    assert digest(
        make_synthetic_dataset(tmp_path / "again", size=32, n_train=3, n_test_good=2, n_test_defect=4, seed=5)
    ) == digest(synthetic)
    assert digest(
        make_synthetic_dataset(tmp_path / "other", size=32, n_train=3, n_test_good=2, n_test_defect=4, seed=6)
    ) != digest(synthetic)
    for defect in ("scratch", "hole", "stain", "patch"):
        image = read_image(synthetic / "brick" / "test" / defect / "000.png")[..., 0].astype(int)
        mask = read_mask(synthetic / "brick" / "ground_truth" / defect / "000_mask.png")
        assert image.shape == (32, 32) and 0 < mask.mean() < 0.5
        if defect == "patch":  # a pasted rectangle of another texture
            rows, cols = np.nonzero(mask)
            assert mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        else:  # drawn in a gray value far from the texture around it
            assert abs(image[mask].mean() - image[~mask].mean()) > 30


def test_an_unknown_synthetic_texture_names_its_key_before_a_folder_is_made(tmp_path):
    from anomax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.texture = 'bricks' is invalid: it must be one of \['brick'"):
        read_dataset("synthetic", texture="bricks", root=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_mvtec_ad(synthetic):
    dataset = read_dataset("mvtec_ad", root=synthetic, category="brick")
    assert Counter((s.split, s.anomaly_label) for s in dataset.samples) == {
        ("train", "ok"): 3,
        ("test", "ok"): 2,
        ("test", "nok"): 4,
    }
    assert all(
        s.anomaly_file_name.endswith(f"ground_truth/{s.defect_type}/000_mask.png")
        for s in dataset.samples
        if s.anomaly_label == "nok"
    )
    held = read_dataset("mvtec_ad", root=synthetic, category="brick", validation_from_train=0.3)
    assert Counter(s.split for s in held.samples) == {"train": 2, "validation": 1, "test": 6}
    with pytest.raises(DatasetError, match=r"category folder .*carpet does not exist; categories in .*\['brick'\]"):
        read_dataset("mvtec_ad", root=synthetic, category="carpet")
    with pytest.raises(DatasetError, match=r"MVTec AD root .*nowhere does not exist; dataset.root"):
        read_dataset("mvtec_ad", root=str(Path(synthetic) / "nowhere"), category="carpet")


def test_visa_csv(synthetic, tmp_path):
    rows = [
        "object,split,label,image,mask",
        "brick,train,normal,brick/train/good/000.png,",
        "brick,test,normal,brick/test/good/000.png,",
        "brick,test,anomaly,brick/test/hole/000.png,brick/ground_truth/hole/000_mask.png",
        "other,train,normal,brick/train/good/001.png,",
    ]
    (synthetic / "split.csv").write_text("\n".join(rows))
    dataset = read_dataset("visa", root=synthetic, split_csv="split.csv", category="brick")
    assert [(s.split, s.anomaly_label, s.anomaly_file_name is not None) for s in dataset.samples] == [
        ("train", "ok", False),
        ("test", "ok", False),
        ("test", "nok", True),
    ]
    assert len(read_dataset("visa", root=synthetic, split_csv="split.csv").samples) == 4
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column read as '\ufeffobject' was "missing"
    (synthetic / "bom.csv").write_text("\n".join(rows), encoding="utf-8-sig")
    assert len(read_dataset("visa", root=synthetic, split_csv="bom.csv", category="brick").samples) == 3
    with pytest.raises(DatasetError, match=r"no rows for category 'brik'; its categories: \['brick', 'other'\]"):
        read_dataset("visa", root=synthetic, split_csv="split.csv", category="brik")
    (synthetic / "bad.csv").write_text("object,split,label,image,mask\nbrick,train,normal,brick/none.png,\n")
    with pytest.raises(DatasetError, match="none.png of the visa dataset does not exist"):
        read_dataset("visa", root=synthetic, split_csv="bad.csv")
    with pytest.raises(DatasetError, match="nothere.csv does not exist"):
        read_dataset("visa", root=synthetic, split_csv="nothere.csv")
    (synthetic / "short.csv").write_text("object,split,label,image,mask\nbrick,train,normal\n")
    with pytest.raises(DatasetError, match="short.csv line 2 has fewer fields than the header"):
        read_dataset("visa", root=synthetic, split_csv="short.csv")


@pytest.mark.realdata
@pytest.mark.parametrize("cell_type, counts", [("mono", (411, 177, 313)), ("poly", (644, 276, 402))])
def test_elpv_protocol_counts(cell_type, counts):
    pytest.importorskip("elpv_dataset")
    dataset = read_dataset("elpv", cell_type=cell_type)
    found = Counter((s.split, s.anomaly_label) for s in dataset.samples)
    assert (found[("train", "ok")], found[("test", "ok")], found[("test", "nok")]) == counts
    first = dataset.samples[0].image_file_name
    assert Path(first).is_file() and Image.open(first).size == (300, 300)
    held = read_dataset("elpv", cell_type=cell_type, validation_from_train=0.1)
    held_counts = Counter(s.split for s in held.samples)
    assert (
        held_counts["validation"] == int(0.1 * counts[0])
        and held_counts["train"] + held_counts["validation"] == counts[0]
    )


def test_mvtec_without_ground_truth_says_only_image_metrics_exist(synthetic, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic / "brick", copy / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    assert read_dataset("mvtec_ad", root=synthetic, category="brick").has_pixel_ground_truth
    with caplog.at_level("INFO", logger="anomax"):
        dataset = read_dataset("mvtec_ad", root=copy, category="brick")
    assert not dataset.has_pixel_ground_truth
    notes = [r.getMessage() for r in caplog.records if "ground_truth" in r.getMessage()]
    assert len(notes) == 1 and "4 defective images have no masks" in notes[0] and "image-level" in notes[0]


def test_defective_or_repeated_images_of_an_own_split_are_refused(synthetic, tmp_path):
    """A defective image in MVTec AD's train/ or a VisA 'train' row would train (or, held out, pass for
    a good validation image); an image on two VisA rows would be trained on and tested on."""
    rows = ["object,split,label,image,mask", "brick,train,normal,brick/train/good/000.png,",
            "brick,test,anomaly,brick/test/hole/000.png,"]
    (synthetic / "defect_in_train.csv").write_text("\n".join([*rows, "brick,train,anomaly,brick/test/patch/000.png,"]))
    with pytest.raises(DatasetError, match=r"image .*patch.000.png of the visa dataset is defective but in its train"):
        read_dataset("visa", root=synthetic, split_csv="defect_in_train.csv")
    (synthetic / "twice.csv").write_text("\n".join([*rows, "brick,test,normal,brick/train/good/000.png,"]))
    with pytest.raises(DatasetError, match=r"image .*good.000.png of the visa dataset is the same file as"):
        read_dataset("visa", root=synthetic, split_csv="twice.csv")
    (synthetic / "empty.csv").write_text("object, split, label, image, mask\n")  # spaces after the commas too
    with pytest.raises(DatasetError, match="empty.csv has a header but no rows"):
        read_dataset("visa", root=synthetic, split_csv="empty.csv")
    copy = tmp_path / "copy"
    shutil.copytree(synthetic, copy)
    shutil.copytree(copy / "brick" / "test" / "hole", copy / "brick" / "train" / "hole")
    with pytest.raises(DatasetError, match=r"image .*train.hole.000.png of the mvtec_ad dataset is defective"):
        read_dataset("mvtec_ad", root=copy, category="brick", validation_from_train=0.3)
    with pytest.raises(ConfigError, match=r"validation_from_train must be a number"):
        read_dataset("mvtec_ad", root=synthetic, category="brick", validation_from_train="0.5")


@pytest.mark.parametrize("key, value", [("n_test_good", 0), ("size", 64.5), ("size", "32"),
                                        ("defect_area", 0.01), ("seed", 1.5)])
def test_synthetic_arguments_it_cannot_generate_name_their_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"dataset.{key} must be"):
        read_dataset("synthetic", root=str(tmp_path), **{key: value})
    assert not any(tmp_path.iterdir())
