"""Image and pixel metrics against independent computations (scikit-learn, brute-force sweeps)."""

import jax
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomax.errors import InputError
from anomax.evaluation import PixelAccumulator, aupro, auroc, average_precision, evaluate_dl_model, f1_max

EIGHT = np.ones((3, 3), bool)


def _scores(tied: bool, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(labels * 0.8, 1.0)
    return (np.round(scores, 1) if tied else scores), labels


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_and_aupr_equal_sklearn(tied, seed):
    scores, labels = _scores(tied, seed)
    assert len(np.unique(scores)) < len(scores) or not tied
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_f1_max_equals_brute_force_sweep(tied):
    scores, labels = _scores(tied, 2)
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp, fp = (predicted & (labels == 1)).sum(), (predicted & (labels == 0)).sum()
        best = max(best, 2 * tp / (2 * tp + fp + (~predicted & (labels == 1)).sum()))
    f1, threshold = f1_max(scores, labels)
    predicted = scores >= threshold
    tp, fp = (predicted & (labels == 1)).sum(), (predicted & (labels == 0)).sum()
    assert f1 == pytest.approx(best, abs=1e-12)
    assert 2 * tp / (tp + fp + labels.sum()) == pytest.approx(best, abs=1e-12)


def _reference_aupro(maps, masks, fpr_limit):
    """Brute force: every distinct score a threshold; regions per image; trapezoid to the limit."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT)
        regions += [(image, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps):
        above = maps >= threshold
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([(above[image] & region).sum() / region.sum() for image, region in regions])
        points.append((fpr, pro))
    points.sort()
    fpr, pro = np.array(points).T
    inside = fpr <= fpr_limit
    beyond = np.argmax(~inside)
    x0, x1, y0, y1 = fpr[beyond - 1], fpr[beyond], pro[beyond - 1], pro[beyond]
    x, y = np.r_[fpr[inside], fpr_limit], np.r_[pro[inside], y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / fpr_limit, len(regions)


def _small_masks(seed):
    """Four 12x12 images: one good, three with several regions (two touch only diagonally: one 8-region)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 12), bool)
    masks[1, 1:3, 1:4] = masks[1, 7:11, 6:9] = True
    masks[2, 2, 2] = masks[2, 3, 3] = masks[2, 8:10, 1:11] = True
    masks[3, 0:5, 8:12] = masks[3, 9, 0] = True
    maps = np.round(rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape), 2)  # ties on purpose
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05])
def test_aupro_equals_brute_force_reference(seed, fpr_limit):
    maps, masks = _small_masks(seed)
    expected, num_regions = _reference_aupro(maps, masks, fpr_limit)
    assert num_regions == 6
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-12)


def _batches(maps, masks, scores, labels, defect_types, size):
    return [{"anomaly_image": maps[i:i + size], "anomaly_ground_truth": masks[i:i + size],
             "anomaly_score": scores[i:i + size], "anomaly_label_id": labels[i:i + size],
             "defect_type": defect_types[i:i + size]} for i in range(0, len(scores), size)]


def _random_run(seed=0, count=24, size=32):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    defect_types = np.where(labels == 1, np.where(np.arange(count) % 4 == 1, "crack", "stain"), "good")
    masks = np.zeros((count, size, size), bool)
    for i in np.flatnonzero(labels):
        row, col = rng.integers(0, size - 8, 2)
        masks[i, row:row + rng.integers(2, 8), col:col + rng.integers(2, 8)] = True
    maps = rng.normal(0, 1, masks.shape) + 1.5 * masks
    scores = maps.reshape(count, -1).max(1)
    return maps.astype(np.float32), masks, scores, labels, defect_types


