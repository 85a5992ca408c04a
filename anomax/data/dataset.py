"""The anomaly-detection dataset with HALCON semantics: samples, reading, splitting, JSON manifest.

A folder named ``good`` or ``ok`` (any case) holds normal images (label 'ok'); every other
folder is a defect class (label 'nok'). Ground-truth masks are matched to images by file name
within the same sub-folder, and every mask pixel > 0 is a defect.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anomax.data.images import IMAGE_SUFFIXES, image_shape, list_files, read_mask
from anomax.errors import ConfigError, DatasetError
from anomax.files import write_json_atomic
from anomax.registry import DATASET_FORMATS

log = logging.getLogger("anomax")

GOOD_FOLDER_NAMES = ("good", "ok")
MASK_FOLDER_NAMES = ("mask", "masks", "ground_truth", "groundtruth", "gt", "label", "labels", "annotations")
SPLITS = ("train", "validation", "test")
MANIFEST_VERSION = 1


@dataclasses.dataclass
class Sample:
    image_id: int
    image_file_name: str
    anomaly_label: str  # 'ok' | 'nok'
    defect_type: str  # 'good' for ok images, else the defect class (folder name)
    anomaly_file_name: str | None = None
    split: str | None = None


@dataclasses.dataclass
class DLDataset:
    samples: list[Sample]
    format: str
    class_names: list[str] = dataclasses.field(default_factory=lambda: ["ok", "nok"])
    class_ids: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    image_dir: str | None = None
    anomaly_dir: str | None = None

    @property
    def has_split(self) -> bool:
        return any(s.split is not None for s in self.samples)

    @property
    def has_pixel_ground_truth(self) -> bool:
        """Whether any defective image has a mask; without one only image-level metrics exist."""
        return any(s.anomaly_label == "nok" and s.anomaly_file_name is not None for s in self.samples)

    def samples_of(self, split: str | None) -> list[Sample]:
        """The samples of one split, in dataset order; ``None`` means all samples."""
        if split is None:
            chosen = self.samples
        else:
            if split not in SPLITS:
                raise ConfigError(f"unknown split '{split}'; known splits: {', '.join(SPLITS)}")
            if not self.has_split:
                raise DatasetError(
                    f"the {self.format} dataset from {self.image_dir} has no splits; call split_dl_dataset first"
                )
            chosen = [s for s in self.samples if s.split == split]
        if not chosen:
            counts = dict(Counter(s.split for s in self.samples))
            raise DatasetError(
                f"split '{split}' of the {self.format} dataset from {self.image_dir} is empty "
                f"(samples per split: {counts}); split the dataset so that it gets images"
            )
        return chosen

    def to_json(self, path: str | Path) -> None:
        """The dataset and its splits as a JSON manifest, written atomically (from_json reads it back)."""
        write_json_atomic(path, {"manifest_version": MANIFEST_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, path: str | Path) -> DLDataset:
        try:
            manifest = json.loads(Path(path).read_text())
            if not isinstance(manifest, dict):
                raise ValueError("it is not a JSON object")
            if manifest.pop("manifest_version") != MANIFEST_VERSION:
                raise ValueError(f"manifest_version is not {MANIFEST_VERSION}")
            samples = [Sample(**s) for s in manifest.pop("samples")]
            for sample in samples:
                if sample.anomaly_label not in ("ok", "nok") or sample.split not in (None, *SPLITS):
                    raise ValueError(f"sample {sample.image_id} has label {sample.anomaly_label!r} and split "
                                     f"{sample.split!r}")
            return cls(samples=samples, **manifest)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DatasetError(f"cannot read the dataset manifest {path} ({error}); write it with to_json") from None


def dataset_from_records(
    records: Iterable[tuple[str | Path, str | Path | None, str, str, str | None]],
    format_name: str,
    image_dir: str | Path | None = None,
    anomaly_dir: str | Path | None = None,
) -> DLDataset:
    """A dataset from ``(image, mask or None, label, defect_type, split)`` records; every file must
    exist, each image appear once, and no defective image be in 'train'."""
    samples = []
    first_of: dict[Path, str | Path] = {}
    for image_id, (image, mask, label, defect_type, split) in enumerate(records):
        for path in (image, mask):
            if path is not None and not Path(path).is_file():
                raise DatasetError(f"file {path} of the {format_name} dataset does not exist; check the dataset paths")
        if split == "train" and label == "nok":
            raise DatasetError(f"image {image} of the {format_name} dataset is defective but in its train split; "
                               "defective images never train: a format's train split holds good images only")
        resolved = Path(image).resolve()  # the same file through '..' or a symlink too
        if resolved in first_of:  # it could be drawn into two splits: trained on and tested on
            raise DatasetError(f"image {image} of the {format_name} dataset is the same file as {first_of[resolved]}; "
                               "each image may appear once")
        first_of[resolved] = image
        if label == "ok" and mask is not None:
            _check_ok_mask(image, mask)
        if mask is not None:  # from the headers, before any fit: read_pair would find it only when scoring
            (rows, cols), (mask_rows, mask_cols) = image_shape(image), image_shape(mask)
            if (rows, cols) != (mask_rows, mask_cols):
                raise DatasetError(f"mask {mask} has size {mask_cols}x{mask_rows} but its image {image} has "
                                   f"{cols}x{rows} (width x height); the mask must match its image")
        mask_file = None if mask is None else str(Path(mask).absolute())
        samples.append(Sample(image_id, str(Path(image).absolute()), label, defect_type, mask_file, split))
    if not samples:
        raise DatasetError(f"the {format_name} dataset from {image_dir} has no images")
    lossy = sorted(s.anomaly_file_name for s in samples
                   if s.anomaly_file_name and Path(s.anomaly_file_name).suffix.lower() in (".jpg", ".jpeg"))
    if lossy:  # JPEG's ringing leaves faint nonzero pixels around every edge, and any pixel > 0 is a defect
        log.warning("the %s dataset has %d JPEG mask%s (e.g. %s): lossy compression spreads a mask beyond its "
                    "edges, since every pixel > 0 marks a defect; save masks losslessly (PNG)", format_name,
                    len(lossy), "s" * (len(lossy) != 1), lossy[0])
    return DLDataset(samples, format_name, image_dir=_str(image_dir), anomaly_dir=_str(anomaly_dir))


def read_dl_dataset_anomaly(
    image_dir: str | Path | None = None,
    anomaly_dir: str | Path | None = None,
    *,
    image_list: list[str | Path] | None = None,
    anomaly_list: list[str | Path | None] | None = None,
) -> DLDataset:
    """Read an anomaly-detection dataset like HALCON's ``read_dl_dataset_anomaly``.

    Folder mode: ``image_dir/<label>/...`` with ``<label>`` = good/ok for normal images or a defect
    class; masks in ``anomaly_dir/<label>/...`` match an image by exact stem, else by
    ``<stem>_mask``, in the mirrored sub-folder. A defect image may lack a mask; a mask without an
    image, two masks for one image, or one mask for two images is an error.
    List mode: ``image_list`` with an optional ``anomaly_list`` of the same length (empty entry or
    None = no mask); the label comes from each image's parent folder name.
    """
    if (image_dir is None) == (image_list is None):
        raise ConfigError("give read_dl_dataset_anomaly either image_dir or image_list, not both or neither")
    if image_list is not None:
        if anomaly_dir is not None:
            raise ConfigError("anomaly_dir goes with image_dir; with image_list, give the masks as anomaly_list")
        return _read_lists(image_list, anomaly_list)
    if anomaly_list is not None:
        raise ConfigError("anomaly_list goes with image_list; with image_dir, give the masks as anomaly_dir")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetError(f"image directory {image_dir} does not exist; check the dataset path")
    if anomaly_dir is not None and not Path(anomaly_dir).is_dir():
        raise DatasetError(f"anomaly directory {anomaly_dir} does not exist; check the dataset path")
    if anomaly_dir is not None and image_dir.resolve().is_relative_to(Path(anomaly_dir).resolve()):
        raise ConfigError(f"the anomaly directory {anomaly_dir} holds the image directory {image_dir}: masks need a "
                          "folder of their own, with the label folders mirrored (masks/scratch/0.png for "
                          "scratch/0.png)")
    images = sorted(_image_files(image_dir))
    if anomaly_dir is not None and Path(anomaly_dir).resolve().is_relative_to(image_dir.resolve()):
        masks_inside = Path(anomaly_dir).resolve()  # e.g. dataset/masks beside dataset/good: masks, not images
        left_out = [p for p in images if p.resolve().is_relative_to(masks_inside)]
        if left_out:
            log.warning("the anomaly directory %s lies inside the image directory %s: its %d files are masks, not "
                        "images, and are left out of the images", anomaly_dir, image_dir, len(left_out))
            images = sorted(set(images) - set(left_out))
    loose = [p for p in images if p.parent == image_dir]
    if loose:  # HALCON's semantics: the folder an image sits in is its label
        log.warning("%d images lie directly in %s, not in a label folder (good/ok or a defect class); they are "
                    "left out, e.g. %s", len(loose), image_dir, loose[0].name)
        images = [p for p in images if p.parent != image_dir]
    if not any(_label_folder(p, image_dir).lower() in GOOD_FOLDER_NAMES for p in images):
        raise DatasetError(
            f"image directory {image_dir} has no folder named 'good' or 'ok' with images; "
            "normal images must be in such a folder, defect images in folders named by defect class"
        )
    classes = {_label_folder(p, image_dir) for p in images}
    empty = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name not in classes
                   and (anomaly_dir is None or not Path(anomaly_dir).resolve().is_relative_to(p.resolve())))
    if empty:
        log.warning("folders of %s without images are no class: %s", image_dir, ", ".join(empty))
    named_like_masks = sorted(c for c in classes if c.lower() in MASK_FOLDER_NAMES)
    if anomaly_dir is None and named_like_masks:
        log.warning("the defect class %s of %s is named like a folder of masks; if it holds masks, give it as the "
                    "anomaly directory (dataset.anomaly_dir)", named_like_masks[0], image_dir)
    masks = _match_masks(images, image_dir, Path(anomaly_dir)) if anomaly_dir is not None else {}
    return dataset_from_records(
        ((p, masks.get(p), *_label(_label_folder(p, image_dir)), None) for p in images),
        "folder",
        image_dir,
        anomaly_dir,
    )


# Reader arguments that name files or folders. A run's saved config records them absolute, so the
# model's dataset reads the same from any working directory (anomax-evaluate reads it again).
PATH_ARGUMENTS = {"folder": ("image_dir", "anomaly_dir", "image_list", "anomaly_list"), "mvtec_ad": ("root",),
                  "visa": ("root",), "synthetic": ("root",)}


def with_absolute_paths(dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset config ({'format': ..., reader arguments}) with its relative paths made absolute."""
    cfg = dict(dataset_cfg)
    for key in PATH_ARGUMENTS.get(cfg.get("format"), ()):
        value = cfg.get(key)
        if isinstance(value, (list, tuple)):  # an empty anomaly_list entry means no mask
            cfg[key] = [str(Path(item).absolute()) if item else item for item in value]
        elif value:
            cfg[key] = str(Path(value).absolute())
    return cfg


