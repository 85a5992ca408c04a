"""evaluate_dl_model: HALCON's measures and the field's image and pixel metrics, overall and per defect type."""

import functools

import numpy as np

from anomax.errors import InputError
from anomax.evaluation._results import Results, iterate_results
from anomax.evaluation.metrics import Curve, PixelAccumulator, image_curve
from anomax.evaluation.thresholds import AnomalyThresholds
from anomax.settings import is_finite_number

CLASS_NAMES = ("ok", "nok")
_CURVE_POINTS = 1000  # curves kept for pictures are thinned to about this many points


def evaluate_dl_model(
    results: Results,
    *,
    thresholds: AnomalyThresholds | dict[str, float] | None = None,
    exact: bool = False,
    num_bins: int = 10_000,
    pixel_range: tuple[float, float] | None = None,
    fpr_limit: float = 0.3,
    native_resolution: bool = False,
    histogram_bins: int = 50,
    num_worst: int = 4,
) -> dict:
    """Evaluate results (batches under HALCON's keys, see `_results`) into a JSON-serialisable dict.

    Results are read once (a generator of batches is fine). Image metrics are exact. Pixel metrics need
    'anomaly_image' and 'anomaly_ground_truth' (images whose 'has_ground_truth' is False, defective
    images without a mask, are left out of them); they are streamed through num_bins bins over
    pixel_range (None: bins that widen with the data, see PixelAccumulator), or exact=True keeps
    every pixel. native_resolution=True resizes each map
    bilinearly to the size of its ground-truth mask (the caller hands the original masks) before counting.
    Per defect type, a defect type's images are evaluated together with all good images.
    Confusion matrices are computed at each named classification threshold (rows predicted, columns
    ground truth, classes ok, nok; the relative matrix divides each column by its ground-truth count).
    """
    scores, labels, defect_types, indices = [], [], [], []
    pixels: dict[str, PixelAccumulator] = {}
    for batch in iterate_results(results, native_resolution=native_resolution):
        scores.append(batch["anomaly_score"])
        labels.append(batch["anomaly_label_id"])
        defect_types.append(batch["defect_type"])
        indices.append(batch["index"])
        if "anomaly_image" in batch and "anomaly_ground_truth" in batch:
            for defect_type in np.unique(batch["defect_type"]):
                chosen = (batch["defect_type"] == defect_type) & batch["has_ground_truth"]
                if not chosen.any():  # an accumulator that never gets a pixel has no curve
                    continue
                accumulator = pixels.setdefault(defect_type, PixelAccumulator(pixel_range, num_bins, exact=exact))
                for maps, masks in _pixel_pairs(batch, chosen, native_resolution):
                    accumulator.add(maps, masks)
    if not scores:
        raise InputError("evaluate_dl_model: the results hold no images")
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    defect_types, indices = np.concatenate(defect_types), np.concatenate(indices)
    if not (labels == 0).any() or not (labels == 1).any():
        missing = "good (anomaly_label_id 0)" if not (labels == 0).any() else "defective (anomaly_label_id 1)"
        raise InputError(f"the results hold no {missing} images; evaluation needs both good and defective images")

    image = image_curve(scores, labels)
    all_pixels = functools.reduce(PixelAccumulator.merged, pixels.values()) if pixels else None
    metrics = {
        "num_images": len(scores), "num_good": int((labels == 0).sum()), "num_defective": int((labels == 1).sum()),
        "image": _image_metrics(image),
        "pixel": _pixel_metrics(all_pixels, fpr_limit, native_resolution),
        "per_defect_type": {},
        "score_histogram": _score_histogram(scores, labels, histogram_bins),
        "at_thresholds": {name: _confusion(scores, labels, value) for name, value in _named(thresholds).items()},
        "worst_false_positives": _ranked(scores, labels, defect_types, indices, 0, num_worst),
        "worst_false_negatives": _ranked(scores, labels, defect_types, indices, 1, num_worst),
        "curves": {"image_roc": _thin(fpr=np.r_[0, image.fpr], tpr=np.r_[0, image.tpr])},
    }
    if metrics["pixel"] is not None:
        curve = all_pixels.curve()
        pro_fpr, pro = curve.pro_curve(fpr_limit)
        metrics["curves"]["pixel_roc"] = _thin(fpr=np.r_[0, curve.fpr], tpr=np.r_[0, curve.tpr])
        metrics["curves"]["pro"] = _thin(fpr=pro_fpr, pro=pro)
    for defect_type in np.unique(defect_types[labels == 1]):
        chosen = (labels == 0) | (defect_types == defect_type)
        group = [pixels[name] for name in ("good", defect_type) if name in pixels]
        metrics["per_defect_type"][str(defect_type)] = {
            "num_images": int(chosen.sum()) - int((labels == 0).sum()),
            "image": _image_metrics(image_curve(scores[chosen], labels[chosen])),
            "pixel": _pixel_metrics(functools.reduce(PixelAccumulator.merged, group) if group else None, fpr_limit,
                                    native_resolution),
        }
    return metrics