@pytest.mark.parametrize("scores, labels, message", [
    ([0.1, np.nan, 0.3], [0, 1, 1], "finite scores"),
    ([0.1, 0.2, 0.3], [0, 2, 1], "must be 0 \\(good\\) or 1"),
    ([0.1, 0.2, 0.3], ["ok", "nok", "nok"], "must be 0 \\(good\\) or 1"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "only one class"),
    ([0.1, 0.2, 0.3], [0, 1], "one score and one label per image"),
])
def test_image_metrics_refuse_what_scikit_learn_refuses(scores, labels, message):
    """NaN scores, labels other than 0/1 and a single class are errors, not a number (sklearn raises too)."""
    for metric in (auroc, average_precision, f1_max):
        with pytest.raises(InputError, match=message):
            metric(np.asarray(scores), np.asarray(labels))


def test_a_fixed_pixel_range_threshold_applies_to_the_scores_clipped_below_it():
    """Scores below pixel_range land in the first bin: a threshold read off the curve there must still
    classify them as the curve counted them (score >= threshold)."""
    maps = np.array([[[-2.0, 0.5]]])
    masks = np.array([[[True, False]]])
    for accumulator in (PixelAccumulator((0.0, 1.0), 10), PixelAccumulator((0.0, 1.0), 10).merged(
            PixelAccumulator((0.0, 1.0), 10))):
        accumulator.add(maps, masks)
        f1, threshold = accumulator.curve().f1_max()
        predicted = maps >= threshold
        assert f1 == pytest.approx(2 / 3) and predicted[masks].all() and predicted.sum() == 2


def test_a_score_on_a_fixed_bin_edge_counts_at_that_edge_threshold():
    """(score - low) * num_bins / span rounds many edges of (0, 0.7) in 100 bins one bin low; the
    counts must agree with applying each threshold of the curve as `score >= threshold`."""
    accumulator = PixelAccumulator((0.0, 0.7), 100)
    edges = 0.0 + (0.7 - 0.0) * np.arange(100) / 100
    maps = np.r_[edges, 0.7, 5.0][None, None, :]
    masks = np.zeros(maps.shape, bool)
    masks[..., ::3] = True
    accumulator.add(maps, masks)
    curve = accumulator.curve()
    for threshold, positives, negatives in zip(curve.thresholds, curve.true_positives, curve.false_positives):
        predicted = maps >= threshold
        assert (predicted & masks).sum() == positives and (predicted & ~masks).sum() == negatives


