"""HALCON's threshold rules against hand-worked examples; applying thresholds to known maps."""

import json

import numpy as np
import pytest

from anomax.errors import ConfigError, InputError
from anomax.evaluation import AnomalyThresholds, compute_dl_anomaly_thresholds, threshold_dl_anomaly_results

# Good maps whose 12 pixels are 0,2,0,2 / 1,1,1,1 / 0,2,2,0: mean 1, population std sqrt(2/3).
GOOD_MAPS = np.array([[[0, 2], [0, 2]], [[1, 1], [1, 1]], [[0, 2], [2, 0]]], np.float32)
SEGMENTATION = 1 + 4 * np.sqrt(2 / 3)


def _validation(good_scores, defective_scores, **extra):
    scores = np.r_[good_scores, defective_scores].astype(np.asarray(good_scores).dtype)
    labels = np.r_[np.zeros(len(good_scores), int), np.ones(len(defective_scores), int)]
    maps = np.concatenate([GOOD_MAPS[:len(good_scores)], np.full((len(defective_scores), 2, 2), 100.0)])
    return {"anomaly_score": scores, "anomaly_label_id": labels, "anomaly_image": maps, **extra}


def test_separable_classes():
    thresholds = compute_dl_anomaly_thresholds(_validation([0.1, 0.2, 0.3], [0.5, 0.7]), split="validation")
    assert thresholds.segmentation == pytest.approx(SEGMENTATION)  # defective maps (100) do not count
    assert thresholds.largest_good == np.nextafter(0.3, 1) and thresholds.largest_good > 0.3
    assert thresholds.smallest_defect == 0.5
    assert thresholds.intermediate == pytest.approx(0.4)
    assert thresholds.f1_image == 0.5 and thresholds.f1_pixel is None
    assert (thresholds.num_good, thresholds.num_defective, thresholds.split) == (3, 2, "validation")


def test_non_separable_classes_minimise_fpr_plus_fnr():
    # Sorted: .1g .2g .4d .5d .6g .9d. FPR+FNR between .2 and .4 is 1/3 + 0, the smallest of all gaps.
    thresholds = compute_dl_anomaly_thresholds(_validation([0.1, 0.2, 0.6], [0.4, 0.5, 0.9]), split="validation")
    assert thresholds.intermediate == pytest.approx(0.3)
    assert thresholds.smallest_defect == 0.4
    assert thresholds.largest_good == np.nextafter(0.6, 1)
    assert thresholds.f1_image == 0.4  # F1 = 6/7 there: tp 3, fp 1


def test_intermediate_separates_neighbouring_float32_scores():
    """The midpoint of two neighbouring float32 scores rounds onto the good one; the threshold must
    still separate the classes when applied (score >= threshold)."""
    good = np.float32(1.0)
    defect = np.nextafter(good, np.float32(2))
    thresholds = compute_dl_anomaly_thresholds(_validation(np.array([0.5, good], np.float32), [defect, 3.0]),
                                               split="validation")
    assert good < thresholds.intermediate <= defect
    scores = np.array([0.5, good, defect, 3.0], np.float32)
    results = threshold_dl_anomaly_results(np.zeros((4, 2, 2), np.float32), scores, 1.0, thresholds.intermediate)
    assert [r["anomaly_class"] for r in results] == ["ok", "ok", "nok", "nok"]


def test_good_images_only_give_the_largest_good_score():
    thresholds = compute_dl_anomaly_thresholds(_validation([0.1, 0.3], []), split="validation")
    expected = np.nextafter(0.3, 1)
    assert thresholds.largest_good == thresholds.smallest_defect == thresholds.intermediate == expected
    assert thresholds.f1_image is None
    assert thresholds.classification() == {name: expected for name in ("largest_good", "smallest_defect",
                                                                       "intermediate")}


def test_clip_std_factor_and_json_round_trip():
    thresholds = compute_dl_anomaly_thresholds(_validation([0.1, 0.2, 0.3], [0.5]), split="validation",
                                               std_factor=2.0, clip=(None, 2.0))
    assert thresholds.segmentation == 2.0
    unclipped = compute_dl_anomaly_thresholds(_validation([0.1, 0.2, 0.3], [0.5]), split="validation", std_factor=2.0)
    assert unclipped.segmentation == pytest.approx(1 + 2 * np.sqrt(2 / 3))
    assert AnomalyThresholds.from_dict(json.loads(json.dumps(thresholds.to_dict()))) == thresholds


def test_largest_good_keeps_float32_good_images_ok():
    scores = np.array([0.1, 0.3], np.float32)
    thresholds = compute_dl_anomaly_thresholds(_validation(scores, []), split="validation")
    results = threshold_dl_anomaly_results(GOOD_MAPS[:2], scores, thresholds.segmentation, thresholds.largest_good)
    assert [result["anomaly_class"] for result in results] == ["ok", "ok"]
    assert (scores < np.float32(thresholds.largest_good)).all()  # also when a model compares in float32


