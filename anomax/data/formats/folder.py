"""HALCON's folder layout: ``image_dir/<good|ok|defect class>/``, optional mirrored ``anomaly_dir``."""

from __future__ import annotations

from pathlib import Path

from anomax.data.dataset import DLDataset, read_dl_dataset_anomaly
from anomax.registry import DATASET_FORMATS


@DATASET_FORMATS.register("folder")
def read_folder(
    image_dir: str | Path | None = None,
    anomaly_dir: str | Path | None = None,
    image_list: list[str | Path] | None = None,
    anomaly_list: list[str | Path | None] | None = None,
) -> DLDataset:
    """Same as ``read_dl_dataset_anomaly``; the dataset has no split until ``split_dl_dataset``."""
    return read_dl_dataset_anomaly(image_dir, anomaly_dir, image_list=image_list, anomaly_list=anomaly_list)