def read_dataset(format_name: str, **kwargs) -> DLDataset:
    """Read a dataset through the DATASET_FORMATS registry ('folder', 'mvtec_ad', 'visa', 'elpv', ...)."""
    reader = DATASET_FORMATS.get(format_name)
    signature = inspect.signature(reader)
    try:
        signature.bind(**kwargs)
    except TypeError:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            raise ConfigError(f"dataset format '{format_name}' does not accept {unknown}; its arguments are "
                              f"{list(signature.parameters)}") from None
        missing = [name for name, parameter in signature.parameters.items()
                   if parameter.default is parameter.empty and name not in kwargs]
        raise ConfigError(f"dataset format '{format_name}' needs {['dataset.' + name for name in missing]}; "
                          f"its arguments are {list(signature.parameters)}") from None
    return reader(**kwargs)


def split_dl_dataset(
    dataset: DLDataset, training_percent: float, validation_percent: float, seed: int = 0, overwrite: bool = False
) -> DLDataset:
    """A copy of ``dataset`` split as HALCON's ``split_dl_dataset`` does: defective images never train.

    'ok' images: train and validation get floor(percent · n_ok) but at least one when asked for; test
    gets the rest. Every split asked for must get an 'ok' image. 'nok' images go to validation and
    test only, in the ratio validation_percent : (100 − training_percent − validation_percent),
    stratified by defect type (validation gets the rounded share), so thresholds can be estimated
    between good and defective validation scores. Seeded by ``seed``.
    """
    for key, value in (("training_percent", training_percent), ("validation_percent", validation_percent)):
        if not _is_real(value) or not 0 <= value <= 100:
            raise ConfigError(f"{key} must be a number within 0..100, got {value!r}")
    check_seed("seed", seed)
    if training_percent + validation_percent > 100:
        raise ConfigError(
            f"training_percent + validation_percent must be at most 100, got {training_percent} + {validation_percent}"
        )
    if dataset.has_split and not overwrite:
        raise DatasetError(
            f"the {dataset.format} dataset from {dataset.image_dir} already has splits (from its format or an "
            "earlier split); keep them, or pass overwrite=True to split again"
        )
    ok = [i for i, s in enumerate(dataset.samples) if s.anomaly_label == "ok"]
    order = np.random.default_rng(seed).permutation(len(ok))
    counts = {}
    for split, percent in (("train", training_percent), ("validation", validation_percent)):
        # + 1e-9: 29 / 100 * 100 is 28.999...; the floor must not lose that image
        counts[split] = max(1, math.floor(percent / 100 * len(ok) + 1e-9)) if percent > 0 else 0
    counts["test"] = len(ok) - counts["train"] - counts["validation"]
    wanted = {
        "train": training_percent > 0,
        "validation": validation_percent > 0,
        "test": training_percent + validation_percent < 100,
    }
    if counts["test"] < 0 or any(wanted[s] and counts[s] < 1 for s in SPLITS):
        raise DatasetError(
            f"the dataset from {dataset.image_dir} has {len(ok)} 'ok' images, too few to give each of "
            f"{[s for s in SPLITS if wanted[s]]} at least one; add 'ok' images or ask for fewer splits"
        )
    split_of = ["test"] * len(dataset.samples)
    boundaries = np.cumsum([counts["train"], counts["validation"]])
    for rank, position in enumerate(order):
        split_of[ok[position]] = SPLITS[int(np.searchsorted(boundaries, rank, side="right"))]
    rest = 100 - training_percent
    defective = [i for i, s in enumerate(dataset.samples) if s.anomaly_label == "nok"]
    if defective and rest == 0:
        raise ConfigError(f"training_percent=100 leaves no validation or test split for the {len(defective)} "
                          "defective images (they never train); lower training_percent")
    share = validation_percent / rest if rest else 0.0
    for index in _stratified_share(dataset.samples, defective, share, np.random.default_rng([seed, 1])):
        split_of[index] = "validation"
    samples = [dataclasses.replace(s, split=split) for s, split in zip(dataset.samples, split_of, strict=True)]
    return dataclasses.replace(dataset, samples=samples)


