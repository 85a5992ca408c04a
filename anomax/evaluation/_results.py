"""Model results read batch by batch under HALCON's key names, padding dropped, inputs checked.

A batch is a mapping with 'anomaly_score' (B,) and 'anomaly_label_id' (B,) 0 ok / 1 nok, and optionally
'anomaly_image' (B,H,W), 'anomaly_ground_truth' (B,H,W) {0,1} (or, at native resolution, B masks of any
size), 'has_ground_truth' (B,) bool (False: a defective image without a mask, whose all-zero
'anomaly_ground_truth' is no ground truth; it is left out of the pixel metrics), 'defect_type' (B,)
strings, 'index' (B,) and 'valid' (B,) bool (False marks padding).
"""

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from anomax.errors import InputError

Results = Mapping | Iterable[Mapping]


def iterate_results(results: Results, *, native_resolution: bool = False) -> Iterator[dict]:
    """Yield each batch as checked numpy arrays with padding removed; a single mapping is one batch."""
    batches = [results] if isinstance(results, Mapping) else results
    position = 0  # the default 'index': position among the (valid) images of the stream
    for number, batch in enumerate(batches):
        checked = _checked(batch, f"results batch {number}", native_resolution, position)
        position += len(checked["anomaly_score"])
        yield checked


def _checked(batch: Mapping, where: str, native_resolution: bool, position: int) -> dict:
    for key in ("anomaly_score", "anomaly_label_id"):
        if key not in batch:
            raise InputError(f"{where} has no '{key}'; it needs 'anomaly_score' and 'anomaly_label_id' per image")
    scores = _floats(batch["anomaly_score"], f"{where} 'anomaly_score'")
    if scores.ndim != 1:
        raise InputError(f"{where} 'anomaly_score' has shape {scores.shape}; expected one score per image (B,)")
    size = len(scores)
    keep = _sized(np.asarray(batch.get("valid", np.ones(size, bool)), bool), size, where, "valid")
    labels = _sized(np.asarray(batch["anomaly_label_id"]), size, where, "anomaly_label_id")
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"{where} 'anomaly_label_id' holds {np.unique(labels)}; use 0 for ok and 1 for nok")
    defect_types = _sized(np.asarray(batch.get("defect_type", ["nok"] * size), str), size, where, "defect_type")
    defect_types = np.where(labels == 0, "good", defect_types)  # ok images form the 'good' group whatever their name
    checked = {
        "anomaly_score": scores[keep],
        "anomaly_label_id": labels[keep].astype(np.int32),
        "defect_type": defect_types[keep],
        "index": (_sized(np.asarray(batch["index"]), size, where, "index")[keep] if "index" in batch
                  else position + np.arange(int(keep.sum()))),
    }
    if not np.isfinite(checked["anomaly_score"]).all():
        raise InputError(f"{where} 'anomaly_score' contains NaN or infinite values; check the model output")
    if "anomaly_image" in batch:
        maps = _floats(batch["anomaly_image"], f"{where} 'anomaly_image'")
        if maps.ndim != 3 or len(maps) != size:
            raise InputError(f"{where} 'anomaly_image' has shape {maps.shape}; expected ({size}, H, W)")
        checked["anomaly_image"] = maps = maps[keep]
        if not np.isfinite(maps).all():
            raise InputError(f"{where} 'anomaly_image' contains NaN or infinite values; check the model output")
    if batch.get("anomaly_ground_truth") is not None:
        checked["anomaly_ground_truth"] = _ground_truth(batch["anomaly_ground_truth"], checked, keep, where,
                                                        native_resolution)
        has = _sized(np.asarray(batch.get("has_ground_truth", np.ones(size, bool))), size, where, "has_ground_truth")
        if has.dtype != bool:
            raise InputError(f"{where} 'has_ground_truth' has dtype {has.dtype}; expected bool, one per image")
        checked["has_ground_truth"] = has[keep]
    return checked


def _ground_truth(raw, checked: dict, keep: np.ndarray, where: str, native_resolution: bool):
    if len(raw) != len(keep):
        raise InputError(f"{where} has {len(raw)} 'anomaly_ground_truth' masks for {len(keep)} images")
    maps = checked.get("anomaly_image")
    if native_resolution:  # one 2-D mask per image, each at its original size
        masks = [np.asarray(mask) for mask, kept in zip(raw, keep) if kept]
        shapes, fits = [mask.shape for mask in masks], all(mask.ndim == 2 for mask in masks)
        binary = all(np.isin(mask, (0, 1)).all() for mask in masks)
    else:
        try:
            masks = np.asarray(raw)[keep]
        except ValueError:  # masks of different sizes make a ragged array
            masks = None
        shapes = [np.shape(mask) for mask in raw] if masks is None else masks.shape
        fits = masks is not None and masks.ndim == 3 and (maps is None or masks.shape == maps.shape)
        binary = fits and np.isin(masks, (0, 1)).all()
    if not fits:
        expected = "one 2-D mask per image" if maps is None or native_resolution else f"{maps.shape}"
        raise InputError(f"{where} 'anomaly_ground_truth' of shape {shapes} does not match the anomaly images, "
                         f"expected {expected}; resize the masks to the anomaly images' size (evaluate_dl_model "
                         "also scores masks at their original sizes with native_resolution=True)")
    if not binary:
        raise InputError(f"{where} 'anomaly_ground_truth' holds values other than 0 and 1; binarise the masks")
    if any(masks[i].any() for i in np.flatnonzero(checked["anomaly_label_id"] == 0)):
        raise InputError(f"{where}: an image labelled ok (anomaly_label_id 0) has defect pixels in its "
                         "'anomaly_ground_truth'; fix its label or its mask")
    return [mask.astype(bool) for mask in masks] if native_resolution else masks.astype(bool)


def _floats(values, where: str) -> np.ndarray:
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{where} has dtype {array.dtype}; expected numbers")
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)


def _sized(array: np.ndarray, size: int, where: str, key: str) -> np.ndarray:
    if array.shape != (size,):
        raise InputError(f"{where} '{key}' has shape {array.shape}; expected ({size},), one value per image")
    return array
