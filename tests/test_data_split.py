"""split_dl_dataset (HALCON's semantics), validation from train or test, errors."""

from collections import Counter

import pytest

import numpy as np

from anomax.data.dataset import DLDataset, Sample, hold_out_validation, move_test_to_validation, split_dl_dataset
from anomax.errors import ConfigError, DatasetError
from anomax.evaluation import compute_dl_anomaly_thresholds


def make(n_ok: int, n_nok: int, defect_types=("crack",)) -> DLDataset:
    labels = ["ok"] * n_ok + ["nok"] * n_nok
    return DLDataset(
        [Sample(i, f"/data/{i}.png", label, "good" if label == "ok" else defect_types[i % len(defect_types)])
         for i, label in enumerate(labels)],
        "folder",
    )


def counts(dataset):
    return Counter((s.split, s.anomaly_label) for s in dataset.samples)


def test_percentages_and_nok_to_validation_and_test_never_train():
    split = split_dl_dataset(make(20, 7), 70, 15, seed=3)
    # 'nok' in the ratio validation : test = 15 : 15 (validation gets the rounded share of 3.5).
    assert counts(split) == {("train", "ok"): 14, ("validation", "ok"): 3, ("test", "ok"): 3,
                             ("validation", "nok"): 4, ("test", "nok"): 3}
    assert [s.image_file_name for s in split.samples] == [s.image_file_name for s in make(20, 7).samples]
    uneven = split_dl_dataset(make(40, 30), 50, 10, seed=0)  # nok ratio 10 : 40, so 30 x 1/5 to validation
    assert counts(uneven) == {("train", "ok"): 20, ("validation", "ok"): 4, ("test", "ok"): 16,
                              ("validation", "nok"): 6, ("test", "nok"): 24}
    assert not any(s.split == "train" and s.anomaly_label == "nok" for s in uneven.samples)


def test_defective_images_are_split_per_defect_type():
    split = split_dl_dataset(make(10, 12, defect_types=("crack", "scratch", "dent")), 60, 20, seed=0)
    per_type = Counter((s.split, s.defect_type) for s in split.samples if s.anomaly_label == "nok")
    assert per_type == {("validation", t): 2 for t in ("crack", "scratch", "dent")} | {
        ("test", t): 2 for t in ("crack", "scratch", "dent")}
    with pytest.raises(ConfigError, match="training_percent=100 leaves no"):
        split_dl_dataset(make(10, 2), 100, 0)


def test_seed_decides_assignment():
    def train(seed):
        return {s.image_id for s in split_dl_dataset(make(20, 0), 50, 25, seed=seed).samples if s.split == "train"}

    assert train(0) == train(0) and train(0) != train(1)


def test_every_requested_split_gets_an_ok_image():
    split = split_dl_dataset(make(3, 2), 10, 10)  # floor gives 0 → at least one each
    assert counts(split) == {("train", "ok"): 1, ("validation", "ok"): 1, ("test", "ok"): 1, ("test", "nok"): 2}
    # (2 nok x 10/90 floors to 0 for validation)
    with pytest.raises(DatasetError, match="2 'ok' images, too few"):
        split_dl_dataset(make(2, 5), 70, 15)
    assert counts(split_dl_dataset(make(2, 1), 50, 50)) == {
        ("train", "ok"): 1,
        ("validation", "ok"): 1,
        ("validation", "nok"): 1,
    }


def test_percentages_that_float_arithmetic_rounds_down_keep_their_images():
    # 29 / 100 * 100 is 28.999... in floats: train still gets 29 and no test split appears unasked
    assert counts(split_dl_dataset(make(100, 0), 29, 71)) == {("train", "ok"): 29, ("validation", "ok"): 71}
    assert counts(split_dl_dataset(make(100, 0), 57, 43)) == {("train", "ok"): 57, ("validation", "ok"): 43}
    train = split_dl_dataset(make(100, 0), 100, 0)
    assert counts(hold_out_validation(train, 0.29))[("validation", "ok")] == 29


