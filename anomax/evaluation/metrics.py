"""Image and pixel metrics from one curve type: counts of negatives and positives at each threshold.

Convention everywhere: a score is anomalous iff score >= threshold (as scikit-learn's curves).
Image metrics are exact (distinct scores are the thresholds, ties count half in AUROC like sklearn).
Pixel metrics are exact or streamed through fixed-width bins (`PixelAccumulator`).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image and none across the batch axis, so one label() call serves a batch.
_EIGHT_CONNECTED = np.zeros((3, 3, 3), bool)
_EIGHT_CONNECTED[1] = True


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at each threshold, highest threshold first."""

    thresholds: np.ndarray
    false_positives: np.ndarray
    true_positives: np.ndarray
    overlap: np.ndarray | None = None  # sum over GT regions of the covered fraction of each region
    num_regions: int = 0

    @classmethod
    def from_counts(cls, values, negatives, positives, overlap=None, num_regions=0) -> "Curve":
        """Curve from counts per value, values ascending (distinct scores, or bin lower edges)."""
        occupied = (negatives + positives) > 0
        descending = slice(None, None, -1)

        def cumulative(counts):
            return None if counts is None else np.cumsum(counts[occupied][descending])

        return cls(values[occupied][descending], cumulative(negatives), cumulative(positives),
                   cumulative(overlap), num_regions)

    @property
    def fpr(self) -> np.ndarray:
        return self.false_positives / self.false_positives[-1]

    @property
    def tpr(self) -> np.ndarray:
        return self.true_positives / self.true_positives[-1]

    @property
    def precision(self) -> np.ndarray:
        return self.true_positives / (self.true_positives + self.false_positives)

    @property
    def pro(self) -> np.ndarray:
        """Per-region overlap averaged over all ground-truth regions."""
        return self.overlap / self.num_regions

    def auroc(self) -> float:
        return float(np.trapezoid(np.r_[0, self.tpr], np.r_[0, self.fpr]))

    def average_precision(self) -> float:
        """sklearn's definition: sum over thresholds of (R_k - R_{k-1}) * P_k."""
        return float(np.sum(np.diff(np.r_[0, self.tpr]) * self.precision))

    def f1_max(self) -> tuple[float, float]:
        """Largest F1 over the thresholds and the highest threshold reaching it."""
        positives = self.true_positives[-1]
        f1 = 2 * self.true_positives / (positives + self.true_positives + self.false_positives)
        best = int(np.argmax(f1))
        return float(f1[best]), float(self.thresholds[best])

    def pro_curve(self, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) from (0, 0) up to fpr_limit, the last point linearly interpolated at the limit."""
        fpr, pro = np.r_[0, self.fpr], np.r_[0, self.pro]
        end = int(np.searchsorted(fpr, fpr_limit, side="right"))
        if end == len(fpr):
            return fpr, pro
        fraction = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
        return np.r_[fpr[:end], fpr_limit], np.r_[pro[:end], pro[end - 1] + fraction * (pro[end] - pro[end - 1])]

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under the PRO curve up to fpr_limit, divided by fpr_limit (1 is perfect)."""
        fpr, pro = self.pro_curve(fpr_limit)
        return float(np.trapezoid(pro, fpr) / fpr_limit)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of each image of a boolean (B,H,W) stack, numbered across the stack."""
    return ndimage.label(masks, structure=_EIGHT_CONNECTED)


def image_curve(scores, labels) -> Curve:
    """Exact curve of image scores against labels (1 = anomalous)."""
    values, inverse = np.unique(np.asarray(scores), return_inverse=True)
    anomalous = np.asarray(labels).astype(bool)
    return Curve.from_counts(values, np.bincount(inverse, ~anomalous, len(values)),
                             np.bincount(inverse, anomalous, len(values)))


def auroc(scores, labels) -> float:
    return image_curve(scores, labels).auroc()


def average_precision(scores, labels) -> float:
    return image_curve(scores, labels).average_precision()


def f1_max(scores, labels) -> tuple[float, float]:
    """(F1-max, threshold): classify anomalous iff score >= threshold."""
    return image_curve(scores, labels).f1_max()


def aupro(anomaly_images, masks, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO of maps (N,H,W) against binary masks (N,H,W)."""
    accumulator = PixelAccumulator()
    accumulator.add(np.asarray(anomaly_images), np.asarray(masks).astype(bool))
    return accumulator.curve().aupro(fpr_limit)