def move_test_to_validation(dataset: DLDataset, fraction: float, seed: int = 0) -> DLDataset:
    """A copy with a seeded ``fraction`` (rounded) of the test images moved to 'validation', stratified
    by defect type ('good' included), for formats that bring their own train/test split (MVTec AD,
    VisA, ELPV), so thresholds see good and defective images."""
    if not _is_real(fraction) or not 0 <= fraction < 1:
        raise ConfigError(f"validation_from_test must be a number within [0, 1), got {fraction!r}")
    check_seed("seed", seed)
    test = [i for i, s in enumerate(dataset.samples) if s.split == "test"]
    moved = set(_stratified_share(dataset.samples, test, fraction, np.random.default_rng([seed, 2])))
    samples = [dataclasses.replace(s, split="validation") if i in moved else s for i, s in enumerate(dataset.samples)]
    return dataclasses.replace(dataset, samples=samples)


def _stratified_share(samples: list[Sample], indices: list[int], share: float, rng: np.random.Generator) -> list[int]:
    """round(share · n) seeded picks of ``indices``, spread over the defect types in proportion:
    floor(share · n_type) each, the rest to the types with the largest remainders (so that small
    types are not all rounded down to nothing). Equal remainders go by type name, whatever the seed:
    a seeded order would be fairer to rare types, but it would change published splits (ELPV mono's
    seed 2), so it waits for a release that may change splits."""
    groups: dict[str, list[int]] = {}
    for index in indices:
        groups.setdefault(samples[index].defect_type, []).append(index)
    names = sorted(groups)
    exact = {name: share * len(groups[name]) for name in names}
    counts = {name: math.floor(exact[name] + 1e-9) for name in names}
    remaining = math.floor(share * len(indices) + 0.5) - sum(counts.values())
    for name in sorted(names, key=lambda name: counts[name] - exact[name])[:max(0, remaining)]:
        counts[name] += 1
    picked = []
    for name in names:
        members = groups[name]
        picked += [members[j] for j in rng.permutation(len(members))[:counts[name]]]
    return sorted(picked)


