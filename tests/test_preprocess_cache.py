"""The TFDS array_record cache and the grain batches: round trip, reuse, invalidation, interruption."""

import os
from pathlib import Path
import sys

import numpy as np
import pytest

import anomax.preprocess.cache as cache
from anomax.data.dataset import read_dataset
from anomax.data.images import read_pair
from anomax.errors import ConfigError, DatasetError
from anomax.preprocess.cache import cache_path, is_cached, iterate_batches, num_batches
from anomax.preprocess.params import create_dl_preprocess_param, preprocess_image, preprocess_mask

pytest.importorskip("skimage")
from anomax.data.synthetic import make_synthetic_dataset  # noqa: E402

PARAMS = create_dl_preprocess_param(width=16, height=12, normalization_type="constant_values")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), size=24, n_train=3, n_test_good=1, n_test_defect=4, seed=1
    )
    return read_dataset("mvtec_ad", root=root, category="brick")


def direct(dataset, split, params):
    """The expected arrays, preprocessed one sample at a time without grain or TFDS."""
    pairs = [read_pair(s.image_file_name, s.anomaly_file_name) for s in dataset.samples_of(split)]
    return np.stack([preprocess_image(params, i) for i, _ in pairs]), np.stack(
        [preprocess_mask(params, m) for _, m in pairs]
    )


def stacked(batches):
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_batches_have_fixed_shapes_and_padding(dataset):
    batches = iterate_batches(dataset, "test", PARAMS, 2)
    assert len(batches) == num_batches(dataset, "test", 2) == 3
    listed = list(batches)
    for batch in listed:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "image": ((2, 12, 16, 3), np.float32),
            "mask": ((2, 12, 16), np.uint8),
            "label": ((2,), np.int32),
            "valid": ((2,), np.bool_),
            "index": ((2,), np.int32),
        }
    everything = stacked(listed)
    assert everything["valid"].tolist() == [True] * 5 + [False]
    assert everything["index"][:5].tolist() == list(range(5)) and everything["label"][:5].tolist() == [0, 1, 1, 1, 1]
    images, masks = direct(dataset, "test", PARAMS)
    np.testing.assert_array_equal(everything["image"][:5], images)
    np.testing.assert_array_equal(everything["mask"][:5], masks)
    assert masks[1:].any(axis=(1, 2)).all()  # every defect image keeps its defect after resizing


def test_shuffle_is_a_seeded_permutation(dataset):
    def order(seed):
        return stacked(list(iterate_batches(dataset, "test", PARAMS, 4, shuffle=True, seed=seed)))["index"][:5].tolist()

    assert sorted(order(0)) == list(range(5)) and order(0) == order(0)
    assert len({tuple(order(seed)) for seed in range(4)}) > 1


def test_cache_round_trip_and_reuse(dataset, tmp_path, monkeypatch):
    cached = stacked(list(iterate_batches(dataset, "test", PARAMS, 3, cache_dir=tmp_path)))
    on_the_fly = stacked(list(iterate_batches(dataset, "test", PARAMS, 3)))
    for key in on_the_fly:
        np.testing.assert_array_equal(cached[key], on_the_fly[key])
        assert cached[key].dtype == on_the_fly[key].dtype
    assert is_cached(dataset, "test", PARAMS, tmp_path)

    def must_not_run(*args):
        raise AssertionError("a complete cache must be read, not written again")

    monkeypatch.setattr(cache, "preprocess_image", must_not_run)
    again = stacked(list(iterate_batches(dataset, "test", PARAMS, 3, cache_dir=tmp_path, shuffle=True)))
    np.testing.assert_array_equal(again["image"][again["valid"]], cached["image"][again["index"][again["valid"]]])
    assert "tensorflow" not in sys.modules  # TFDS writes and reads the cache without TensorFlow


def test_a_split_larger_than_the_tfds_write_buffer_is_stored_in_parts(dataset, tmp_path, monkeypatch):
    """TFDS spills a split larger than its in-memory buffer to files through TensorFlow (not installed)."""
    from tensorflow_datasets.core import shuffle as tfds_shuffle

    record_bytes = PARAMS.height * PARAMS.width * (4 * PARAMS.num_channels + 1)
    monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 5 * record_bytes)  # buffer of 5: parts of 2
    cached = stacked(list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path, progress="score")))
    stored = cache_path(dataset, "test", PARAMS, tmp_path).glob("*/*/*.array_record-*")
    assert sorted({path.name.split(".")[0] for path in stored}) == [f"preprocessed_split-part{i}" for i in range(3)]
    np.testing.assert_array_equal(cached["index"][:5], np.arange(5))
    np.testing.assert_array_equal(cached["image"][:5], direct(dataset, "test", PARAMS)[0])
    assert "tensorflow" not in sys.modules
    huge = create_dl_preprocess_param(**(PARAMS.to_dict() | {"width": 64}))
    with pytest.raises(ConfigError, match="64 x 12 x 3 makes .* MiB per image"):
        iterate_batches(dataset, "test", huge, 2, cache_dir=tmp_path)


