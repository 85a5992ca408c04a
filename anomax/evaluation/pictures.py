"""Pictures of an evaluation as PNG files, drawn with matplotlib's Agg renderer (no display needed).

Ground-truth outlines are green, predicted-region outlines red; maps are stretched over the image so
a map at the preprocessed size overlays an image of any size.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from anomax.files import output_errors, writing

_DPI = 100
_SHOWN = 1024  # at most this many pixels on an array's long side: a picture is 400 to 1000 pixels wide


def plot_anomaly_overlay(path, image, anomaly_image, *, cmap: str = "jet", ground_truth=None, region=None,
                         value_range: tuple[float, float] | None = None, title: str | None = None) -> Path:
    """The anomaly map (any matplotlib colormap, e.g. 'jet') over the image, with optional GT and predicted outlines."""
    figure = _figure(figsize=(4, 4), layout="constrained")
    _draw_overlay(figure.add_subplot(), image, anomaly_image, cmap, ground_truth, region, value_range, title)
    figure.colorbar(figure.axes[0].images[-1], ax=figure.axes[0], shrink=0.8, label="anomaly score")
    return _save(figure, path)


def plot_worst_cases(path, false_positives: Sequence[Mapping], false_negatives: Sequence[Mapping], *,
                     cmap: str = "jet", value_range: tuple[float, float] | None = None) -> Path:
    """A grid: top row the worst false positives (highest-scored good images), bottom row the worst false
    negatives (lowest-scored defective images), all maps on one colour scale (value_range, else theirs).

    Each case is a mapping with 'image', 'anomaly_image', 'anomaly_score' and optionally
    'anomaly_ground_truth', 'anomaly_region' (predicted mask) and 'title'.
    """
    maps = [np.asarray(case["anomaly_image"]) for case in (*false_positives, *false_negatives)]
    if value_range is None and maps:
        value_range = (min(m.min() for m in maps), max(m.max() for m in maps))
    columns = max(len(false_positives), len(false_negatives), 1)
    figure = _figure(figsize=(2.6 * columns, 5.6), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for row, (name, cases) in enumerate((("good image", false_positives), ("defective image", false_negatives))):
        for column, axis in enumerate(axes[row]):
            if column >= len(cases):
                axis.set_axis_off()
                if column == 0:
                    axis.text(0.5, 0.5, f"no {name}s to show", ha="center", va="center")
                continue
            case = cases[column]
            title = case.get("title") or f"{name}\nscore {case['anomaly_score']:.4g}"
            _draw_overlay(axis, case["image"], case["anomaly_image"], cmap, case.get("anomaly_ground_truth"),
                          case.get("anomaly_region"), value_range, title)
    return _save(figure, path)


def plot_score_histogram(path, score_histogram: Mapping, thresholds: Mapping[str, float] | None = None) -> Path:
    """Image-score histograms of good and defective images (evaluate_dl_model's 'score_histogram')."""
    figure = _figure(figsize=(6, 3.5), layout="constrained")
    axis = figure.add_subplot()
    edges = np.asarray(score_histogram["bin_edges"])
    for name, color in (("good", "tab:green"), ("defective", "tab:red")):
        axis.stairs(score_histogram[name], edges, fill=True, alpha=0.5, color=color, label=name)
    for (name, value), style in zip((thresholds or {}).items(), ("--", ":", "-.", "-")):
        axis.axvline(value, color="black", linestyle=style, label=f"{name} {value:.4g}")
    axis.set(xlabel="anomaly score", ylabel="images", title="Image scores")
    axis.legend(fontsize="small")
    return _save(figure, path)


def plot_roc_curves(path, metrics: Mapping) -> Path:
    """Image ROC and, when present, pixel ROC of evaluate_dl_model's metrics."""
    figure = _figure(figsize=(4.5, 4.5), layout="constrained")
    axis = figure.add_subplot()
    for level in ("image", "pixel"):
        curve = metrics["curves"].get(f"{level}_roc")
        if curve is not None:
            axis.plot(curve["fpr"], curve["tpr"], label=f"{level} AUROC {metrics[level]['auroc']:.4f}")
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    return _save(figure, path)


def plot_pro_curve(path, metrics: Mapping) -> Path:
    """Per-region overlap against the pixel false positive rate, up to the FPR limit."""
    figure = _figure(figsize=(4.5, 4.5), layout="constrained")
    axis = figure.add_subplot()
    pixel, curve = metrics["pixel"], metrics["curves"]["pro"]
    axis.plot(curve["fpr"], curve["pro"], label=f"AUPRO@{pixel['fpr_limit']:g} {pixel['aupro']:.4f}")
    axis.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title="PRO",
             xlim=(0, pixel["fpr_limit"]), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    return _save(figure, path)


def write_evaluation_pictures(run_dir, metrics: Mapping, thresholds: Mapping[str, float] | None = None) -> dict:
    """Score histogram, ROC and (with pixel metrics) PRO pictures under run_dir/pictures; name -> path."""
    folder = Path(run_dir) / "pictures"
    pictures = {"score_histogram": plot_score_histogram(folder / "score_histogram.png", metrics["score_histogram"],
                                                        thresholds),
                "roc": plot_roc_curves(folder / "roc.png", metrics)}
    if metrics["pixel"] is not None:
        pictures["pro"] = plot_pro_curve(folder / "pro.png", metrics)
    return pictures


def _factor(shape) -> int:
    """The integer step that leaves at most _SHOWN pixels on the long side of an array of ``shape``."""
    return -(-max(shape[:2]) // _SHOWN)


def _reduced(array):
    """``array`` (a map or a mask) with at most _SHOWN pixels on its long side, each block's maximum: a
    map's peaks survive, and a mask's small defects. A 5-Mpx part drawn at full size cost 1-2 GB and
    several seconds per picture, for the same pixels on the page."""
    array = np.asarray(array)
    factor = _factor(array.shape)
    if factor <= 1:
        return array
    from skimage.measure import block_reduce

    # the last partial blocks are padded with the minimum, which raises no block's maximum
    return block_reduce(array, (factor, factor, *(1,) * (array.ndim - 2)), np.max, cval=array.min())


def _draw_overlay(axis, image, anomaly_image, cmap, ground_truth, region, value_range, title):
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    factor = _factor(image.shape)
    image = image[::factor, ::factor]  # matplotlib resamples it again for the page
    anomaly_image = _reduced(anomaly_image)
    ground_truth, region = (None if mask is None else _reduced(np.asarray(mask, bool)) for mask in (ground_truth, region))
    shown = image / 255 if image.dtype == np.uint8 else (image - image.min()) / max(np.ptp(image), 1e-12)
    if shown.ndim == 2:
        axis.imshow(shown, cmap="gray", vmin=0, vmax=1)  # unstretched, as an RGB image is shown
    else:
        axis.imshow(shown)
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # stretch maps and masks of any size over the image
    low, high = value_range or (None, None)
    axis.imshow(np.asarray(anomaly_image), cmap=cmap, alpha=0.5, extent=extent, vmin=low, vmax=high)
    for mask, color in ((ground_truth, "lime"), (region, "red")):
        if mask is not None and np.any(mask):
            axis.contour(np.asarray(mask, float), levels=[0.5], colors=color, linewidths=1, extent=extent,
                         origin="upper")
    axis.set_axis_off()
    if title:
        axis.set_title(title, fontsize="small", parse_math=False)  # file names may hold '$'


def _figure(**options):
    """A matplotlib Figure; matplotlib is imported here, not with the module: the thresholds and
    apply paths import this package and draw nothing (about a second at every start)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(figure, path) -> Path:
    """Written atomically; a full disk or a read-only folder is an OutputError naming the picture."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path) as temporary:
        figure.savefig(temporary, dpi=_DPI, format=path.suffix.lstrip(".") or "png")
    return path