def test_one_good_image_cannot_serve_two_splits():
    # train and validation both ask for one: the split is refused, not left without a good validation image
    with pytest.raises(DatasetError, match="1 'ok' images, too few"):
        split_dl_dataset(make(1, 2), 50, 50)


def test_resplit_needs_overwrite_and_bad_percentages():
    split = split_dl_dataset(make(10, 2), 60, 20)
    with pytest.raises(DatasetError, match="overwrite=True"):
        split_dl_dataset(split, 60, 20)
    assert counts(split_dl_dataset(split, 80, 0, overwrite=True))[("train", "ok")] == 8
    assert counts(split_dl_dataset(split, 80, 0, overwrite=True))[("test", "nok")] == 2
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
    split = split_dl_dataset(make(10, 2), 90, 0)
    held = hold_out_validation(split, 0.25, seed=1)
    assert counts(held) == {("train", "ok"): 7, ("validation", "ok"): 2, ("test", "ok"): 1, ("test", "nok"): 2}
    assert hold_out_validation(split, 0.0) is split
    with pytest.raises(ConfigError, match="validation_from_train"):
        hold_out_validation(split, 1.0)


def own_split(n_train, n_test_ok, n_test_nok) -> DLDataset:
    """A format with its own split (MVTec AD style): train good only, test both, two defect types."""
    samples = [Sample(i, f"/t/{i}.png", "ok", "good", split="train") for i in range(n_train)]
    samples += [Sample(n_train + i, f"/g/{i}.png", "ok", "good", split="test") for i in range(n_test_ok)]
    samples += [Sample(n_train + n_test_ok + i, f"/d/{i}.png", "nok", ("crack", "hole")[i % 2], split="test")
                for i in range(n_test_nok)]
    return DLDataset(samples, "mvtec_ad")


def test_validation_from_test_is_stratified_and_seeded():
    dataset = own_split(10, 10, 12)
    moved = move_test_to_validation(dataset, 0.5, seed=0)
    per_type = Counter((s.split, s.defect_type) for s in moved.samples)
    assert per_type == {("train", "good"): 10, ("validation", "good"): 5, ("test", "good"): 5,
                        ("validation", "crack"): 3, ("test", "crack"): 3, ("validation", "hole"): 3,
                        ("test", "hole"): 3}

    def chosen(seed):
        return [s.image_id for s in move_test_to_validation(dataset, 0.5, seed=seed).samples
                if s.split == "validation"]

    assert chosen(0) == chosen(0) and chosen(0) != chosen(1)
    assert move_test_to_validation(dataset, 0.0).samples == dataset.samples
    with pytest.raises(ConfigError, match="validation_from_test"):
        move_test_to_validation(dataset, 1.0)


def test_classification_thresholds_differ_when_validation_holds_overlapping_defects():
    """Hand-worked: good scores 1, 2, 3, 6; defective 4, 5, 7. largest_good is just above 6;
    smallest_defect is 4; intermediate is the midpoint of the gap with the least FPR + FNR:
    between 3 and 4 (FPR 1/4 + FNR 0) -> 3.5; F1-max: at 4 (P 3/4, R 1 -> 6/7)."""
    scores = np.array([1, 2, 3, 6, 4, 5, 7], np.float64)
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    maps = np.zeros((7, 4, 4))
    thresholds = compute_dl_anomaly_thresholds({"anomaly_score": scores, "anomaly_label_id": labels,
                                                "anomaly_image": maps}, split="validation")
    assert thresholds.largest_good == np.nextafter(6.0, np.inf)
    assert thresholds.smallest_defect == 4.0
    assert thresholds.intermediate == 3.5
    assert thresholds.f1_image == 4.0
    assert len({thresholds.largest_good, thresholds.smallest_defect, thresholds.intermediate}) == 3


def test_small_defect_types_are_not_all_rounded_away():
    """Four defect types of one image each, half to validation: two of them go, not none."""
    dataset = own_split(4, 4, 4)
    for sample in dataset.samples[-4:]:
        sample.defect_type = f"type{sample.image_id}"
    moved = counts(move_test_to_validation(dataset, 0.5, seed=0))
    assert moved[("validation", "nok")] == 2 and moved[("validation", "ok")] == 2
