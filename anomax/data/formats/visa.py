"""VisA: a split CSV with columns object, split, label, image, mask (paths relative to ``root``)."""

from __future__ import annotations

import csv
from pathlib import Path

from anomax.data.dataset import DLDataset, dataset_from_records, hold_out_validation, move_test_to_validation
from anomax.errors import DatasetError
from anomax.registry import DATASET_FORMATS

COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": ("ok", "good"), "anomaly": ("nok", "anomaly")}


@DATASET_FORMATS.register("visa")
def read_visa(
    root: str | Path,
    split_csv: str | Path = "split_csv/1cls.csv",
    category: str | None = None,
    validation_from_train: float = 0.0,
    validation_from_test: float = 0.0,
    seed: int = 0,
) -> DLDataset:
    """The rows of ``split_csv`` (relative to ``root`` unless absolute), optionally one ``category``.

    Splits come from the CSV ('train'/'test'); ``validation_from_train`` holds out that fraction of
    the train images (seeded) as 'validation', ``validation_from_test`` a stratified fraction of the
    test images (good and defective); the defaults 0 keep the published protocol.
    """
    root, csv_path = Path(root), Path(root) / split_csv
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} does not exist; check root and split_csv")
    with open(csv_path, newline="", encoding="utf-8-sig") as file:  # -sig: a byte-order mark (Excel's "CSV UTF-8")
        reader = csv.DictReader(file)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or ()]  # "object, split, ..." too
        rows = list(reader)
    missing = set(COLUMNS) - set(reader.fieldnames)
    if missing:
        raise DatasetError(f"VisA split file {csv_path} lacks the columns {sorted(missing)}; it needs {list(COLUMNS)}")
    if not rows:
        raise DatasetError(f"VisA split file {csv_path} has a header but no rows")
    records = []
    for line, row in enumerate(rows, start=2):
        if None in row.values():  # csv.DictReader fills a short row with None
            raise DatasetError(f"{csv_path} line {line} has fewer fields than the header {list(COLUMNS)}")
        if category is not None and row["object"] != category:
            continue
        if row["label"] not in LABELS or row["split"] not in ("train", "test"):
            raise DatasetError(
                f"{csv_path} line {line}: label '{row['label']}' / split '{row['split']}' is not one of "
                f"{list(LABELS)} / ['train', 'test']"
            )
        mask = root / row["mask"] if row["mask"].strip() else None
        records.append((root / row["image"], mask, *LABELS[row["label"]], row["split"]))
    if not records:
        categories = sorted({row["object"] for row in rows})
        raise DatasetError(f"VisA split file {csv_path} has no rows for category '{category}'; its categories: "
                           f"{categories}")
    dataset = hold_out_validation(dataset_from_records(records, "visa", root), validation_from_train, seed)
    return move_test_to_validation(dataset, validation_from_test, seed)