def _pixel_pairs(batch: dict, chosen: np.ndarray, native_resolution: bool):
    """(maps, masks) stacks to count; at native resolution one image at a time, each map resized to its mask."""
    if not native_resolution:
        yield batch["anomaly_image"][chosen], batch["anomaly_ground_truth"][chosen]
        return
    for position in np.flatnonzero(chosen):
        mask, anomaly_image = batch["anomaly_ground_truth"][position], batch["anomaly_image"][position]
        if anomaly_image.shape != mask.shape:  # tiled maps come at the mask's size
            import jax  # here: the thresholds and apply paths import this package and resize nothing

            anomaly_image = np.asarray(jax.image.resize(anomaly_image, mask.shape, "bilinear"))
        yield anomaly_image[None], mask[None]


def _image_metrics(curve: Curve) -> dict:
    f1, threshold = curve.f1_max()
    return {"auroc": curve.auroc(), "aupr": curve.average_precision(), "f1_max": f1, "f1_threshold": threshold}


def _pixel_metrics(accumulator: PixelAccumulator | None, fpr_limit: float, native_resolution: bool) -> dict | None:
    """None where the pixels lack either class (no masks, or no defect pixels)."""
    if accumulator is None:
        return None
    curve = accumulator.curve()
    if curve.true_positives[-1] == 0 or curve.false_positives[-1] == 0:
        return None
    f1, threshold = curve.f1_max()
    return {"auroc": curve.auroc(), "f1_max": f1, "f1_threshold": threshold, "aupro": curve.aupro(fpr_limit),
            "fpr_limit": fpr_limit, "num_regions": curve.num_regions, "resolution": accumulator.resolution,
            "native_resolution": native_resolution}


def _named(thresholds) -> dict[str, float]:
    if thresholds is None:
        return {}
    if isinstance(thresholds, AnomalyThresholds):
        return thresholds.classification()
    if any(not is_finite_number(value) for value in thresholds.values()):
        raise InputError(f"evaluate_dl_model: thresholds must be finite numbers, got {dict(thresholds)!r}")
    return {str(name): float(value) for name, value in thresholds.items()}


def _confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    predicted = (scores.astype(np.float64) >= threshold).astype(int)  # float32 would round the threshold
    absolute = np.zeros((2, 2), int)
    np.add.at(absolute, (predicted, labels), 1)
    diagonal = np.diag(absolute)
    return {
        "threshold": float(threshold),
        "absolute_confusion_matrix": absolute.tolist(),
        "relative_confusion_matrix": (absolute / absolute.sum(0)).tolist(),
        "precision": dict(zip(CLASS_NAMES, _ratios(diagonal, absolute.sum(1)))),
        "recall": dict(zip(CLASS_NAMES, _ratios(diagonal, absolute.sum(0)))),
    }


def _ratios(numerators, denominators) -> list[float | None]:
    """None where nothing was predicted as (or belongs to) a class."""
    return [float(n / d) if d else None for n, d in zip(numerators, denominators)]


def _score_histogram(scores: np.ndarray, labels: np.ndarray, bins: int) -> dict:
    edges = np.histogram_bin_edges(scores, bins)
    return {"bin_edges": edges.tolist(), "good": np.histogram(scores[labels == 0], edges)[0].tolist(),
            "defective": np.histogram(scores[labels == 1], edges)[0].tolist()}


def _ranked(scores, labels, defect_types, indices, label: int, count: int) -> list[dict]:
    """The highest-scored good (label 0) or lowest-scored defective (label 1) images: the nearest misses."""
    chosen = np.flatnonzero(labels == label)
    chosen = chosen[np.argsort(scores[chosen] * (1 if label else -1), kind="stable")][:count]
    return [{"index": int(indices[i]), "anomaly_score": float(scores[i]), "defect_type": str(defect_types[i])}
            for i in chosen]


def _thin(**columns: np.ndarray) -> dict[str, list[float]]:
    """Every column at about _CURVE_POINTS evenly spaced positions, first and last kept."""
    length = len(next(iter(columns.values())))
    keep = np.unique(np.linspace(0, length - 1, min(length, _CURVE_POINTS)).astype(int))
    return {name: values[keep].tolist() for name, values in columns.items()}
