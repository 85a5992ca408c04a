"""MVTec AD: ``<root>/<category>/train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``."""

from __future__ import annotations

import logging
from pathlib import Path

from anomax.data.dataset import (DLDataset, dataset_from_records, hold_out_validation, read_dl_dataset_anomaly,
                                 move_test_to_validation)
from anomax.errors import DatasetError
from anomax.registry import DATASET_FORMATS

log = logging.getLogger("anomax")


@DATASET_FORMATS.register("mvtec_ad")
def read_mvtec_ad(root: str | Path, category: str, validation_from_train: float = 0.0,
                  validation_from_test: float = 0.0, seed: int = 0) -> DLDataset:
    """One MVTec AD category with its own train/test split.

    ``validation_from_train`` holds out that fraction of the train images (seeded) as a good-only
    'validation' split; ``validation_from_test`` moves a seeded, stratified fraction of the test
    images (good and defective) to 'validation'. The defaults 0 keep the published protocol.
    """
    folder = Path(root) / category
    if not Path(root).is_dir():
        raise DatasetError(f"MVTec AD root {root} does not exist; dataset.root names the folder holding the categories")
    if not folder.is_dir():
        known = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        raise DatasetError(f"MVTec AD category folder {folder} does not exist; categories in {root}: {known}")
    ground_truth = folder / "ground_truth"
    parts = {
        "train": read_dl_dataset_anomaly(folder / "train"),
        "test": read_dl_dataset_anomaly(folder / "test", ground_truth if ground_truth.is_dir() else None),
    }
    records = [
        (s.image_file_name, s.anomaly_file_name, s.anomaly_label, s.defect_type, split)
        for split, part in parts.items()
        for s in part.samples
    ]
    dataset = dataset_from_records(records, "mvtec_ad", folder, ground_truth if ground_truth.is_dir() else None)
    defective = sum(s.anomaly_label == "nok" for s in dataset.samples)
    if defective and not dataset.has_pixel_ground_truth:
        log.warning("MVTec AD category %s has no ground_truth/ folder with masks: its %d defective images have no "
                    "masks, so only image-level metrics exist", folder, defective)
    dataset = hold_out_validation(dataset, validation_from_train, seed)
    return move_test_to_validation(dataset, validation_from_test, seed)
