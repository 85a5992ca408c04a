"""Threshold estimation and evaluation settings (conf/evaluate/), validated before any work."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from anomax.settings import Settings, setting



@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Settings):
    """threshold_split: where thresholds are fitted ('test' needs allow_test_split and warns).
    std_factor: segmentation threshold = mean + std_factor * std of the good pixel scores.
    segmentation_clip: [low, high] clip of that threshold (null: none). classification_threshold:
    HALCON's rule (or the F1-optimal image threshold) applied by the saved model. exact: keep every
    pixel score instead of num_bins histogram bins over pixel_range ([low, high]; null: bins
    that widen with the data). fpr_limit: AUPRO integration limit. native_resolution: pixel metrics
    against the original-size masks (after the ROI crop), each map upsampled bilinearly to its mask
    (tiled maps are there already). histogram_bins, num_worst, colormap: the report's pictures."""

    section: ClassVar[str] = "evaluate"
    threshold_split: Literal["validation", "test"] = "validation"
    allow_test_split: bool = False
    std_factor: float = setting(4.0, ge=0)
    segmentation_clip: tuple[float | None, ...] | None = None
    classification_threshold: Literal["largest_good", "smallest_defect", "intermediate", "f1_image"] = "intermediate"
    exact: bool = False
    num_bins: int = setting(10_000, ge=2)
    pixel_range: tuple[float, ...] | None = None
    fpr_limit: float = setting(0.3, gt=0, le=1)
    native_resolution: bool = False
    histogram_bins: int = setting(50, ge=1)
    num_worst: int = setting(4, ge=0)
    colormap: str = "jet"

    def check(self) -> None:
        clip = self.segmentation_clip
        if clip is not None and (len(clip) != 2 or None not in clip and clip[0] > clip[1]):
            self.fail("segmentation_clip", "null or [low, high] with low <= high (either may be null)")
        if self.pixel_range is not None and (len(self.pixel_range) != 2 or self.pixel_range[0] >= self.pixel_range[1]):
            self.fail("pixel_range", "null or [low, high] with low < high")
        if self.threshold_split == "test" and not self.allow_test_split:
            self.fail("threshold_split", "'validation' unless evaluate.allow_test_split=true (thresholds fitted "
                                         "on the test split make its metrics optimistic)")
        if not is_colormap(self.colormap):
            self.fail("colormap", COLORMAP_RULE)


COLORMAP_RULE = "a matplotlib colormap name such as 'jet', 'hot', 'viridis'"


def is_colormap(name: str) -> bool:
    from matplotlib import colormaps  # only here: matplotlib is slow to import

    return name in colormaps