def hold_out_validation(dataset: DLDataset, fraction: float, seed: int = 0) -> DLDataset:
    """A copy with a seeded ``fraction`` of the train samples (at least one) moved to 'validation'."""
    if not _is_real(fraction) or not 0 <= fraction < 1:
        raise ConfigError(f"validation_from_train must be a number within [0, 1), got {fraction!r}")
    check_seed("seed", seed)
    if fraction == 0:
        return dataset
    train = [i for i, s in enumerate(dataset.samples) if s.split == "train"]
    n_validation = max(1, math.floor(fraction * len(train) + 1e-9))  # as split_dl_dataset rounds
    if n_validation >= len(train):
        raise DatasetError(f"the train split has {len(train)} images, too few to hold out a validation split")
    held_out = {train[i] for i in np.random.default_rng(seed).permutation(len(train))[:n_validation]}
    samples = [
        dataclasses.replace(s, split="validation") if i in held_out else s for i, s in enumerate(dataset.samples)
    ]
    return dataclasses.replace(dataset, samples=samples)


def check_seed(key: str, seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {seed!r}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _read_lists(image_list, anomaly_list) -> DLDataset:
    anomaly_list = [None] * len(image_list) if anomaly_list is None else list(anomaly_list)
    if len(anomaly_list) != len(image_list):
        raise DatasetError(
            f"image_list has {len(image_list)} entries but anomaly_list {len(anomaly_list)}; they must pair up"
        )
    under_good = [image for image in image_list if _label(Path(image).parent.name)[0] == "nok"
                  and any(folder.name.lower() in GOOD_FOLDER_NAMES for folder in Path(image).parents)]
    if under_good:
        log.warning("%d images of image_list lie in a sub-folder of a good/ok folder, e.g. %s: in list mode an image's "
                    "label is its own folder's name, so they are read as the defect class '%s'", len(under_good),
                    under_good[0], Path(under_good[0]).parent.name)
    records = (
        (image, mask or None, *_label(Path(image).parent.name), None)
        for image, mask in zip(image_list, anomaly_list, strict=True)
    )
    return dataset_from_records(records, "folder")


def _match_masks(images: list[Path], image_dir: Path, anomaly_dir: Path) -> dict[Path, Path]:
    """Image → mask by exact stem, else ``<stem>_mask``, within the mirrored sub-folder."""
    masks_by_key: dict[tuple[Path, str], list[Path]] = {}
    for mask in _image_files(anomaly_dir):
        masks_by_key.setdefault((mask.parent.relative_to(anomaly_dir), mask.stem), []).append(mask)
    matched: dict[Path, Path] = {}
    for image in images:
        folder = image.parent.relative_to(image_dir)
        candidates = masks_by_key.get((folder, image.stem)) or masks_by_key.get((folder, f"{image.stem}_mask"), [])
        if len(candidates) > 1:
            raise DatasetError(f"image {image} matches several masks {[str(c) for c in candidates]}; keep one")
        if candidates:
            matched[image] = candidates[0]
    for mask, count in Counter(matched.values()).items():
        if count > 1:
            claimants = [str(i) for i, m in matched.items() if m == mask]
            raise DatasetError(f"mask {mask} matches several images {claimants}; rename the images or the mask")
    unmatched = sorted({m for ms in masks_by_key.values() for m in ms} - set(matched.values()))
    if unmatched:
        raise DatasetError(
            f"mask {unmatched[0]} has no matching image in {image_dir} ({len(unmatched)} unmatched masks); "
            "a mask must be named like its image (same stem or <stem>_mask) in the same sub-folder"
        )
    return matched


def _image_files(folder: Path) -> list[Path]:
    return list_files(folder, IMAGE_SUFFIXES)


def _check_ok_mask(image: str | Path, mask: str | Path) -> None:
    """An 'ok' image may have a mask only if it marks no defect (read only for ok images with a mask)."""
    defect_pixels = int(read_mask(mask).sum())
    if defect_pixels:
        raise DatasetError(
            f"image {image} is labelled ok but its mask {mask} has {defect_pixels} defect pixel"
            f"{'s' * (defect_pixels != 1)}; move the image to a defect folder or clear the mask"
        )


def _label_folder(image: Path, image_dir: Path) -> str:
    return image.relative_to(image_dir).parts[0]


def _label(folder_name: str) -> tuple[str, str]:
    """(anomaly_label, defect_type) of a label folder."""
    return ("ok", "good") if folder_name.lower() in GOOD_FOLDER_NAMES else ("nok", folder_name)


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).absolute())
