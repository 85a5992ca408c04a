"""Image and pixel metrics from one curve type: counts of negatives and positives at each threshold.

Convention everywhere: a score is anomalous iff score >= threshold (as scikit-learn's curves).
Image metrics are exact (distinct scores are the thresholds, ties count half in AUROC like sklearn).
Pixel metrics are exact or streamed through fixed-width bins (`PixelAccumulator`).
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomax.errors import InputError
from anomax.settings import is_integer

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
        if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.number)) or not 0 < fpr_limit <= 1:
            raise InputError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
        fpr, pro = self.pro_curve(fpr_limit)
        return float(np.trapezoid(pro, fpr) / fpr_limit)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of each image of a boolean (B,H,W) stack, numbered across the stack."""
    return ndimage.label(masks, structure=_EIGHT_CONNECTED)


def image_curve(scores, labels) -> Curve:
    """Exact curve of image scores against labels (1 = anomalous, 0 = good; both needed)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise InputError(f"image metrics need one score and one label per image, got scores {scores.shape} "
                         f"and labels {labels.shape}")
    if not (np.issubdtype(scores.dtype, np.number) and np.isfinite(scores).all()):
        raise InputError("image metrics need finite scores; the scores hold NaN, infinite or non-numeric values")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == bool) or not np.isin(labels, (0, 1)).all():
        raise InputError(f"image labels must be 0 (good) or 1 (anomalous), got {np.unique(labels)[:5]}")
    if not (labels == 0).any() or not (labels == 1).any():
        raise InputError("image metrics need good (0) and anomalous (1) images; the labels hold only one class")
    values, inverse = np.unique(scores, return_inverse=True)
    anomalous = labels.astype(bool)
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
    anomaly_images, masks = np.asarray(anomaly_images), np.asarray(masks).astype(bool)
    if anomaly_images.ndim != 3 or masks.shape != anomaly_images.shape:  # regions are found per image
        raise InputError(f"AUPRO needs maps and masks of one shape (N, H, W), got maps {anomaly_images.shape} and "
                         f"masks {masks.shape}")
    if masks.all() or not masks.any():  # as auroc: a curve needs defect and defect-free pixels
        raise InputError("AUPRO needs defect and defect-free pixels; the masks hold only one class")
    accumulator = PixelAccumulator(exact=True)
    accumulator.add(anomaly_images, masks)
    return accumulator.curve().aupro(fpr_limit)


def _is_range(pair) -> bool:
    """A finite (low, high) with low < high."""
    try:
        low, high = (float(value) for value in pair)
    except (TypeError, ValueError):
        return False
    return np.isfinite(low) and np.isfinite(high) and low < high


_CHUNK = 1 << 20  # pixels binned at a time: bounded temporaries for high-resolution maps


class PixelAccumulator:
    """Pixel ROC / PR / PRO counts gathered batch by batch, in one pass.

    exact=True keeps every pixel score (small sets). Otherwise scores are counted in num_bins bins:
    over a fixed ``pixel_range`` (values outside go to the end bins), or, with pixel_range None, over
    bins that adapt to the data: their width is a power of two and their edges multiples of it, and
    when a batch falls outside, neighbouring bins merge pairwise (the width doubles) until every
    score fits. The curves are exact at the final bin lower edges (pixels sharing a bin count as
    tied), memory stays O(num_bins), and accumulators merge exactly (the finer one coarsens).
    PRO needs no per-region state: weighting each defect pixel by 1 / (its region's area) makes the
    weighted count above a threshold equal the sum of the regions' overlaps.
    """

    def __init__(self, pixel_range: tuple[float, float] | None = None, num_bins: int = 10_000, *,
                 exact: bool = False):
        if not is_integer(num_bins) or num_bins < 1:
            raise InputError(f"num_bins must be an integer >= 1, got {num_bins!r}")
        if pixel_range is not None and not _is_range(pixel_range):
            raise InputError(f"pixel_range must be None or finite (low, high) with low < high, got {pixel_range!r}")
        self.pixel_range, self.num_bins, self.exact = pixel_range, num_bins, exact
        self.num_regions = 0
        self._scores, self._anomalous, self._weights = [], [], []  # exact mode
        self._counts = np.zeros((3, num_bins if pixel_range is not None else 0))  # negatives, positives, overlap
        self._lowest = np.inf  # fixed range: the first bin also holds the scores below it
        self._exponent, self._start = None, 0  # adaptive bins: width 2**exponent, first bin index

    def add(self, anomaly_images: np.ndarray, masks: np.ndarray) -> None:
        """Add maps (B,H,W) and boolean ground truth (B,H,W); regions are 8-connected per image."""
        if not len(masks):  # e.g. a batch whose defective images all lack masks
            return
        maps, anomalous = np.asarray(anomaly_images), np.asarray(masks, bool)
        if not np.isfinite(maps).all():
            raise InputError("anomaly maps hold NaN or inf; pixel metrics need finite scores")
        regions, num_regions = label_regions(anomalous)
        areas = np.bincount(regions.ravel())
        areas[0] = 1
        self.num_regions += num_regions
        maps, anomalous, regions = maps.ravel(), anomalous.ravel(), regions.ravel()
        if self.exact:
            weights = np.zeros(len(maps))
            weights[anomalous] = 1.0 / areas[regions[anomalous]]
            self._scores.append(maps.astype(np.float64))
            self._anomalous.append(anomalous)
            self._weights.append(weights)
            return
        if self.pixel_range is None:  # the grid for the batch's whole range first: chunks then bin alike
            self._adaptive_grid(float(maps.min()), float(maps.max()))
        else:
            self._lowest = min(self._lowest, float(maps.min()))
        # in chunks, with float weights only on defect pixels: a 2500² map held 221 MiB of temporaries
        size = self._counts.shape[1]
        for start in range(0, len(maps), _CHUNK):
            part = slice(start, start + _CHUNK)
            bins, defect = self._bins(maps[part].astype(np.float64)), anomalous[part]
            positives = np.bincount(bins[defect], minlength=size)
            self._counts[0] += np.bincount(bins, minlength=size) - positives
            self._counts[1] += positives
            self._counts[2] += np.bincount(bins[defect], 1.0 / areas[regions[part][defect]], size)

    def _bins(self, scores: np.ndarray) -> np.ndarray:
        """Bin positions of float64 ``scores`` in the current grid (fixed, or adaptive and already wide enough)."""
        if self.pixel_range is None:
            return np.floor(scores / 2.0**self._exponent).astype(np.int64) - self._start
        low, high = self.pixel_range
        bins = np.clip(((scores - low) * (self.num_bins / (high - low))).astype(np.int64), 0, self.num_bins - 1)
        # the product rounds a score at a bin edge into either bin; move it to the bin whose lower
        # edge (the curve's threshold) it reaches, so `score >= threshold` agrees with the counts
        edges = np.r_[self._fixed_edges(), np.inf]
        bins -= (bins > 0) & (scores < edges[bins])
        bins += scores >= edges[bins + 1]
        return bins

    def _adaptive_grid(self, low: float, high: float) -> None:
        """Widen (coarsen) and extend the adaptive grid until it holds [low, high]."""
        if self._exponent is None:
            span = max(high - low, abs(high) * 1e-6, 1e-12)
            self._exponent = int(np.floor(np.log2(span / self.num_bins)))
            self._start = int(np.floor(low / 2.0**self._exponent))
        while True:
            width = 2.0**self._exponent
            first = int(np.floor(low / width))
            first = min(self._start, first) if self._counts.shape[1] else first
            last = max(self._start + self._counts.shape[1] - 1, int(np.floor(high / width)))
            if last - first < self.num_bins:
                break
            self._coarsen(self._exponent + 1)
        grown = np.zeros((3, last - first + 1))
        grown[:, self._start - first:self._start - first + self._counts.shape[1]] = self._counts
        self._counts, self._start = grown, first

    def _coarsen(self, exponent: int) -> None:
        """Merge bins until their width is 2**exponent (edges stay multiples of the width)."""
        while self._exponent < exponent:
            index = self._start + np.arange(self._counts.shape[1])
            start = self._start >> 1
            merged = np.zeros((3, (index[-1] >> 1) - start + 1 if len(index) else 0))
            for row in range(3):
                np.add.at(merged[row], (index >> 1) - start, self._counts[row])
            self._counts, self._start, self._exponent = merged, start, self._exponent + 1

    def merged(self, other: "PixelAccumulator") -> "PixelAccumulator":
        """A new accumulator holding both (e.g. good images plus one defect type)."""
        merged = PixelAccumulator(self.pixel_range, self.num_bins, exact=self.exact)
        merged.num_regions = self.num_regions + other.num_regions
        if self.exact:
            merged._scores, merged._anomalous, merged._weights = (
                self._scores + other._scores, self._anomalous + other._anomalous, self._weights + other._weights)
        elif self.pixel_range is not None:
            merged._counts, merged._lowest = self._counts + other._counts, min(self._lowest, other._lowest)
        else:
            for part in (self, other):
                if part._exponent is None:
                    continue
                part = part._copy()
                if merged._exponent is None:
                    merged._exponent, merged._start, merged._counts = part._exponent, part._start, part._counts
                    continue
                exponent = max(merged._exponent, part._exponent)
                part._coarsen(exponent)
                merged._coarsen(exponent)
                first = min(merged._start, part._start)
                last = max(merged._start + merged._counts.shape[1], part._start + part._counts.shape[1])
                counts = np.zeros((3, last - first))
                for source in (merged, part):
                    counts[:, source._start - first:source._start - first + source._counts.shape[1]] += source._counts
                merged._counts, merged._start = counts, first
                while merged._counts.shape[1] > self.num_bins:
                    merged._coarsen(merged._exponent + 1)
        return merged

    def _copy(self) -> "PixelAccumulator":
        copy = PixelAccumulator(self.pixel_range, self.num_bins, exact=self.exact)
        copy._counts, copy._exponent, copy._start = self._counts.copy(), self._exponent, self._start
        return copy

    def curve(self) -> Curve:
        if self.exact:
            values, inverse = np.unique(np.concatenate(self._scores), return_inverse=True)
            anomalous = np.concatenate(self._anomalous)
            weights = (~anomalous, anomalous, np.concatenate(self._weights))
            counts = [np.bincount(inverse, w, len(values)) for w in weights]
            return Curve.from_counts(values, *counts, num_regions=self.num_regions)
        if self.pixel_range is not None:
            values = self._fixed_edges()
            # the first bin's threshold reaches down to the lowest score clipped into it, so applying a
            # threshold read off the curve there classifies those pixels as the curve counted them
            values[0] = min(values[0], self._lowest)
        else:
            values = (self._start + np.arange(self._counts.shape[1])) * 2.0 ** (self._exponent or 0)
        return Curve.from_counts(values, *self._counts, num_regions=self.num_regions)

    def _fixed_edges(self) -> np.ndarray:
        """The lower edges of the fixed pixel_range bins: the curve's thresholds."""
        low, high = self.pixel_range
        return low + (high - low) * np.arange(self.num_bins) / self.num_bins

    @property
    def resolution(self) -> dict:
        if self.exact:
            return {"mode": "exact"}
        if self.pixel_range is not None:
            return {"mode": "histogram", "num_bins": self.num_bins, "pixel_range": [float(v) for v in self.pixel_range]}
        return {"mode": "adaptive histogram", "num_bins": self.num_bins,
                "bin_width": 2.0 ** (self._exponent or 0), "bins_used": int(self._counts.shape[1])}
