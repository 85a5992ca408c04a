"""split_dl_dataset and validation hold-out: percentages, 'nok' to test, errors."""

from collections import Counter

import pytest

from anomax.data.dataset import DLDataset, Sample, hold_out_validation, split_dl_dataset
from anomax.errors import ConfigError, DatasetError


def make(n_ok: int, n_nok: int) -> DLDataset:
    labels = ["ok"] * n_ok + ["nok"] * n_nok
    return DLDataset(
        [Sample(i, f"/data/{i}.png", label, "good" if label == "ok" else "crack") for i, label in enumerate(labels)],
        "folder",
    )


def counts(dataset):
    return Counter((s.split, s.anomaly_label) for s in dataset.samples)


def test_percentages_and_nok_to_test():
    split = split_dl_dataset(make(20, 7), 70, 15, seed=3)
    assert counts(split) == {("train", "ok"): 14, ("validation", "ok"): 3, ("test", "ok"): 3, ("test", "nok"): 7}
    assert [s.image_file_name for s in split.samples] == [s.image_file_name for s in make(20, 7).samples]


def test_seed_decides_assignment():
    def train(seed):
        return {s.image_id for s in split_dl_dataset(make(20, 0), 50, 25, seed=seed).samples if s.split == "train"}

    assert train(0) == train(0) and train(0) != train(1)


def test_every_requested_split_gets_an_ok_image():
    split = split_dl_dataset(make(3, 2), 10, 10)  # floor gives 0 → at least one each
    assert counts(split) == {("train", "ok"): 1, ("validation", "ok"): 1, ("test", "ok"): 1, ("test", "nok"): 2}
    with pytest.raises(DatasetError, match="2 'ok' images, too few"):
        split_dl_dataset(make(2, 5), 70, 15)
    assert counts(split_dl_dataset(make(2, 1), 50, 50)) == {
        ("train", "ok"): 1,
        ("validation", "ok"): 1,
        ("test", "nok"): 1,
    }


def test_resplit_needs_overwrite_and_bad_percentages():
    split = split_dl_dataset(make(10, 2), 60, 20)
    with pytest.raises(DatasetError, match="overwrite=True"):
        split_dl_dataset(split, 60, 20)
    assert counts(split_dl_dataset(split, 80, 0, overwrite=True))[("train", "ok")] == 8
    with pytest.raises(ConfigError, match="training_percent"):
        split_dl_dataset(make(10, 2), 120, 0)
    with pytest.raises(ConfigError, match="at most 100"):
        split_dl_dataset(make(10, 2), 80, 30)


def test_empty_and_missing_splits_are_errors():
    with pytest.raises(DatasetError, match="has no splits"):
        make(4, 1).samples_of("train")
    split = split_dl_dataset(make(4, 1), 75, 0)
    assert len(split.samples_of("train")) == 3 and len(split.samples_of(None)) == 5
    with pytest.raises(DatasetError, match="split 'validation' .* is empty"):
        split.samples_of("validation")
    with pytest.raises(ConfigError, match="unknown split"):
        split.samples_of("val")


def test_hold_out_validation():
    split = split_dl_dataset(make(10, 2), 100, 0)
    held = hold_out_validation(split, 0.25, seed=1)
    assert counts(held) == {("train", "ok"): 8, ("validation", "ok"): 2, ("test", "nok"): 2}
    assert hold_out_validation(split, 0.0) is split
    with pytest.raises(ConfigError, match="validation_from_train"):
        hold_out_validation(split, 1.0)