def test_segmentation_compares_in_float64_like_the_classification():
    """A float32 pixel just below a float64 threshold stays out of the region (comparing in float32
    would round the threshold onto it)."""
    pixel = np.float32(0.3)
    threshold = float(pixel) + 1e-10
    assert np.float32(threshold) == pixel  # what a float32 comparison would see
    (result,) = threshold_dl_anomaly_results(np.full((1, 2, 2), pixel), np.array([pixel]), threshold, threshold)
    assert not result["anomaly_region"]["mask"].any() and result["anomaly_class"] == "ok"


def test_f1_pixel_threshold_is_the_best_pixel_sweep():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 6, 6), np.uint8)
    masks[2, 1:3, 1:4] = masks[3, 3:6, 2:5] = 1
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)
    batch = {"anomaly_image": maps, "anomaly_ground_truth": masks, "anomaly_score": maps.max((1, 2)),
             "anomaly_label_id": np.array([0, 0, 1, 1])}
    threshold = compute_dl_anomaly_thresholds(batch, split="validation", exact=True).f1_pixel

    def f1(t):
        predicted, truth = maps >= t, masks == 1
        return 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())

    assert f1(threshold) == pytest.approx(max(f1(t) for t in np.unique(maps)), abs=1e-12)


def test_test_split_needs_explicit_consent_and_warns(caplog):
    """The warning goes through anomax's logger, which the apps print (a Python warning reached the log file only)."""
    results = _validation([0.1, 0.2], [0.5])
    with pytest.raises(ConfigError, match="allow_test_split=True"):
        compute_dl_anomaly_thresholds(results, split="test")
    with caplog.at_level("WARNING", logger="anomax"):
        compute_dl_anomaly_thresholds(results, split="test", allow_test_split=True)
    assert [r.name for r in caplog.records if "optimistic" in r.message] == ["anomax"]


def test_a_split_without_good_images_is_an_input_error():
    with pytest.raises(InputError, match="no good images"):
        compute_dl_anomaly_thresholds(_validation([], [0.5, 0.7]), split="validation")


def test_threshold_application_gives_known_regions_and_components():
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 1:3, 1:4] = 5.0  # a 2x3 block
    maps[0, 5, 5] = maps[0, 6, 6] = 5.0  # touching only diagonally: one 8-connected component
    maps[0, 7, 0] = 0.5  # below the segmentation threshold
    scores = np.array([0.7, 0.2, 0.5], np.float32)
    results = threshold_dl_anomaly_results(maps, scores, segmentation_threshold=1.0, classification_threshold=0.5)
    assert [r["anomaly_class"] for r in results] == ["nok", "ok", "nok"]  # a score equal to the threshold is nok
    assert [r["anomaly_class_id"] for r in results] == [1, 0, 1]
    assert results[0]["anomaly_region"]["components"] == [{"area": 6, "bbox": (1, 1, 3, 4)},
                                                          {"area": 2, "bbox": (5, 5, 7, 7)}]
    assert results[0]["anomaly_region"]["mask"].shape == (8, 8)
    np.testing.assert_array_equal(results[0]["anomaly_region"]["mask"], maps[0] >= 1.0)
    assert results[1]["anomaly_region"]["components"] == [] and not results[1]["anomaly_region"]["mask"].any()
    assert (results[2]["segmentation_threshold"], results[2]["classification_threshold"]) == (1.0, 0.5)


def test_a_segmentation_clip_must_be_low_then_high():
    from anomax.evaluation.config import EvaluateConfig

    with pytest.raises(ConfigError, match="evaluate.segmentation_clip .* low <= high"):
        EvaluateConfig(segmentation_clip=(5.0, 1.0))
    assert EvaluateConfig(segmentation_clip=(None, 1.0)).segmentation_clip == (None, 1.0)


def test_results_of_maps_of_different_sizes_are_thresholded_in_order():
    """A tiled model's maps have each image's size: stacking them failed; no results failed too."""
    maps = [np.zeros((4, 4)), np.full((6, 5), 2.0), np.full((4, 4), 3.0)]
    results = threshold_dl_anomaly_results(maps, [0.1, 2.0, 3.0], 1.0, 1.5)
    assert [r["anomaly_class"] for r in results] == ["ok", "nok", "nok"]
    assert [r["anomaly_region"]["mask"].shape for r in results] == [(4, 4), (6, 5), (4, 4)]
    assert [r["anomaly_region"]["mask"].all() for r in results] == [False, True, True]
    assert threshold_dl_anomaly_results([], [], 1.0, 1.5) == []
