"""HALCON folder reading: labels, mask matching, list mode, manifest, registry."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomax.data.dataset import DLDataset, read_dataset, read_dl_dataset_anomaly, split_dl_dataset
from anomax.errors import ConfigError, DatasetError


def write(path: Path, value: int = 0, shape=(6, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write(images / "Good" / "a.png")
    write(images / "OK" / "b.png")
    write(images / "scratch" / "c.png")
    write(images / "scratch" / "d.png")
    write(images / "dent" / "sub" / "e.png")
    write(masks / "scratch" / "c.png", 255)  # exact stem
    write(masks / "dent" / "sub" / "e_mask.png", 255)  # <stem>_mask, nested sub-folder
    (masks / "scratch" / "notes.txt").write_text("not an image")
    return images, masks


def by_name(dataset):
    return {Path(s.image_file_name).name: s for s in dataset.samples}


def test_labels_and_mask_matching(folders):
    images, masks = folders
    dataset = read_dl_dataset_anomaly(images, masks)
    samples = by_name(dataset)
    assert {n: s.anomaly_label for n, s in samples.items()} == {
        "a.png": "ok",
        "b.png": "ok",
        "c.png": "nok",
        "d.png": "nok",
        "e.png": "nok",
    }
    assert {n: s.defect_type for n, s in samples.items()} == {
        "a.png": "good",
        "b.png": "good",
        "c.png": "scratch",
        "d.png": "scratch",
        "e.png": "dent",
    }
    assert samples["c.png"].anomaly_file_name == str(masks / "scratch" / "c.png")
    assert samples["e.png"].anomaly_file_name == str(masks / "dent" / "sub" / "e_mask.png")
    assert samples["d.png"].anomaly_file_name is None  # a defect image without a mask is allowed
    assert sorted(s.image_id for s in dataset.samples) == list(range(5))
    assert dataset.class_names == ["ok", "nok"] and dataset.class_ids == [0, 1] and not dataset.has_split


def test_images_outside_a_label_folder_are_left_out_with_a_warning(folders, caplog):
    images, masks = folders
    write(images / "loose.png")
    with caplog.at_level("WARNING", logger="anomax"):
        dataset = read_dl_dataset_anomaly(images, masks)
    assert "loose.png" not in by_name(dataset) and len(dataset.samples) == 5
    assert any("1 images lie directly in" in r.getMessage() and "loose.png" in r.getMessage() for r in caplog.records)


def test_hidden_files_and_folders_are_not_images_or_masks(folders, caplog):
    """macOS's AppleDouble ._x.png beside x.png, a .thumbnails folder: a system's files, not the user's."""
    images, masks = folders
    (images / "scratch" / "._c.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (masks / "scratch" / "._c.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write(images / ".thumbnails" / "a.png")
    with caplog.at_level("WARNING", logger="anomax"):
        dataset = read_dl_dataset_anomaly(images, masks)
    assert sorted(by_name(dataset)) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert {s.defect_type for s in dataset.samples} == {"good", "scratch", "dent"}
    assert any("skipped 1 hidden file" in r.getMessage() for r in caplog.records)


def test_an_anomaly_dir_inside_the_image_dir_is_not_a_defect_class(folders, caplog):
    images, masks = folders
    inside = images / "masks"
    masks.rename(inside)
    with caplog.at_level("WARNING", logger="anomax"):
        dataset = read_dl_dataset_anomaly(images, inside)
    assert len(dataset.samples) == 5 and "masks" not in {s.defect_type for s in dataset.samples}
    assert by_name(dataset)["c.png"].anomaly_file_name == str(inside / "scratch" / "c.png")
    assert any("are masks, not images" in r.getMessage() for r in caplog.records)


def test_an_empty_class_folder_and_masks_read_as_a_class_are_warned_of(folders, caplog):
    """Both were silent: an empty defect folder vanished, and a masks folder without anomaly_dir became a class."""
    images, masks = folders
    (images / "crack").mkdir()
    masks.rename(images / "masks")
    with caplog.at_level("WARNING", logger="anomax"):
        dataset = read_dl_dataset_anomaly(images)
    assert "masks" in {s.defect_type for s in dataset.samples}  # HALCON's rule: a folder is a class
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "without images are no class: crack" in messages and "named like a folder of masks" in messages


def test_exact_stem_wins_and_leftover_mask_is_an_error(folders):
    images, masks = folders
    write(masks / "scratch" / "c_mask.png", 255)  # c.png already matched by exact stem
    with pytest.raises(DatasetError, match="c_mask.png has no matching image"):
        read_dl_dataset_anomaly(images, masks)


def test_mask_without_image_is_an_error(folders):
    images, masks = folders
    write(masks / "scratch" / "zzz.png", 255)
    with pytest.raises(DatasetError, match="zzz.png has no matching image"):
        read_dl_dataset_anomaly(images, masks)


def test_mask_in_other_subfolder_does_not_match(folders):
    images, masks = folders
    write(masks / "dent" / "d.png", 255)  # d.png lives in scratch/, not dent/
    with pytest.raises(DatasetError, match="d.png has no matching image"):
        read_dl_dataset_anomaly(images, masks)


def test_ambiguous_masks_are_an_error(folders):
    images, masks = folders
    write(masks / "scratch" / "d.png", 255)
    write(masks / "scratch" / "d.bmp", 255)
    with pytest.raises(DatasetError, match="d.png matches several masks"):
        read_dl_dataset_anomaly(images, masks)


def test_one_mask_for_two_images_is_an_error(folders):
    images, masks = folders
    write(images / "scratch" / "c.bmp")
    with pytest.raises(DatasetError, match=r"masks.scratch.c.png matches several images"):
        read_dl_dataset_anomaly(images, masks)


def test_missing_directories_and_no_good_folder(tmp_path, folders):
    images, masks = folders
    with pytest.raises(DatasetError, match="image directory .*nowhere does not exist"):
        read_dl_dataset_anomaly(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="anomaly directory .*nomasks does not exist"):
        read_dl_dataset_anomaly(images, tmp_path / "nomasks")
    write(tmp_path / "bad" / "scratch" / "x.png")
    with pytest.raises(DatasetError, match=r"bad has no folder named 'good' or 'ok'"):
        read_dl_dataset_anomaly(tmp_path / "bad")


def test_list_mode(folders):
    images, masks = folders
    dataset = read_dl_dataset_anomaly(
        image_list=[images / "Good" / "a.png", images / "scratch" / "c.png"],
        anomaly_list=["", masks / "scratch" / "c.png"],
    )
    assert [(s.anomaly_label, s.defect_type, s.anomaly_file_name) for s in dataset.samples] == [
        ("ok", "good", None),
        ("nok", "scratch", str(masks / "scratch" / "c.png")),
    ]
    with pytest.raises(DatasetError, match="image_list has 2 entries but anomaly_list 1"):
        read_dl_dataset_anomaly(image_list=[images / "Good" / "a.png", images / "OK" / "b.png"], anomaly_list=[None])
    with pytest.raises(DatasetError, match="missing.png .*does not exist"):
        read_dl_dataset_anomaly(image_list=[images / "Good" / "missing.png"])
    with pytest.raises(ConfigError):
        read_dl_dataset_anomaly(images, image_list=[images / "Good" / "a.png"])


def test_manifest_round_trip(tmp_path, folders):
    dataset = read_dataset("folder", image_dir=folders[0], anomaly_dir=folders[1])
    dataset.samples[0].split = "train"
    dataset.to_json(tmp_path / "manifest.json")
    assert DLDataset.from_json(tmp_path / "manifest.json") == dataset
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json"):
        DLDataset.from_json(tmp_path / "broken.json")


def test_unknown_format_and_bad_arguments(folders):
    with pytest.raises(ConfigError, match="unknown dataset format 'nonsense'.*folder"):
        read_dataset("nonsense")
    with pytest.raises(ConfigError, match="'folder' does not accept"):
        read_dataset("folder", image_directory=folders[0])


def test_ok_image_with_defect_pixels_in_its_mask_is_refused(folders):
    images, masks = folders
    write(masks / "Good" / "a.png", 0)  # an empty mask for a good image is fine
    assert by_name(read_dl_dataset_anomaly(images, masks))["a.png"].anomaly_file_name is not None
    Image.fromarray(np.pad(np.full((1, 1), 255, np.uint8), ((2, 3), (4, 3)))).save(masks / "Good" / "a.png")
    with pytest.raises(DatasetError, match=r"image .*Good.a.png is labelled ok but its mask .*Good.a.png has 1 "
                                           r"defect pixel"):
        read_dl_dataset_anomaly(images, masks)
    with pytest.raises(DatasetError, match=r"a.png is labelled ok but its mask"):
        read_dl_dataset_anomaly(image_list=[images / "Good" / "a.png"], anomaly_list=[masks / "Good" / "a.png"])


def test_broken_symlinks_in_a_dataset_are_skipped_and_logged(folders, caplog):
    images, _ = folders
    (images / "Good" / "gone.png").symlink_to(images / "nowhere.png")
    with caplog.at_level("INFO", logger="anomax"):
        dataset = read_dl_dataset_anomaly(images)
    assert len(dataset.samples) == 5
    assert any("skipped 1 dangling symlink" in r.getMessage() for r in caplog.records)


def test_pixel_ground_truth_is_known(folders):
    images, masks = folders
    assert read_dl_dataset_anomaly(images, masks).has_pixel_ground_truth
    assert not read_dl_dataset_anomaly(images).has_pixel_ground_truth


def test_a_saved_config_records_absolute_paths_and_keeps_empty_masks(tmp_path, monkeypatch):
    from anomax.data.dataset import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths({"format": "folder", "image_list": ["d/ok/a.png", "d/crack/c.png"],
                               "anomaly_list": ["", "m/crack/c.png"], "anomaly_dir": None})
    assert cfg["image_list"] == [str(tmp_path / "d/ok/a.png"), str(tmp_path / "d/crack/c.png")]
    assert cfg["anomaly_list"] == ["", str(tmp_path / "m/crack/c.png")] and cfg["anomaly_dir"] is None
    visa = with_absolute_paths({"format": "visa", "root": "visa", "split_csv": "split_csv/1cls.csv"})
    assert visa == {"format": "visa", "root": str(tmp_path / "visa"), "split_csv": "split_csv/1cls.csv"}


def test_mask_arguments_of_the_other_mode_are_refused(folders):
    images, masks = folders
    with pytest.raises(ConfigError, match="anomaly_list goes with image_list"):
        read_dl_dataset_anomaly(images, anomaly_list=[masks / "scratch" / "c.png"])
    with pytest.raises(ConfigError, match="anomaly_dir goes with image_dir"):
        read_dl_dataset_anomaly(anomaly_dir=masks, image_list=[images / "scratch" / "c.png"])


def test_list_mode_refuses_a_repeated_image_and_warns_of_folders_under_good(folders, caplog):
    images, _ = folders
    with pytest.raises(DatasetError, match=r"image .*c.png of the folder dataset is the same file as .*c.png"):
        read_dl_dataset_anomaly(image_list=[images / "scratch" / "c.png", images / "Good" / "a.png",
                                            images / "scratch" / ".." / "scratch" / "c.png"])
    nested = write(images / "Good" / "side" / "f.png")
    with caplog.at_level("WARNING", logger="anomax"):
        dataset = read_dl_dataset_anomaly(image_list=[images / "Good" / "a.png", nested])
    assert [s.defect_type for s in dataset.samples] == ["good", "side"]  # as documented: its own folder
    assert any("sub-folder of a good/ok folder" in r.getMessage() and "'side'" in r.getMessage()
               for r in caplog.records)


def test_mask_sizes_and_jpeg_masks_are_checked_when_the_dataset_is_read(folders, caplog):
    """A mask of another size than its image fails at reading, before any fit spends time; a JPEG mask
    (its compression marks pixels around every edge) is warned of."""
    images, masks = folders
    with caplog.at_level("WARNING", logger="anomax"):
        (masks / "scratch" / "c.png").unlink()
        square = np.zeros((6, 8), np.uint8)
        square[2:4, 3:5] = 255
        Image.fromarray(square).save(masks / "scratch" / "c.jpg", quality=75)
        read_dl_dataset_anomaly(images, masks)
    assert any("the folder dataset has 1 JPEG mask" in r.getMessage() for r in caplog.records)
    write(masks / "scratch" / "d.png", 255, shape=(6, 7))
    with pytest.raises(DatasetError, match=r"mask .*d.png has size 7x6 but its image .*d.png has 8x6"):
        read_dl_dataset_anomaly(images, masks)


def test_a_symlinked_image_an_unreadable_mask_and_masks_in_the_image_folder_are_refused(folders):
    """An image linked under a second name would be drawn into two splits (trained on, tested on); an
    unreadable mask is named when the dataset is read, not when its image is scored after the fit; masks
    in the image folder itself would make every image a mask."""
    images, masks = folders
    (images / "Good" / "z.png").symlink_to(images / "Good" / "a.png")
    with pytest.raises(DatasetError, match=r"image .*z.png of the folder dataset is the same file as .*a.png"):
        read_dl_dataset_anomaly(images, masks)
    (images / "Good" / "z.png").unlink()
    (masks / "scratch" / "c.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*masks.scratch.c.png"):
        read_dl_dataset_anomaly(images, masks)
    for anomaly_dir in (images, images.parent):
        with pytest.raises(ConfigError, match="masks need a folder of their own"):
            read_dl_dataset_anomaly(images, anomaly_dir)


def test_a_float_mask_with_nan_pixels_is_refused(tmp_path):
    from anomax.data.images import read_mask

    Image.fromarray(np.array([[np.nan, 0], [0, 1]], np.float32)).save(tmp_path / "mask.tif")
    with pytest.raises(DatasetError, match=r"mask .*mask.tif has non-finite pixels"):
        read_mask(tmp_path / "mask.tif")


def test_a_missing_argument_is_named_and_a_bad_manifest_is_a_dataset_error(tmp_path, folders):
    with pytest.raises(ConfigError, match=r"'mvtec_ad' needs \['dataset.category'\]"):
        read_dataset("mvtec_ad", root=str(tmp_path))
    for content in ('"x"', "5", "null", '{"manifest_version": 1, "samples": [{"image_id": 0, "image_file_name": '
                                         '"a.png", "anomaly_label": "bad", "defect_type": "good"}], "format": "f"}'):
        (tmp_path / "manifest.json").write_text(content)
        with pytest.raises(DatasetError, match="cannot read the dataset manifest .*manifest.json"):
            DLDataset.from_json(tmp_path / "manifest.json")


@pytest.mark.parametrize("call, key", [
    (lambda d: split_dl_dataset(d, "70", 15), "training_percent"),
    (lambda d: split_dl_dataset(d, 70, True), "validation_percent"),
    (lambda d: split_dl_dataset(d, 50, 25, seed=-1), "seed"),
    (lambda d: split_dl_dataset(d, 50, 25, seed=1.5), "seed"),
])
def test_split_arguments_of_a_wrong_type_name_their_key(folders, call, key):
    with pytest.raises(ConfigError, match=f"{key} must be"):
        call(read_dl_dataset_anomaly(folders[0]))