def test_checking_and_building_a_cache_leave_no_temporary_folders(dataset, tmp_path, monkeypatch):
    """TFDS's public-bucket lookup made an empty /tmp/tmp*tfds folder per builder and left it."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert not is_cached(dataset, "train", PARAMS, tmp_path / "cache")
    list(iterate_batches(dataset, "train", PARAMS, 2, cache_dir=tmp_path / "cache"))
    assert is_cached(dataset, "train", PARAMS, tmp_path / "cache")
    assert list(scratch.iterdir()) == []


def test_changed_params_or_files_make_a_new_cache(dataset, tmp_path):
    iterate_batches(dataset, "train", PARAMS, 2, cache_dir=tmp_path)
    wider = create_dl_preprocess_param(**(PARAMS.to_dict() | {"width": 20}))
    assert cache_path(dataset, "train", wider, tmp_path) != cache_path(dataset, "train", PARAMS, tmp_path)
    assert not is_cached(dataset, "train", wider, tmp_path)
    assert next(iter(iterate_batches(dataset, "train", wider, 2, cache_dir=tmp_path)))["image"].shape == (2, 12, 20, 3)
    assert len(list(tmp_path.iterdir())) == 2
    first = dataset.samples_of("train")[0].image_file_name
    os.utime(first, ns=(0, 0))  # new times alone keep the cache: it is keyed on content
    assert is_cached(dataset, "train", PARAMS, tmp_path)


def test_interrupted_write_is_not_a_cache(dataset, tmp_path, monkeypatch):
    calls = []

    def crash_on_third(params, image):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while writing")
        return preprocess_image(params, image)

    monkeypatch.setattr(cache, "preprocess_image", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path))
    assert not is_cached(dataset, "test", PARAMS, tmp_path)
    monkeypatch.undo()
    cached = stacked(list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path)))
    np.testing.assert_array_equal(cached["image"][:5], direct(dataset, "test", PARAMS)[0])


def test_bad_requests(dataset, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        iterate_batches(dataset, "test", PARAMS, 0)
    with pytest.raises(DatasetError, match="split 'validation' .* is empty"):
        iterate_batches(dataset, "validation", PARAMS, 2, cache_dir=tmp_path)


@pytest.fixture
def own_dataset(tmp_path):
    """A dataset this test may edit."""
    root = make_synthetic_dataset(tmp_path / "syn", size=24, n_train=2, n_test_good=1, n_test_defect=2, seed=3)
    return read_dataset("mvtec_ad", root=root, category="brick")


def test_rewritten_mask_with_same_size_and_mtime_makes_a_new_cache(own_dataset, tmp_path):
    from PIL import Image

    sample = next(s for s in own_dataset.samples_of("test") if s.anomaly_file_name)
    mask_file = sample.anomaly_file_name
    old = np.asarray(Image.open(mask_file)) > 0
    Image.fromarray(old.astype(np.uint8) * 255).save(mask_file, compress_level=0)  # size depends on shape only
    stamp = os.stat(mask_file)
    cached = stacked(list(iterate_batches(own_dataset, "test", PARAMS, 4, cache_dir=tmp_path / "cache")))
    Image.fromarray((~old).astype(np.uint8) * 255).save(mask_file, compress_level=0)  # the inverse mask
    os.utime(mask_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(mask_file).st_size == stamp.st_size and os.stat(mask_file).st_mtime_ns == stamp.st_mtime_ns
    assert not is_cached(own_dataset, "test", PARAMS, tmp_path / "cache")
    again = stacked(list(iterate_batches(own_dataset, "test", PARAMS, 4, cache_dir=tmp_path / "cache")))
    position = own_dataset.samples_of("test").index(sample)
    np.testing.assert_array_equal(again["mask"][position], 1 - cached["mask"][position])
    np.testing.assert_array_equal(again["mask"][: len(own_dataset.samples_of("test"))],
                                  direct(own_dataset, "test", PARAMS)[1])


def test_a_moved_dataset_keeps_its_cache(own_dataset, tmp_path):
    import dataclasses
    import shutil

    iterate_batches(own_dataset, "train", PARAMS, 2, cache_dir=tmp_path / "cache")
    root = Path(own_dataset.samples[0].image_file_name).parents[3]
    shutil.copytree(root, tmp_path / "moved")
    moved = dataclasses.replace(own_dataset, samples=[
        dataclasses.replace(s, image_file_name=s.image_file_name.replace(str(root), str(tmp_path / "moved")))
        for s in own_dataset.samples])
    assert is_cached(moved, "train", PARAMS, tmp_path / "cache")


def test_stale_incomplete_folders_are_removed_but_not_one_being_written(dataset, tmp_path):
    import fcntl

    stale = tmp_path / "train-0123" / "preprocessed_split" / "incomplete.ABCDEF_1.0.0"
    busy = tmp_path / "train-4567" / "preprocessed_split" / "incomplete.GHIJKL_1.0.0"
    for folder in (stale, busy):
        folder.mkdir(parents=True)
        (folder / "part").write_bytes(b"half")
    own = cache_path(dataset, "test", PARAMS, tmp_path) / "preprocessed_split" / "incomplete.MNOPQR_1.0.0"
    own.mkdir(parents=True)
    with open(busy.parents[1] / ".lock", "a") as handle:  # another process is writing that cache now
        fcntl.flock(handle, fcntl.LOCK_EX)
        iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path)
        assert busy.is_dir()
    assert not stale.exists() and not own.exists() and is_cached(dataset, "test", PARAMS, tmp_path)


def test_building_the_cache_is_quiet(dataset, tmp_path, capfd, caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path)
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and "dataset_info.json" not in out + err
    assert not [r for r in caplog.records if r.name == "absl" or r.levelno >= logging.WARNING]
    debug = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("anomax"))
    assert "dataset_info.json" in debug and "Downloading and preparing" in debug  # kept for the log file


def test_the_cache_bar_shows_only_when_progress_is_asked(dataset, tmp_path, capfd):
    iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / "quiet")
    assert "cache test" not in "".join(capfd.readouterr())
    iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / "shown", progress="score test")
    assert "cache test" in capfd.readouterr().err


def test_a_domain_mask_edited_in_place_is_read_again_and_makes_a_new_cache(dataset, tmp_path):
    """The params name the domain mask's file; its content, not its path, is what the model saw."""
    from PIL import Image

    roi = tmp_path / "roi.png"
    small = np.zeros((24, 24), np.uint8)
    small[4:12, 4:12] = 255
    Image.fromarray(small).save(roi)
    keep = create_dl_preprocess_param(width=24, height=24, num_channels=1, domain_handling="keep_domain",
                                      domain=str(roi))
    image = np.full((24, 24, 1), 200, np.uint8)
    assert (preprocess_image(keep, image) != 0).sum() == 64
    before = cache_path(dataset, "train", keep, tmp_path / "cache")
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(roi)
    os.utime(roi, ns=(os.stat(roi).st_atime_ns, os.stat(roi).st_mtime_ns + 10**9))  # a later write
    assert (preprocess_image(keep, image) != 0).sum() == 24 * 24
    assert cache_path(dataset, "train", keep, tmp_path / "cache") != before
    # rewritten at the same size (BMP: fixed by the dimensions) with its modification time set back: the
    # new cache (keyed by the content) was filled with the old region, read from the in-process memo
    bmp = tmp_path / "roi.bmp"
    Image.fromarray(small).save(bmp)
    keep = keep.replace(domain=str(bmp))
    assert (preprocess_image(keep, image) != 0).sum() == 64
    times = os.stat(bmp)
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 4)).save(bmp)
    os.utime(bmp, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(bmp).st_size == times.st_size and os.stat(bmp).st_mtime_ns == times.st_mtime_ns
    assert (preprocess_image(keep, image) != 0).sum() == 16 * 16


def test_a_damaged_cache_or_an_unwritable_cache_dir_is_named(dataset, tmp_path):
    """A flipped byte, a truncated or missing record file, a cut dataset_info.json: raw array_record,
    TFDS or protobuf errors that named no folder. A cache_dir that cannot be written: a raw OSError."""
    import shutil

    from anomax.errors import OutputError

    good = stacked(list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / "cache")))
    folder = cache_path(dataset, "test", PARAMS, tmp_path / "cache")
    records = next(folder.glob("**/*.array_record-*"))
    info = next(folder.glob("**/dataset_info.json"))
    for damage in ("flip", "truncate", "delete", "info"):
        shutil.copytree(tmp_path / "cache", tmp_path / damage)
        target = tmp_path / damage / records.relative_to(tmp_path / "cache")
        data = bytearray(target.read_bytes())
        if damage == "flip":
            data[200:216] = bytes(b ^ 0xFF for b in data[200:216])
            target.write_bytes(data)
        elif damage == "truncate":
            target.write_bytes(data[: len(data) // 2])
        elif damage == "delete":
            target.unlink()
        else:
            cut = tmp_path / damage / info.relative_to(tmp_path / "cache")
            cut.write_text(cut.read_text()[:50])
        with pytest.raises(DatasetError, match=f"the preprocessed cache {tmp_path / damage}/test-.* is damaged or "
                                               "unreadable .* delete that folder to rebuild it"):
            list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / damage))
    again = stacked(list(iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / "cache")))
    np.testing.assert_array_equal(again["image"], good["image"])  # the copies' damage left the cache alone
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match=f"cannot write the preprocessed cache {tmp_path / 'a_file'}/test-.*cache_dir=null"):
        iterate_batches(dataset, "test", PARAMS, 2, cache_dir=tmp_path / "a_file")