@pytest.mark.parametrize("exact", [True, False])
def test_pixel_metrics_refuse_non_finite_maps(exact):
    maps, masks = np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool)
    maps[0, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        PixelAccumulator(exact=exact).add(maps, masks)


def test_pixel_metric_settings_are_checked_in_the_api():
    """Only the evaluate config checked them: a reversed range gave 1 - AUROC, fpr_limit 0 NaN, 2 half the area,
    num_bins 0 a ZeroDivisionError, and AUPRO of one-class masks NaN where auroc refuses."""
    maps, masks = np.random.default_rng(0).random((1, 4, 4)), np.zeros((1, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    for pixel_range in ((1.0, 0.0), (0.0, 0.0), (0.0, np.inf), (None, 1.0), 5.0, (0.0, 1.0, 2.0)):
        with pytest.raises(InputError, match="pixel_range must be"):
            PixelAccumulator(pixel_range)
    with pytest.raises(InputError, match="num_bins must be an integer >= 1"):
        PixelAccumulator((0.0, 1.0), 0)
    for limit in (0, 2, -0.1):
        with pytest.raises(InputError, match="fpr_limit must be a number in \\(0, 1\\]"):
            aupro(maps, masks, limit)
        with pytest.raises(InputError, match="fpr_limit"):
            evaluate_dl_model(_batches(*_random_run(count=4, size=16), 4), fpr_limit=limit)
    for one_class in (np.zeros_like(masks), np.ones_like(masks)):
        with pytest.raises(InputError, match="only one class"):
            aupro(maps, one_class)
    assert 0 <= aupro(maps, masks, 1) <= 1


def test_evaluation_exact_matches_references_and_streamed_is_close():
    maps, masks, scores, labels, defect_types = _random_run()
    exact = evaluate_dl_model(_batches(maps, masks, scores, labels, defect_types, 5), exact=True)
    streamed = evaluate_dl_model(_batches(maps, masks, scores, labels, defect_types, 5))  # 10,000 bins
    assert exact["image"]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert exact["image"]["aupr"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert exact["pixel"]["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert exact["pixel"]["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert streamed["pixel"]["resolution"]["num_bins"] == 10_000
    for key in ("auroc", "f1_max", "aupro"):  # stated tolerance of 10,000 bins here: 1e-4 (seen: ~1e-5)
        assert streamed["pixel"][key] == pytest.approx(exact["pixel"][key], abs=1e-4)
    crack = (defect_types == "good") | (defect_types == "crack")
    per_type = exact["per_defect_type"]["crack"]
    assert set(exact["per_defect_type"]) == {"crack", "stain"}
    assert per_type["image"]["auroc"] == pytest.approx(roc_auc_score(labels[crack], scores[crack]), abs=1e-12)
    assert per_type["pixel"]["aupro"] == pytest.approx(aupro(maps[crack], masks[crack]), abs=1e-12)
    assert per_type["pixel"]["auroc"] == pytest.approx(
        roc_auc_score(masks[crack].ravel(), maps[crack].ravel()), abs=1e-9)


def test_defective_images_without_masks_are_left_out_of_the_pixel_metrics():
    """A defective image without a mask file comes with an all-zero mask that is no ground truth:
    flagged by 'has_ground_truth', its pixels count neither as defect nor as defect-free."""
    from anomax.evaluation import compute_dl_anomaly_thresholds

    maps, masks, scores, labels, defect_types = _random_run()
    unmasked = np.flatnonzero(labels)[:3]
    masks[unmasked] = False  # what the reader gives them
    maps[unmasked] += 3.0    # defects that score high, with nothing to say where they are
    has = np.ones(len(labels), bool)
    has[unmasked] = False
    batches = _batches(maps, masks, scores, labels, defect_types, 5)
    for start, batch in zip(range(0, len(labels), 5), batches):
        batch["has_ground_truth"] = has[start:start + 5]
    metrics = evaluate_dl_model(batches, exact=True)
    assert metrics["pixel"]["auroc"] == pytest.approx(roc_auc_score(masks[has].ravel(), maps[has].ravel()), abs=1e-9)
    assert metrics["pixel"]["aupro"] == pytest.approx(aupro(maps[has], masks[has]), abs=1e-12)
    assert metrics["image"]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)  # images all count
    thresholds = compute_dl_anomaly_thresholds(batches, split="validation", exact=True)
    expected = compute_dl_anomaly_thresholds(
        _batches(maps[has], masks[has], scores[has], labels[has], defect_types[has], 5), split="validation",
        exact=True)
    assert thresholds.f1_pixel == expected.f1_pixel


def test_halcon_measures_at_given_thresholds():
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.5, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    metrics = evaluate_dl_model({"anomaly_score": scores, "anomaly_label_id": labels},
                                thresholds={"intermediate": 0.3}, histogram_bins=4)
    measures = metrics["at_thresholds"]["intermediate"]
    assert measures["absolute_confusion_matrix"] == [[2, 0], [1, 3]]  # rows predicted ok/nok, columns truth
    np.testing.assert_allclose(measures["relative_confusion_matrix"], [[2 / 3, 0], [1 / 3, 1]])
    assert measures["precision"] == pytest.approx({"ok": 1.0, "nok": 0.75})
    assert measures["recall"] == pytest.approx({"ok": 2 / 3, "nok": 1.0})
    assert metrics["score_histogram"]["bin_edges"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert metrics["score_histogram"]["good"] == [2, 0, 1, 0]
    assert metrics["score_histogram"]["defective"] == [0, 1, 1, 1]
    assert metrics["pixel"] is None
    assert [case["anomaly_score"] for case in metrics["worst_false_positives"]] == [0.6, 0.2, 0.1]
    assert [case["index"] for case in metrics["worst_false_negatives"]] == [3, 4, 5]
    batches = [{"anomaly_score": scores[i:i + 2], "anomaly_label_id": labels[i:i + 2]} for i in range(0, 6, 2)]
    assert evaluate_dl_model(batches)["worst_false_negatives"] == metrics["worst_false_negatives"]


def test_native_resolution_resizes_maps_to_the_original_masks():
    maps, masks, scores, labels, defect_types = _random_run(count=8, size=16)
    big = np.repeat(np.repeat(masks, 2, 1), 2, 2)  # original masks at twice the map size
    batch = {"anomaly_image": maps, "anomaly_ground_truth": list(big), "anomaly_score": scores,
             "anomaly_label_id": labels}
    native = evaluate_dl_model(batch, exact=True, native_resolution=True)
    resized = np.asarray(jax.image.resize(maps, big.shape, "bilinear"))
    assert native["pixel"]["num_regions"] == int(sum(ndimage.label(m, EIGHT)[1] for m in big))
    assert native["pixel"]["auroc"] == pytest.approx(roc_auc_score(big.ravel(), resized.ravel()), abs=1e-9)
    with pytest.raises(InputError, match="native_resolution=True"):
        evaluate_dl_model(batch, exact=True)


def test_adaptive_bins_match_exact_counts_and_merge_like_one_pass():
    """Scores spread over very different ranges arrive batch by batch: the bins widen (merging
    pairwise), stay within num_bins, and two accumulators merged equal one fed everything."""
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(2, 16, 16)) * scale + shift, rng.random((2, 16, 16)) > 0.9)
               for scale, shift in ((1, 0), (5, 3), (0.1, -20), (50, 100))]
    exact, adaptive, first, second = (PixelAccumulator(exact=True), PixelAccumulator(num_bins=1000),
                                      PixelAccumulator(num_bins=1000), PixelAccumulator(num_bins=1000))
    for number, (maps, masks) in enumerate(batches):
        for accumulator in (exact, adaptive, first if number % 2 else second):
            accumulator.add(maps, masks)
    assert adaptive.resolution["bins_used"] <= 1000
    merged = first.merged(second)
    for metric in ("auroc", "aupro"):
        single = getattr(adaptive.curve(), metric)()
        assert getattr(merged.curve(), metric)() == pytest.approx(single, abs=1e-12)
        assert single == pytest.approx(getattr(exact.curve(), metric)(), abs=5e-3)
    # Counts are conserved exactly through every widening.
    assert adaptive.curve().false_positives[-1] == exact.curve().false_positives[-1]


def test_aupro_refuses_maps_and_masks_of_other_shapes():
    maps, masks = np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    for bad_maps, bad_masks in ((maps[0], masks[0]), (maps, masks[:, None]), (maps, masks[:, :3])):
        with pytest.raises(InputError, match=r"AUPRO needs maps and masks of one shape \(N, H, W\)"):
            aupro(bad_maps, bad_masks)


@pytest.mark.parametrize("pixel_range", [None, (0.0, 1.0)])
def test_pixel_counts_do_not_depend_on_the_chunk_size(pixel_range, monkeypatch):
    """Maps are binned in chunks (bounded memory on high-resolution maps): any chunk size, any curve."""
    import anomax.evaluation.metrics as metrics

    rng = np.random.default_rng(3)
    maps = rng.random((3, 17, 23))
    masks = np.zeros((3, 17, 23), bool)
    masks[0, 2:9, 3:7], masks[2, 10:, 15:] = True, True
    curves = []
    for chunk in (1 << 20, 7, 1):
        monkeypatch.setattr(metrics, "_CHUNK", chunk)
        accumulator = PixelAccumulator(pixel_range, num_bins=50)
        accumulator.add(maps[:2], masks[:2])
        accumulator.add(maps[2:] * 3, masks[2:])  # a wider batch: the adaptive grid coarsens
        curves.append((accumulator.curve(), accumulator._counts.copy()))
    (whole, counts), *chunked = curves
    for curve, other in chunked:  # pixel counts exactly; the overlap weights summed in another order
        assert np.array_equal(other[:2], counts[:2]) and other[2] == pytest.approx(counts[2], rel=1e-12, abs=1e-15)
        assert curve.auroc() == whole.auroc() and curve.aupro(0.3) == pytest.approx(whole.aupro(0.3), rel=1e-12)
