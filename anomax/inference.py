"""The host side of applying a model, the same for every runtime (JAX, onnxruntime, OpenVINO): raw
images checked, preprocessed a batch at a time, the network's outputs split into one result per
image and classified with the model's thresholds. numpy only, so that a model loaded into an ONNX
runtime starts without importing JAX.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from anomax.errors import ConfigError, InputError
from anomax.preprocess.params import PreprocessParams, preprocess_image
from anomax.settings import is_finite_number


def padded(rows, size: int) -> np.ndarray:
    """``rows`` (n >= 1, ...) with its last row repeated up to ``size`` rows: a short batch at a fixed
    shape, so a jitted function compiles once (the caller masks or drops the repeats)."""
    rows = np.asarray(rows)
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), 0)])


def checked_images(images: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """``apply``'s input: a sequence of images, or one (N, H, W, C) array. A single image given as an
    array would be taken row by row for H images; a (N, H, W) stack cannot be told from one RGB image."""
    if hasattr(images, "ndim") and images.ndim != 4:  # numpy, JAX or any other array
        raise InputError(f"apply takes a list of images or one (N, H, W, C) array, got one array of shape "
                         f"{images.shape}; pass a single image as [image]")
    return images


def apply_in_batches(images: Sequence[np.ndarray], preprocess: PreprocessParams, batch_size: int,
                     run: Callable[[np.ndarray], Mapping[str, np.ndarray]], thresholds: Mapping[str, float],
                     pad: Literal["batch", "bucket", "none"] = "bucket") -> list[dict[str, Any]]:
    """What every runtime's ``apply`` does around its inference ``run``: raw images preprocessed
    ``batch_size`` at a time, one result dict per image,
    classified with ``thresholds``. A short last batch is padded, repeating its last image, to
    ``batch_size`` ('batch': a run with one fixed batch), to the next power of two ('bucket': a
    compiled run then compiles at most log2(batch_size) + 1 shapes, and one image costs one image's
    inference, not a whole batch's), or not at all ('none')."""
    images = checked_images(images)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = np.stack([preprocess_image(preprocess, np.asarray(image)) for image in images[start:start + batch_size]])
        size = {"batch": batch_size, "bucket": min(batch_size, 1 << (len(chunk) - 1).bit_length()),
                "none": len(chunk)}[pad]
        out = run(padded(chunk, size))
        for row in range(len(chunk)):  # copies: a view would keep the whole batch's maps alive
            results.append({key: (float(value[row]) if np.ndim(value) == 1 else np.array(value[row]))
                            for key, value in out.items()})
    return classified(results, thresholds)


def classified(results: list[dict[str, Any]], thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """With both thresholds: 'anomaly_class', 'anomaly_class_id' and 'anomaly_region' added to each result."""
    from anomax.evaluation.thresholds import threshold_dl_anomaly_results

    if {"segmentation", "classification"} <= set(thresholds):
        applied = threshold_dl_anomaly_results([r["anomaly_image"] for r in results],
                                               [r["anomaly_score"] for r in results],
                                               thresholds["segmentation"], thresholds["classification"])
        for result, extra in zip(results, applied):
            result.update(extra)
    return results


def checked_thresholds(thresholds: Mapping[str, float]) -> dict[str, float]:
    """The model parameter 'thresholds': {} or finite 'segmentation' and 'classification' values."""
    if not (set(thresholds) in (set(), {"segmentation", "classification"})
            and all(is_finite_number(v) for v in thresholds.values())):
        raise ConfigError(f"model parameter 'thresholds' must be {{}} or finite 'segmentation' and "
                          f"'classification' values, got {thresholds!r}")
    return {key: float(value) for key, value in thresholds.items()}
