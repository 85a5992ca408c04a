"""HALCON's folder layout: ``image_dir/<good|ok|defect class>/``, optional mirrored ``anomaly_dir``.

The format is ``read_dl_dataset_anomaly`` itself; the dataset has no split until ``split_dl_dataset``.
"""

from anomax.data.dataset import read_dl_dataset_anomaly
from anomax.registry import DATASET_FORMATS

DATASET_FORMATS.register("folder")(read_dl_dataset_anomaly)
