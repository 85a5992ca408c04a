"""Bad inputs give InputError with a message that says what to fix."""

import numpy as np
import pytest

from anomax.errors import InputError
from anomax.evaluation import compute_dl_anomaly_thresholds, evaluate_dl_model


def _batch(**changes):
    masks = np.zeros((4, 5, 5), np.uint8)
    masks[2:, 1:3, 1:3] = 1
    batch = {"anomaly_image": np.random.default_rng(0).random((4, 5, 5)) + masks, "anomaly_ground_truth": masks,
             "anomaly_score": np.array([0.1, 0.2, 0.8, 0.9]), "anomaly_label_id": np.array([0, 0, 1, 1])}
    return {**batch, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"anomaly_ground_truth": np.zeros((4, 6, 5), np.uint8)}, "does not match the anomaly image"),
    ({"anomaly_score": np.array([0.1, np.nan, 0.8, 0.9])}, "'anomaly_score' contains NaN"),
    ({"anomaly_image": np.full((4, 5, 5), np.nan)}, "'anomaly_image' contains NaN"),
    ({"anomaly_label_id": np.array([1, 1, 1, 1])}, "no good"),
    ({"anomaly_label_id": np.array([0, 0, 0, 0])}, "labelled ok .* has defect pixels"),
    ({"anomaly_label_id": np.array([0, 2, 1, 1])}, "use 0 for ok and 1 for nok"),
    ({"anomaly_score": np.array([0.1, 0.2, 0.8])}, r"expected \(3,\)"),
    ({"defect_type": ["good", "good", "scratch"]}, "'defect_type' has shape"),
    ({"anomaly_ground_truth": [np.zeros((5, 5))] * 3 + [np.zeros((6, 6))]}, r"\[\(5, 5\), .*\(6, 6\)\] does not match"),
])
def test_bad_evaluation_inputs_raise_input_error(changes, message):
    with pytest.raises(InputError, match=message):
        evaluate_dl_model(_batch(**changes), exact=True)


def test_good_images_only_cannot_be_evaluated():
    batch = _batch(anomaly_label_id=np.zeros(4, int), anomaly_ground_truth=None)
    with pytest.raises(InputError, match="no defective"):
        evaluate_dl_model(batch)


def test_threshold_inputs_are_checked_too():
    with pytest.raises(InputError, match="'anomaly_score' contains NaN"):
        compute_dl_anomaly_thresholds(_batch(anomaly_score=np.array([np.nan, 0.2, 0.8, 0.9])), split="validation")
    with pytest.raises(InputError, match="resize the masks to the anomaly images' size") as refused:
        compute_dl_anomaly_thresholds(_batch(anomaly_ground_truth=np.zeros((4, 6, 6))), split="validation")
    assert "native_resolution=True" in str(refused.value) and "evaluate_dl_model" in str(refused.value)
    with pytest.raises(InputError, match="needs 'anomaly_image'"):
        compute_dl_anomaly_thresholds({"anomaly_score": [0.1], "anomaly_label_id": [0]}, split="validation")


def test_padding_is_dropped_before_checks():
    batch = _batch(anomaly_score=np.array([0.1, 0.2, 0.8, np.nan]), valid=np.array([True, True, True, False]))
    assert evaluate_dl_model(batch, exact=True)["num_images"] == 3


def test_default_indices_count_images_not_padding():
    from anomax.evaluation._results import iterate_results

    padded = {"anomaly_score": np.array([0.1, 0.2, 0.3]), "anomaly_label_id": np.array([0, 1, 0]),
              "valid": np.array([True, False, True])}
    whole = {"anomaly_score": np.array([0.4, 0.5]), "anomaly_label_id": np.array([1, 0])}
    assert [batch["index"].tolist() for batch in iterate_results([padded, whole])] == [[0, 1], [2, 3]]


def test_results_are_read_once_and_streamed_metrics_match_exact_ones():
    exact = evaluate_dl_model([_batch()], exact=True)["pixel"]
    for pixel_range in (None, (0.0, 2.0)):  # adaptive bins, fixed bins: one pass over a one-shot iterator
        streamed = evaluate_dl_model(iter([_batch(), _batch()]), pixel_range=pixel_range)["pixel"]
        assert streamed["auroc"] == pytest.approx(exact["auroc"], abs=1e-3)
        assert streamed["aupro"] == pytest.approx(exact["aupro"], abs=1e-3)


def test_threshold_settings_and_empty_results_are_checked_by_the_api():
    """As EvaluateConfig checks them for anomax-train."""
    for kwargs, message in (({"std_factor": -10}, "std_factor must be a finite number >= 0"),
                            ({"clip": (5, 1)}, r"clip must be None or \(low, high\) with low <= high"),
                            ({"clip": (1.0,)}, "clip must be None"),
                            ({"clip": (float("nan"), None)}, "clip must be None"),  # a NaN threshold before
                            ({"clip": ("a", "b")}, "clip must be None")):
        with pytest.raises(InputError, match=message):
            compute_dl_anomaly_thresholds(_batch(), split="validation", **kwargs)
    assert compute_dl_anomaly_thresholds(_batch(), split="validation", clip=(None, 0.5)).segmentation == 0.5
    with pytest.raises(InputError, match="'validation' split's results hold no images"):
        compute_dl_anomaly_thresholds([], split="validation")
    with pytest.raises(InputError, match="the results hold no images"):
        evaluate_dl_model([])


def test_nan_thresholds_are_refused_not_silently_applied():
    """NaN marked no region pixel and called every image 'ok'; evaluate_dl_model counted at NaN."""
    from anomax.evaluation import threshold_dl_anomaly_results

    maps = np.zeros((1, 4, 4))
    for segmentation, classification, name in ((float("nan"), 0.5, "segmentation"), (0.5, float("nan"), "classification"),
                                               (0.5, "high", "classification")):
        with pytest.raises(InputError, match=f"{name}_threshold must be a finite number"):
            threshold_dl_anomaly_results(maps, [0.0], segmentation, classification)
    with pytest.raises(InputError, match="thresholds must be finite numbers"):
        evaluate_dl_model(_batch(), thresholds={"x": float("nan")})


def test_results_without_any_ground_truth_have_no_pixel_metrics():
    """Every image with has_ground_truth False: the empty pixel accumulators crashed (exact and binned)."""
    batch = _batch(has_ground_truth=np.zeros(4, bool))
    for exact in (True, False):
        assert evaluate_dl_model(batch, exact=exact)["pixel"] is None
