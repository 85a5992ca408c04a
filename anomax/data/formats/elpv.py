"""ELPV solar-cell images from the ``elpv-dataset`` package, with the ELPV protocol.

Per cell type: good = defect probability 0, defective = 1.0 (0.33 and 0.67 left out). The good
cells' file names are sorted and reordered by ``default_rng(0).permutation(n)``; train is the first
floor(0.7 n), test the other good cells plus every defective cell.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from anomax.data.dataset import DLDataset, dataset_from_records, hold_out_validation, move_test_to_validation
from anomax.errors import ConfigError, DatasetError
from anomax.registry import DATASET_FORMATS

TRAIN_FRACTION = 0.7


@DATASET_FORMATS.register("elpv")
def read_elpv(cell_type: str, validation_from_train: float = 0.0, validation_from_test: float = 0.0,
              seed: int = 0) -> DLDataset:
    """The ELPV protocol split for ``cell_type`` 'mono' or 'poly'.

    ``validation_from_train`` moves that fraction of the train cells (seeded by ``seed``, at least
    one) to a 'validation' split of good cells. ``validation_from_test`` moves a seeded, stratified
    fraction of the test cells (good and defective) to 'validation', so thresholds are estimated
    between good and defective scores while training keeps the protocol's cells (the test split is
    then smaller than the protocol's: say so beside its numbers). Both 0 keep the protocol exact.
    """
    if cell_type not in ("mono", "poly"):
        raise ConfigError(f"cell_type must be 'mono' or 'poly', got '{cell_type}'")
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None:
        raise DatasetError("the ELPV images come from the package elpv-dataset; install it: pip install elpv-dataset")
    data_dir = Path(spec.origin).parent / "data"
    labels_file = data_dir / "labels.csv"
    try:
        rows = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise DatasetError(f"cannot read {labels_file} ({error}); reinstall elpv-dataset") from None
    cells = [(path, float(probability)) for path, probability, kind in rows if kind == cell_type]
    good = sorted(path for path, probability in cells if probability == 0.0)
    defective = sorted(path for path, probability in cells if probability == 1.0)
    reordered = [good[i] for i in np.random.default_rng(0).permutation(len(good))]
    n_train = math.floor(TRAIN_FRACTION * len(good))
    records = [
        (data_dir / p, None, "ok", "good", "train" if rank < n_train else "test") for rank, p in enumerate(reordered)
    ]
    records += [(data_dir / p, None, "nok", "defective", "test") for p in defective]
    dataset = dataset_from_records(records, "elpv", data_dir / "images")
    dataset = hold_out_validation(dataset, validation_from_train, seed)
    return move_test_to_validation(dataset, validation_from_test, seed)
