"""The synthetic dataset as a format: generated once per parameter set, then read as MVTec AD."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from anomax.data.dataset import DLDataset
from anomax.data.formats.mvtec_ad import read_mvtec_ad
from anomax.data.synthetic import (LARGE_VERSION, PARTS, PARTS_VERSION, TEXTURE_SIDE, TEXTURES,
                                   make_synthetic_dataset)
from anomax.errors import ConfigError
from anomax.registry import DATASET_FORMATS


@DATASET_FORMATS.register("synthetic")
def read_synthetic(texture: str = "brick", size: int = 64, n_train: int = 16, n_test_good: int = 8,
                   n_test_defect: int = 8, validation_from_train: float = 0.25,
                   validation_from_test: float = 0.0, seed: int = 0,
                   root: str | None = None, defect_area: list[float] | None = None) -> DLDataset:
    """Generate (unless already there) and read a synthetic dataset: ``texture`` is one of the
    textures (structural defects) or 'parts' (logical anomalies; see anomax.data.synthetic).
    ``defect_area`` [low, high]: each texture defect covers about that fraction of the image (drawn
    uniformly), e.g. [0.0001, 0.001] with size 2048 for small defects on large images.

    Files go to ``root`` or ``~/.cache/anomax/synthetic/<hash of the arguments>``; the folder is
    written under a temporary name and renamed when complete, so a half-written one is never read.
    """
    # n_test_good >= 1: the test split is read as MVTec AD's, which needs its good/ folder
    for key, value, least in (("n_train", n_train, 1), ("n_test_good", n_test_good, 1),
                              ("n_test_defect", n_test_defect, 0), ("seed", seed, 0), ("size", size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"dataset.{key} must be an integer >= {least}, got {value!r}")
    if defect_area is not None and (isinstance(defect_area, str) or not isinstance(defect_area, Sequence)
                                    or len(defect_area) != 2):
        raise ConfigError(f"dataset.defect_area must be a list [low, high], got {defect_area!r}")
    if texture not in (*TEXTURES, PARTS):  # before a folder is made for it
        raise ConfigError(f"dataset.texture = {texture!r} is invalid: it must be one of {[*TEXTURES, PARTS]}")
    spec = dict(texture=texture, size=size, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
                seed=seed)
    if texture == PARTS:  # bump PARTS_VERSION when the generator's output changes: a new cache folder
        spec["version"] = PARTS_VERSION
    elif size > TEXTURE_SIDE:  # likewise LARGE_VERSION; images up to TEXTURE_SIDE keep their folders
        spec["version"] = LARGE_VERSION
    if defect_area is not None:  # absent otherwise: the folders generated before it existed stay valid
        spec["defect_area"] = [float(v) for v in defect_area]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root or Path(os.path.expanduser("~/.cache/anomax/synthetic"))) / key
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{key}-{uuid.uuid4().hex}"  # mkdir, not mkdtemp: mode from the umask, not 0700
        staging.mkdir()
        try:
            make_synthetic_dataset(staging, size=size, n_train=n_train, n_test_good=n_test_good,
                                   n_test_defect=n_test_defect, textures=(texture,), seed=seed,
                                   defect_area=None if defect_area is None else tuple(defect_area))
            os.replace(staging, folder)
        except OSError:
            if not folder.is_dir():  # a concurrent writer may have won the rename: its folder is as good
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return read_mvtec_ad(folder, texture, validation_from_train=validation_from_train,
                         validation_from_test=validation_from_test, seed=seed)
