"""HALCON's threshold estimation and application, with F1-optimal thresholds beside them.

Convention: a pixel or image is anomalous ('nok') iff its score >= the threshold.
"""

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomax.errors import ConfigError, InputError
from anomax.evaluation._results import Results, iterate_results
from anomax.evaluation.metrics import PixelAccumulator, image_curve, label_regions
from anomax.settings import is_finite_number

log = logging.getLogger("anomax")

CLASSIFICATION_RULES = ("largest_good", "smallest_defect", "intermediate")


@dataclass(frozen=True)
class AnomalyThresholds:
    """Named thresholds and where they were fitted; `to_dict()` is JSON-serialisable."""

    segmentation: float  # mean + std_factor * std of the good images' pixel scores
    largest_good: float  # just above the largest good score: no good image is 'nok'
    smallest_defect: float  # the smallest defective score: every defective image is 'nok'
    intermediate: float  # midpoint of the gap that minimises FPR + FNR (where the classes separate: between them)
    f1_image: float | None  # threshold of the largest image F1; None without defective images
    f1_pixel: float | None  # threshold of the largest pixel F1; None without ground-truth masks
    split: str
    std_factor: float
    num_good: int
    num_defective: int

    def classification(self) -> dict[str, float]:
        """The image thresholds by name (HALCON's three, then the F1-optimal one when known)."""
        named = {name: getattr(self, name) for name in (*CLASSIFICATION_RULES, "f1_image")}
        return {name: value for name, value in named.items() if value is not None}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AnomalyThresholds":
        """What to_dict wrote, checked (a saved model's estimates): a wrong value is a ValueError naming it."""
        thresholds = cls(**values)
        for name in ("segmentation", *CLASSIFICATION_RULES, "f1_image", "f1_pixel", "std_factor"):
            value = getattr(thresholds, name)
            if not (value is None and name.startswith("f1_")) and not is_finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if thresholds.std_factor < 0 or not isinstance(thresholds.split, str):
            raise ValueError(f"std_factor must be >= 0 and split a split's name, got {thresholds.std_factor!r} and "
                             f"{thresholds.split!r}")
        for name in ("num_good", "num_defective"):
            value = getattr(thresholds, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        return thresholds


def compute_dl_anomaly_thresholds(
    results: Results,
    *,
    split: str,
    allow_test_split: bool = False,
    std_factor: float = 4.0,
    clip: tuple[float | None, float | None] | None = None,
    exact: bool = False,
    num_bins: int = 10_000,
    pixel_range: tuple[float, float] | None = None,
) -> AnomalyThresholds:
    """Estimate thresholds from a split's results (see `_results` for the batch keys).

    The segmentation threshold is mean + std_factor * std (population std) of every pixel score of the
    good images, optionally clipped to clip=(low, high). With good images only, all classification
    thresholds are the largest-good one. The F1-optimal pixel threshold needs 'anomaly_ground_truth'
    and is streamed through num_bins bins over pixel_range (None: bins that widen with the data) unless
    exact. Results are read once.
    """
    if not is_finite_number(std_factor) or std_factor < 0:
        raise InputError(f"std_factor must be a finite number >= 0, got {std_factor!r}")
    if clip is not None:
        bounds = tuple(clip) if isinstance(clip, (tuple, list)) else ()
        if (len(bounds) != 2 or any(b is not None and not is_finite_number(b) for b in bounds)
                or (None not in bounds and bounds[0] > bounds[1])):
            raise InputError(f"clip must be None or (low, high) with low <= high (either may be None), got {clip!r}")
    if split == "test":
        if not allow_test_split:
            raise ConfigError("thresholds would be fitted on the 'test' split, which makes its metrics optimistic; "
                              "fit them on 'validation' or pass allow_test_split=True")
        log.warning("thresholds are fitted on the test split: metrics on that split are optimistic")  # the console too
    scores, labels = [], []
    moments = np.zeros(3)  # count, sum and sum of squares of the good pixels minus `shift`
    shift, pixels = None, None
    for batch in iterate_results(results):
        scores.append(batch["anomaly_score"])
        labels.append(batch["anomaly_label_id"])
        if "anomaly_image" not in batch:
            raise InputError("compute_dl_anomaly_thresholds needs 'anomaly_image' in every results batch "
                             "(the segmentation threshold comes from the good images' maps)")
        good = batch["anomaly_image"][batch["anomaly_label_id"] == 0].astype(np.float64)
        if good.size:
            shift = good.mean() if shift is None else shift  # shifting by a typical value keeps the variance exact
            moments += good.size, (good - shift).sum(), np.square(good - shift).sum()
        if "anomaly_ground_truth" in batch:
            if pixels is None:
                pixels = PixelAccumulator(pixel_range, num_bins, exact=exact)
            has = batch["has_ground_truth"]  # a defective image without a mask has no pixel ground truth
            pixels.add(batch["anomaly_image"][has], batch["anomaly_ground_truth"][has])
    if not scores:
        raise InputError(f"compute_dl_anomaly_thresholds: the '{split}' split's results hold no images")
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    good, defective = scores[labels == 0], scores[labels == 1]
    if len(good) == 0:
        raise InputError(f"the '{split}' split has no good images; thresholds are estimated from good images")
    count, total, squares = moments
    mean = total / count
    segmentation = float(np.clip(shift + mean + std_factor * np.sqrt(max(squares / count - mean**2, 0.0)),
                                 *(clip or (None, None))))
    largest_good = float(np.nextafter(good.max(), np.inf))  # in the scores' dtype, so it survives comparison
    if len(defective) == 0:
        smallest_defect = intermediate = largest_good
        f1_image = None
    else:
        smallest_defect, intermediate = float(defective.min()), _intermediate(good, defective)
        f1_image = image_curve(scores, labels).f1_max()[1]
    f1_pixel = None
    if pixels is not None and pixels.num_regions > 0:
        f1_pixel = pixels.curve().f1_max()[1]
    return AnomalyThresholds(segmentation, largest_good, smallest_defect, intermediate, f1_image, f1_pixel,
                             split, float(std_factor), len(good), len(defective))


def _intermediate(good: np.ndarray, defective: np.ndarray) -> float:
    """Midpoint of the gap between neighbouring distinct scores with the smallest FPR + FNR.

    Where the classes separate, the only gap with FPR + FNR = 0 is the one between the largest good and the
    smallest defective score. Ties go to the lowest threshold: missing a defect costs more than a false alarm.
    """
    values = np.unique(np.concatenate([good, defective]))
    midpoints = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(values.dtype)
    # the midpoint of two neighbouring float32 scores rounds onto the lower one: take the upper, still in the gap
    midpoints = np.where(midpoints > values[:-1], midpoints, values[1:])
    candidates = np.r_[values[0], midpoints, np.nextafter(values[-1], np.inf)].astype(values.dtype)
    false_positive_rate = 1 - np.searchsorted(np.sort(good), candidates) / len(good)
    false_negative_rate = np.searchsorted(np.sort(defective), candidates) / len(defective)
    return float(candidates[np.argmin(false_positive_rate + false_negative_rate)])


def threshold_dl_anomaly_results(anomaly_images, anomaly_scores, segmentation_threshold: float,
                                 classification_threshold: float) -> list[dict]:
    """Classify images and segment defects: one dict per image under HALCON's keys.

    'anomaly_region' holds 'mask' (bool, input size) and 'components' (8-connected), each with 'area'
    and 'bbox' = (row_start, col_start, row_stop, col_stop), half-open like Python slices. The maps
    may differ in size (a tiled model's follow each image's); none gives [].
    """
    for name, value in (("segmentation_threshold", segmentation_threshold),
                        ("classification_threshold", classification_threshold)):
        if not is_finite_number(value):  # NaN would silently mark nothing, everything 'ok'
            raise InputError(f"threshold_dl_anomaly_results: {name} must be a finite number, got {value!r}")
    images, scores = list(anomaly_images), list(np.asarray(anomaly_scores).reshape(-1))
    if len(images) != len(scores):
        raise InputError(f"threshold_dl_anomaly_results: {len(images)} anomaly images but {len(scores)} scores")
    shapes = {np.shape(image) for image in images}
    if len(shapes) > 1:  # classified per size, returned in the given order
        results = [None] * len(images)
        for shape in shapes:
            rows = [i for i, image in enumerate(images) if np.shape(image) == shape]
            same = threshold_dl_anomaly_results([images[i] for i in rows], [scores[i] for i in rows],
                                                segmentation_threshold, classification_threshold)
            for i, result in zip(rows, same):
                results[i] = result
        return results
    if not images:
        return []
    batch = next(iterate_results({"anomaly_image": anomaly_images, "anomaly_score": anomaly_scores,
                                  "anomaly_label_id": np.zeros(len(scores), np.int32)}))
    regions = batch["anomaly_image"] >= np.float64(segmentation_threshold)  # float64, as the score below
    components, _ = label_regions(regions)
    areas = np.bincount(components.ravel())
    boxes = ndimage.find_objects(components)
    results = []
    for mask, labels, score in zip(regions, components, batch["anomaly_score"]):
        nok = bool(np.float64(score) >= classification_threshold)  # float64: float32 would round the threshold
        results.append({
            "anomaly_score": float(score),
            "anomaly_class": "nok" if nok else "ok",
            "anomaly_class_id": int(nok),
            "anomaly_region": {"mask": mask, "components": [
                {"area": int(areas[label]), "bbox": tuple(int(s) for s in _box(boxes[label - 1]))}
                for label in np.unique(labels[labels > 0])]},
            "segmentation_threshold": float(segmentation_threshold),
            "classification_threshold": float(classification_threshold),
        })
    return results


def _box(slices) -> tuple:
    _, rows, cols = slices
    return rows.start, cols.start, rows.stop, cols.stop