class PixelAccumulator:
    """Pixel ROC / PR / PRO counts gathered batch by batch.

    pixel_range=None keeps every pixel score (exact; for small sets). Otherwise scores fall into num_bins
    equal bins over pixel_range (values outside go to the end bins): the curves are then exact at the
    num_bins bin lower edges and pixels sharing a bin count as tied, so memory stays O(num_bins).
    PRO needs no per-region state: weighting each defect pixel by 1 / (its region's area) makes the
    weighted count above a threshold equal the sum of the regions' overlaps.
    """

    def __init__(self, pixel_range: tuple[float, float] | None = None, num_bins: int = 10_000):
        self.pixel_range, self.num_bins = pixel_range, num_bins
        self.num_regions = 0
        if pixel_range is None:
            self._scores, self._anomalous, self._weights = [], [], []
        else:
            self._negatives, self._positives, self._overlap = np.zeros((3, num_bins))

    def add(self, anomaly_images: np.ndarray, masks: np.ndarray) -> None:
        """Add maps (B,H,W) and boolean ground truth (B,H,W); regions are 8-connected per image."""
        regions, num_regions = label_regions(masks)
        areas = np.bincount(regions.ravel())
        areas[0] = 1
        weights = np.where(masks, 1.0 / areas[regions], 0.0).ravel()
        scores, anomalous = anomaly_images.ravel(), masks.ravel()
        self.num_regions += num_regions
        if self.pixel_range is None:
            self._scores.append(scores)
            self._anomalous.append(anomalous)
            self._weights.append(weights)
            return
        low, high = self.pixel_range
        bins = np.clip(((scores - low) * (self.num_bins / (high - low))).astype(np.int64), 0, self.num_bins - 1)
        self._negatives += np.bincount(bins, ~anomalous, self.num_bins)
        self._positives += np.bincount(bins, anomalous, self.num_bins)
        self._overlap += np.bincount(bins, weights, self.num_bins)

    def merged(self, other: "PixelAccumulator") -> "PixelAccumulator":
        """A new accumulator holding both (e.g. good images plus one defect type)."""
        merged = PixelAccumulator(self.pixel_range, self.num_bins)
        merged.num_regions = self.num_regions + other.num_regions
        if self.pixel_range is None:
            merged._scores, merged._anomalous, merged._weights = (
                self._scores + other._scores, self._anomalous + other._anomalous, self._weights + other._weights)
        else:
            merged._negatives, merged._positives, merged._overlap = (
                self._negatives + other._negatives, self._positives + other._positives, self._overlap + other._overlap)
        return merged

    def curve(self) -> Curve:
        if self.pixel_range is None:
            values, inverse = np.unique(np.concatenate(self._scores), return_inverse=True)
            anomalous = np.concatenate(self._anomalous)
            weights = (~anomalous, anomalous, np.concatenate(self._weights))
            counts = [np.bincount(inverse, w, len(values)) for w in weights]
        else:
            low, high = self.pixel_range
            values = low + (high - low) * np.arange(self.num_bins) / self.num_bins
            counts = [self._negatives, self._positives, self._overlap]
        return Curve.from_counts(values, *counts, num_regions=self.num_regions)

    @property
    def resolution(self) -> dict:
        if self.pixel_range is None:
            return {"mode": "exact"}
        return {"mode": "histogram", "num_bins": self.num_bins, "pixel_range": [float(v) for v in self.pixel_range]}
