"""The workflow as library functions, driven by a composed config (a mapping, no Hydra needed).

validate settings -> build model (backbone requirements -> preprocess) -> read dataset -> split
-> fit on 'train' -> thresholds on 'validation' -> evaluate on 'test' -> metrics, pictures, report,
artifact. Every setting is validated before any image is read; results stream through the
metrics (only the maps the pictures need are kept). The console apps only compose the config
and call these.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import inspect
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from anomax import __version__
from anomax.augment import AugmentConfig
from anomax.backbones import backbone_requirements, build_backbone
from anomax.data.dataset import DLDataset, read_dataset, split_dl_dataset, with_absolute_paths
from anomax.data.images import read_image
from anomax.distributed import DistributedConfig, check_model, check_same_job, is_main, is_multi_process
from anomax.ensemble import (MEMBER_KEYS, NORMALISATION_KEYS, ConcatBackbone, EnsembleConfig, ScoreEnsemble,
                              check_concat_members, concat_backbone, concat_requirements)
from anomax.errors import AnomaxError, ConfigError
from anomax.evaluation import (AnomalyThresholds, compute_dl_anomaly_thresholds, evaluate_dl_model,
                               plot_anomaly_overlay, plot_worst_cases, write_evaluation_pictures, write_html_report)
from anomax.evaluation.config import EvaluateConfig
from anomax.evaluation.metrics import auroc
from anomax.features import AdaptorConfig, FeatureAdaptor
from anomax.kernels.maps import blur_radius
from anomax.files import claim_run_dir, write_json_atomic
from anomax.model import AnomalyModel, border_under_tiling, fit_summary
from anomax.preprocess.params import PreprocessParams, create_dl_preprocess_param, crop_to_domain
from anomax.registry import DATASET_FORMATS, HEADS
from anomax.settings import MAX_SEED, Settings, setting
from anomax.tiling import TilingConfig, check_tileable, native_mask
from anomax.training import TrainConfig

log = logging.getLogger("anomax")

__all__ = ["EvaluateConfig", "RunConfig", "SplitConfig", "build_model", "estimate_thresholds", "evaluate_split",
           "read_configured_dataset", "read_unsplit_dataset", "results_of", "split_unless_own", "train_and_evaluate"]


@dataclasses.dataclass(frozen=True)
class SplitConfig(Settings):
    """HALCON's split percentages, for datasets that bring no split of their own (the rest is test;
    defective images go to validation and test in the ratio validation : test)."""

    section: ClassVar[str] = "split"
    training_percent: float = setting(70.0, ge=0, le=100)
    validation_percent: float = setting(15.0, ge=0, le=100)

    def check(self) -> None:
        if self.training_percent + self.validation_percent > 100:
            self.fail("validation_percent", f"at most 100 - training_percent = {100 - self.training_percent}")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Settings):
    """What the artifact holds besides the JAX model: onnx also writes model.onnx (needs anomax[deploy])."""

    section: ClassVar[str] = "export"
    onnx: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig(Settings):
    """The top level of anomax-train: seed (split, projections, coreset start, training), images per
    compiled batch, the preprocessed-cache folder (null: preprocess on the fly), progress bars."""

    section: ClassVar[str] = "anomax-train"
    seed: int = setting(0, ge=0, le=MAX_SEED)
    batch_size: int = setting(16, ge=1)
    cache_dir: str | None = None
    progress: bool = True

    def fail(self, key: str, rule: str):  # top-level keys are typed without a section prefix
        raise ConfigError(f"{key} = {getattr(self, key, None)!r} is invalid: it must be {rule} "
                          f"(set it on the command line: {key}=...)")


def read_configured_dataset(dataset_cfg: Mapping[str, Any], split_cfg: Mapping[str, Any] | SplitConfig,
                            seed: int) -> DLDataset:
    """Read the dataset a config names; split it by HALCON's percentages when the format brings no split."""
    return split_unless_own(read_unsplit_dataset(dataset_cfg), split_cfg, seed)


def read_unsplit_dataset(dataset_cfg: Mapping[str, Any]) -> DLDataset:
    """The dataset a config names, with the split its format brings, if any."""
    kwargs = dict(dataset_cfg)
    if "format" not in kwargs:  # a user's dataset YAML without its schema default
        raise ConfigError(f"the dataset config {kwargs.get('name', '')!r} has no 'format'; start its YAML with "
                          f"'defaults: [schema_<format>, _self_]' (format one of {DATASET_FORMATS.names()}), as "
                          f"conf/dataset/*.yaml do, which also checks its keys")
    fmt = kwargs.pop("format")
    kwargs.pop("name", None)
    return read_dataset(fmt, **kwargs)


def split_unless_own(dataset: DLDataset, split_cfg: Mapping[str, Any] | SplitConfig, seed: int) -> DLDataset:
    """Split by HALCON's percentages a dataset whose format brings no split; for one that does, the
    percentages do not apply, and percentages other than the defaults are warned of."""
    split = split_cfg if isinstance(split_cfg, SplitConfig) else SplitConfig.from_dict(split_cfg)
    if not dataset.has_split:
        return split_dl_dataset(dataset, split.training_percent, split.validation_percent, seed=seed)
    if split != SplitConfig():
        log.warning("split percentages %s are not used: the %s dataset brings its own split", split.to_dict(),
                    dataset.format)
    return dataset


def build_model(cfg: Mapping[str, Any]) -> AnomalyModel:
    """Head and adaptor settings (validated first), backbone, preprocess params from its requirements
    (config values override)."""
    head_cfg = dict(cfg["model"]["head"])
    head_cls = HEADS.get(head_cfg.pop("name"))
    adaptor = AdaptorConfig.from_dict(head_cfg.pop("adaptor", None))
    head = head_cls(head_cls.Config.from_dict(head_cfg))
    backbone = build_configured_backbone(cfg["model"]["backbone"])
    given = {key: value for key, value in dict(cfg["preprocess"]).items() if value is not None}
    if isinstance(backbone, ConcatBackbone):
        # as arrays: the config gives lists where the requirements hold tuples
        changed = sorted(key for key in NORMALISATION_KEYS
                         if key in given and not np.array_equal(given[key], backbone.requirements.get(key)))
        if changed:
            raise ConfigError(f"preprocess.{changed[0]}: a backbone ensemble converts its first member's input "
                              f"normalisation to each other member's, so the normalisation must be the first "
                              f"member's; leave preprocess.{changed[0]} null")
    adaptor = adaptor.replace(taps=adaptor.taps or tuple(backbone.taps))
    tiling = TilingConfig.from_dict(cfg.get("tiling"))  # checked against the backbone by AnomalyModel
    preprocess = create_dl_preprocess_param(**filled_preprocess(backbone.requirements, given))
    return AnomalyModel(preprocess, backbone, FeatureAdaptor(adaptor), head,
                        batch_size=cfg["batch_size"], augment=AugmentConfig.from_dict(cfg.get("augment")),
                        tiling=tiling)


def build_configured_backbone(backbone_cfg: Mapping[str, Any]):
    """``model.backbone``: one registered backbone, or ``name: concat`` with its ``members`` side by side."""
    backbone_cfg = dict(backbone_cfg)
    name = backbone_cfg.pop("name")
    if name == "concat":
        return concat_backbone(backbone_cfg["members"])
    return build_backbone(name, **backbone_cfg)


def results_of(model: AnomalyModel, dataset: DLDataset, split: str, cache_dir: str | None = None,
               progress: bool = True, native_resolution: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Scored batches of a split under HALCON's result keys (what thresholds and evaluation read),
    plus any further maps the head gives ('anomaly_image_local', ...). ``native_resolution``: the
    ground truth is each image's mask at its original (ROI-cropped) size, one array per image."""
    samples = dataset.samples_of(split)
    for batch in model.score_split(dataset, split, cache_dir=cache_dir, progress=progress):
        extra = {key: value for key, value in batch.items() if key.startswith("anomaly_") and key not in
                 ("anomaly_image", "anomaly_score")}
        ground_truth = batch["mask"]  # tiled models' masks are at the ROI-cropped size already
        if native_resolution and not model.tiling.enabled:
            ground_truth = [native_mask(model.preprocess, samples[i]) for i in batch["index"]]
        yield {"anomaly_image": batch["anomaly_image"], "anomaly_score": batch["anomaly_score"],
               "anomaly_ground_truth": ground_truth, "anomaly_label_id": batch["label"],
               # a defective image without a mask file: its all-zero mask is no ground truth
               "has_ground_truth": np.array([samples[i].anomaly_label == "ok" or samples[i].anomaly_file_name is not None
                                             for i in batch["index"]], bool),
               "defect_type": np.array([samples[i].defect_type for i in batch["index"]]),
               "index": batch["index"], "valid": batch["valid"], **extra}


def check_thresholds_possible(dataset: DLDataset, evaluate_cfg: EvaluateConfig) -> None:
    """Fail before the fit when the chosen classification threshold cannot be estimated."""
    split = evaluate_cfg.threshold_split
    defective = sum(s.split == split and s.anomaly_label == "nok" for s in dataset.samples)
    if evaluate_cfg.classification_threshold == "f1_image" and not defective:
        raise ConfigError(f"evaluate.classification_threshold = 'f1_image' needs defective images in the "
                          f"'{split}' split, which has none; choose largest_good, smallest_defect or intermediate, "
                          f"or give the split defective images (split.validation_percent / "
                          f"dataset.validation_from_test)")
    if evaluate_cfg.classification_threshold in ("smallest_defect", "intermediate") and not defective \
            and any(s.split == split for s in dataset.samples):
        log.warning("the '%s' split holds no defective images: the '%s' classification threshold falls back to "
                    "largest_good", split, evaluate_cfg.classification_threshold)


def check_objective_possible(dataset: DLDataset, evaluate_cfg: EvaluateConfig) -> None:
    """Fail before the fit when a search's objective, the validation image AUROC, cannot be measured."""
    counts = _split_counts(dataset).get("validation", {"ok": 0, "nok": 0})
    if evaluate_cfg.threshold_split != "validation" or not (counts["ok"] and counts["nok"]):
        raise ConfigError(
            f"a search (hydra/sweeper=optuna) optimises the validation image AUROC, which needs "
            f"evaluate.threshold_split=validation (got {evaluate_cfg.threshold_split}) and good and defective "
            f"validation images (got {counts['ok']} good, {counts['nok']} defective: dataset.validation_from_test or "
            "split.validation_percent give it some)")


def has_evaluable_test_split(dataset: DLDataset) -> bool:
    """Fail before the fit when the test split is empty. False, with a warning, when it lacks good or
    defective images (a dataset of good images only, HALCON's usual start): the model is then fitted,
    its thresholds estimated and saved, and the metrics, which need both classes, are left out."""
    test = dataset.samples_of("test")  # a DatasetError naming each split's count when it is empty
    labels = {s.anomaly_label for s in test}
    if labels != {"ok", "nok"}:
        log.warning("the test split holds %s images only: the model is fitted and saved but not evaluated (metrics "
                    "need good and defective images); once it has both, anomax-evaluate model_dir=... scores it",
                    "good" if labels == {"ok"} else "defective")
    return labels == {"ok", "nok"}


def estimate_thresholds(model: AnomalyModel, dataset: DLDataset, evaluate_cfg: EvaluateConfig,
                        cache_dir: str | None = None, progress: bool = True) -> tuple[AnomalyThresholds | None, dict]:
    """HALCON's thresholds on the threshold split, set on the model; with them the split's image
    metrics (the objective a search optimises). (None, {}) with a warning when there is no such split."""
    split = evaluate_cfg.threshold_split
    if not any(s.split == split for s in dataset.samples):
        log.warning("the dataset has no '%s' split: thresholds are not estimated (give it validation images, "
                    "e.g. dataset.validation_from_test=0.5 or split.validation_percent)", split)
        return None, {}
    scores, labels = [], []

    def watched(batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            scores.append(batch["anomaly_score"][batch["valid"]])
            labels.append(batch["anomaly_label_id"][batch["valid"]])
            yield batch

    thresholds = compute_dl_anomaly_thresholds(
        watched(results_of(model, dataset, split, cache_dir, progress)), split=split,
        allow_test_split=evaluate_cfg.allow_test_split, std_factor=evaluate_cfg.std_factor,
        clip=evaluate_cfg.segmentation_clip, exact=evaluate_cfg.exact, num_bins=evaluate_cfg.num_bins,
        pixel_range=evaluate_cfg.pixel_range)
    model.set_params(thresholds={"segmentation": thresholds.segmentation,
                                 "classification": getattr(thresholds, evaluate_cfg.classification_threshold)})
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    metrics = {"num_good": int((labels == 0).sum()), "num_defective": int((labels == 1).sum())}
    if metrics["num_good"] and metrics["num_defective"]:
        metrics["image_auroc"] = auroc(scores, labels)
    return thresholds, metrics


class _WorstMaps:
    """While results stream through, keeps what the worst-case pictures need: the maps of the
    highest-scored good and lowest-scored defective images, and the largest map value."""

    def __init__(self, count: int):
        self.count = max(2 * count, 4)  # a margin over the count shown: ties may rank either way
        self.kept: dict[int, list] = {0: [], 1: []}  # heaps of (priority, index, entry)
        self.high = -np.inf

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            valid = np.asarray(batch["valid"], bool)
            if valid.any():
                self.high = max(self.high, float(batch["anomaly_image"][valid].max()))
            for row in np.flatnonzero(valid):
                label = int(batch["anomaly_label_id"][row])
                score = float(batch["anomaly_score"][row])
                priority = score if label == 0 else -score
                heap = self.kept[label]
                if len(heap) < self.count or priority > heap[0][0]:
                    entry = {key: np.array(value[row]) for key, value in batch.items()  # copies: a view keeps its batch
                             if key.startswith("anomaly_image") or key == "anomaly_ground_truth"}
                    item = (priority, int(batch["index"][row]), entry)
                    (heapq.heapreplace if len(heap) >= self.count else heapq.heappush)(heap, item)
            yield batch

    def entry(self, index: int) -> dict | None:
        return next((entry for heap in self.kept.values() for _, i, entry in heap if i == index), None)


def evaluate_split(model: AnomalyModel, dataset: DLDataset, split: str, run_dir: Path, evaluate_cfg: EvaluateConfig,
                   thresholds: AnomalyThresholds | None = None, cache_dir: str | None = None,
                   title: str = "anomax evaluation", progress: bool = True) -> dict[str, Any]:
    """Metrics of a split, with pictures and the HTML report written into ``run_dir``; the scored
    batches stream through the metrics, so memory does not grow with the split."""
    worst = _WorstMaps(evaluate_cfg.num_worst)
    named = dict(thresholds.classification()) if thresholds is not None else {}
    own = model.thresholds.get("classification")
    if own is not None and own not in named.values():  # the threshold the model classifies with, set by hand
        named["model"] = own
    native = evaluate_cfg.native_resolution
    metrics = evaluate_dl_model(worst.watch(results_of(model, dataset, split, cache_dir, progress, native)),
                                thresholds=named, native_resolution=native,
                                exact=evaluate_cfg.exact, num_bins=evaluate_cfg.num_bins,
                                pixel_range=evaluate_cfg.pixel_range, fpr_limit=evaluate_cfg.fpr_limit,
                                histogram_bins=evaluate_cfg.histogram_bins, num_worst=evaluate_cfg.num_worst)
    if not is_main():  # with several processes, process 0 writes the pictures and the report
        return metrics
    notes = []
    unmasked = sum(s.split == split and s.anomaly_label == "nok" and s.anomaly_file_name is None for s in dataset.samples)
    if not dataset.has_pixel_ground_truth:
        notes.append("The defective images have no ground-truth masks: only image-level metrics exist.")
    elif unmasked:
        notes.append(f"{unmasked} defective images of the '{split}' split have no ground-truth mask: they are left "
                     "out of the pixel metrics.")
    used = [name for name, at in metrics["at_thresholds"].items()
            if at["threshold"] == model.thresholds.get("classification")]
    if used:
        notes.append(f"The model classifies images with the '{used[0]}' threshold "
                     f"({model.thresholds['classification']:.6g}); anomaly_region uses 'segmentation'.")
    with tqdm(total=2, desc="report", unit="step", disable=not progress) as bar:
        pictures = write_evaluation_pictures(run_dir, metrics, named)
        pictures.update(_example_pictures(model, dataset, split, worst, metrics, run_dir, evaluate_cfg.colormap))
        bar.update()
        write_html_report(run_dir, metrics, pictures, thresholds=thresholds, title=title, notes=notes)
        bar.update()
    return metrics


def _example_pictures(model, dataset, split, worst: _WorstMaps, metrics, run_dir: Path, cmap: str) -> dict[str, Path]:
    """Overlays of the worst false positives and false negatives on the original images (their domain box
    with crop_domain, which is what the maps cover); for heads with several maps (local, global) one
    overlay per map."""
    samples = dataset.samples_of(split)

    def case(listed: Mapping[str, Any]) -> dict[str, Any] | None:
        entry = worst.entry(listed["index"])
        if entry is None:
            return None
        sample = samples[listed["index"]]
        anomaly_image = entry["anomaly_image"]
        region = (anomaly_image >= np.float64(model.thresholds["segmentation"])  # as threshold_dl_anomaly_results
                  if "segmentation" in model.thresholds else None)
        return {"image": crop_to_domain(model.preprocess, read_image(sample.image_file_name)), "anomaly_image": anomaly_image,
                "anomaly_score": listed["anomaly_score"], "anomaly_ground_truth": entry["anomaly_ground_truth"],
                "anomaly_region": region,
                "branches": {k: v for k, v in entry.items() if k.startswith("anomaly_image_")},
                "title": f"{Path(sample.image_file_name).name} ({sample.defect_type})\n"
                         f"score {listed['anomaly_score']:.4g}"}

    false_positives = [c for c in map(case, metrics["worst_false_positives"]) if c is not None]
    false_negatives = [c for c in map(case, metrics["worst_false_negatives"]) if c is not None]
    shown = [c["anomaly_image"] for c in false_positives + false_negatives]
    value_range = (min(float(np.percentile(m, 1)) for m in shown), worst.high) if shown else None
    folder = run_dir / "pictures"
    pictures = {"worst_cases": plot_worst_cases(folder / "worst_cases.png", false_positives, false_negatives,
                                                cmap=cmap, value_range=value_range)}
    for number, example in enumerate(false_negatives[:2] + false_positives[:1]):
        maps = {"": example["anomaly_image"], **{f"_{k.removeprefix('anomaly_image_')}": v
                                                 for k, v in example["branches"].items()}}
        for suffix, anomaly_image in maps.items():
            pictures[f"overlay_{number}{suffix}"] = plot_anomaly_overlay(
                folder / f"overlay_{number}{suffix}.png", example["image"], anomaly_image, cmap=cmap,
                ground_truth=example["anomaly_ground_truth"], region=example["anomaly_region"] if not suffix else None,
                value_range=value_range if not suffix else None,
                title=example["title"] + (f" [{suffix[1:]} map]" if suffix else ""))
    return pictures


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Every validated settings group of a training run."""

    run: RunConfig
    split: SplitConfig
    preprocess: Mapping[str, Any]
    adaptor: AdaptorConfig
    head: Settings
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    augment: AugmentConfig
    tiling: TilingConfig
    distributed: DistributedConfig
    ensemble: EnsembleConfig
    members: tuple[RunSettings, ...] = ()  # a score ensemble's members, each validated as a run


# What a score-ensemble member sets for itself; the rest (dataset, split, evaluation, batch size, ...)
# is the run's, so every member scores the same images in the same batches.
MEMBER_SECTIONS = ("model", "preprocess", "augment", "train")


# The sections of a run's config beside RunConfig's keys (conf/anomax_train.yaml).
RUN_SECTIONS = ("dataset", "split", "preprocess", "model", "train", "evaluate", "export", "augment", "tiling",
                "distributed", "ensemble")


def _check_known_keys(cfg: Mapping[str, Any]) -> None:
    """Hydra's schema refuses a mistyped key, but ``+key=...`` (what Hydra's own message suggests)
    adds it anyway: one at the top level or in model / model.backbone would be ignored or crash."""
    backbone = cfg["model"]["backbone"]
    sections = {"": (cfg, {*RunConfig().to_dict(), *RUN_SECTIONS}),
                "model.": (cfg["model"], {"backbone", "head"}),
                "model.backbone.": (backbone, {"name", "members"} if backbone.get("name") == "concat"
                                    else set(MEMBER_KEYS))}  # build_backbone's arguments
    dataset = cfg.get("dataset") or {}
    if dataset.get("format") in DATASET_FORMATS.names():  # its reader's arguments; a user's YAML without one
        sections["dataset."] = (dataset, {"format", "name",  # fails where it is read, with its own message
                                          *inspect.signature(DATASET_FORMATS.get(dataset["format"])).parameters})
    for prefix, (section, known) in sections.items():
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(prefix + key for key in unknown)}: not a setting of "
                              f"anomax-train; known {prefix.rstrip('.') or 'top-level'} keys: {', '.join(sorted(known))}")


def validate_config(cfg: Mapping[str, Any], members: Sequence[Mapping[str, Any]] = ()) -> RunSettings:
    """Check every setting of a composed config; a wrong value raises ConfigError naming its key.
    Runs before any weights or images are read (preprocess nulls are filled from the backbone later).
    ``members``: a score ensemble's composed member configs, one per ``ensemble.members`` entry
    (anomax.apps.config.ensemble_member_configs), each checked as a run of its own."""
    _check_known_keys(cfg)
    # first: the top-level settings (seed, ...) that others interpolate, so an error names them
    run = RunConfig.from_dict({key: cfg.get(key, default) for key, default in RunConfig().to_dict().items()})
    head_cfg = dict(cfg["model"]["head"])
    head_cls = HEADS.get(head_cfg.pop("name"))
    adaptor = AdaptorConfig.from_dict(head_cfg.pop("adaptor", None))
    backbone = cfg["model"]["backbone"]
    if adaptor.taps is None and backbone.get("taps"):  # built only to check grid_tap against the taps the
        adaptor.replace(taps=tuple(backbone["taps"]))    # features will have; the settings keep taps unset
    preprocess = {key: value for key, value in dict(cfg.get("preprocess") or {}).items() if value is not None}
    if backbone["name"] == "concat":
        check_concat_members(backbone.get("members"))
        params = PreprocessParams.from_dict(preprocess)  # the given values on their own must be valid too
        multiple = concat_requirements([backbone_requirements(member["name"])
                                        for member in backbone["members"]])["input_multiple"]
    else:
        requirements = backbone_requirements(backbone["name"])
        _check_range_normalisation(backbone["name"], requirements, preprocess)
        params = PreprocessParams.from_dict(filled_preprocess(requirements, preprocess))  # as build_model fills them
        multiple = requirements["input_multiple"]
    tiling = TilingConfig.from_dict(cfg.get("tiling"))
    if not tiling.enabled:  # tiled, the image keeps its size and tile_size is checked against the backbone
        for key in ("height", "width"):
            size = getattr(params, key)
            if size % multiple:
                raise ConfigError(f"preprocess.{key} = {size}: backbone '{backbone['name']}' takes sizes that are "
                                  f"multiples of {multiple}; choose e.g. {max(multiple, round(size / multiple) * multiple)}")
    settings = RunSettings(
        run=run, split=SplitConfig.from_dict(cfg.get("split")), preprocess=preprocess, adaptor=adaptor,
        head=head_cls.Config.from_dict(head_cfg), train=TrainConfig.from_dict(cfg.get("train")),
        evaluate=EvaluateConfig.from_dict(cfg.get("evaluate")), export=ExportConfig.from_dict(cfg.get("export")),
        augment=AugmentConfig.from_dict(cfg.get("augment")), tiling=tiling,
        distributed=DistributedConfig.from_dict(cfg.get("distributed")),
        ensemble=EnsembleConfig.from_dict(cfg.get("ensemble")))
    sigma = getattr(settings.head, "sigma", 0.0)
    radius, map_side = blur_radius(sigma), tiling.tile_size or min(params.height, params.width)
    if radius >= map_side:  # else found when the first map is drawn, after the fit
        raise ConfigError(f"model.head.sigma = {sigma}: its Gaussian's radius, {radius} pixels, needs maps "
                          f"larger than that, and the {'tiles' if tiling.enabled else 'model inputs'} are {map_side} "
                          "pixels; lower model.head.sigma")
    if settings.tiling.enabled and getattr(settings.head, "border", 0):  # fit refuses it too (the API's path)
        raise ConfigError(border_under_tiling(settings.head.border))
    if settings.tiling.enabled and settings.export.onnx:
        raise ConfigError("export.onnx = true is not available with tiling (tiling.tile_size is set): the ONNX "
                          "runtimes score whole images, not tiles; set export.onnx=false")
    return dataclasses.replace(settings, members=_validate_members(cfg, settings, members))


def filled_preprocess(requirements: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Preprocess values: the backbone's requirements (HALCON's get_dl_model_param), then the given ones."""
    return {**{key: value for key, value in requirements.items() if key != "input_multiple"}, **given}


def _check_range_normalisation(backbone: str, requirements: Mapping[str, Any], preprocess: Mapping[str, Any]) -> None:
    """A backbone trained on mean/std-normalised inputs, given a range normalisation (none, all_channels,
    first_channel) without its range, would see HALCON's default [-127, 128]: about 50x the scale it
    was trained on, silently. The range must then be given."""
    wanted = requirements.get("normalization_type")
    given = preprocess.get("normalization_type", wanted)
    if wanted == "constant_values" and given != wanted and not {"range_min", "range_max"} <= set(preprocess):
        raise ConfigError(f"preprocess.normalization_type={given}: backbone {backbone} expects inputs normalised "
                          f"by constant mean and std (normalization_type=constant_values); with '{given}' set "
                          f"preprocess.range_min and preprocess.range_max to the value range it expects (about "
                          f"-2 and 2.4 for ImageNet's mean and std), or leave preprocess.normalization_type null")


def _validate_members(cfg: Mapping[str, Any], settings: RunSettings,
                      members: Sequence[Mapping[str, Any]]) -> tuple[RunSettings, ...]:
    """Each score-ensemble member's settings; what an ensemble cannot do fails here, naming the key."""
    wanted = settings.ensemble.members
    if len(members) != len(wanted):
        raise ConfigError(f"ensemble.members lists {len(wanted)} members, but {len(members)} member configs were "
                          f"given; compose them with anomax.apps.config.ensemble_member_configs(cfg, overrides), as "
                          f"anomax-train does")
    if not members:
        return ()
    for key, refused in (("tiling.tile_size", settings.tiling.enabled), ("export.onnx", settings.export.onnx),
                         ("distributed.mode", settings.distributed.mode != "off")):
        if refused:
            raise ConfigError(f"{key}: not available with a score ensemble (ensemble.members is set); leave "
                              f"{key.split('.')[0]} at its default or set ensemble=off")
    shared = [{key: value for key, value in config.items() if key not in (*MEMBER_SECTIONS, "ensemble")}
              for config in (cfg, *members)]
    checked = []
    for number, member in enumerate(members):
        where = f"ensemble.members[{number}] ({list(wanted[number])})"
        try:
            checked.append(validate_config(member))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        if checked[-1].ensemble.members:
            raise ConfigError(f"{where}: a member is one model; its config must have ensemble=off")
        key = _first_difference(shared[0], shared[number + 1])
        if key is not None:
            raise ConfigError(f"{where}: {key} differs from the run's; a member sets only its own "
                              f"{', '.join(MEMBER_SECTIONS)} (the rest is the run's)")
        same = next((other for other in range(number) if _what_fits(members[other]) == _what_fits(member)), None)
        if same is not None:
            head = member["model"]["head"]["name"]
            why = "" if HEADS.get(head).trained else f" (model.head '{head}' trains no networks: train.* changes nothing)"
            raise ConfigError(f"{where}: the same model as ensemble.members[{same}]{why}; give each member other "
                              f"overrides")
    return tuple(checked)


def _what_fits(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The parts of a run config that decide its fitted model: all of it, less ``train`` for heads that train
    nothing (PaDiM's and PatchCore's statistics do not follow train.seed)."""
    if HEADS.get(config["model"]["head"]["name"]).trained:
        return config
    return {key: value for key, value in config.items() if key != "train"}


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first dotted key whose value differs between two nested mappings, or None."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for name in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(name), b.get(name), f"{key}.{name}" if key else str(name))
            if found is not None:
                return found
        return None
    return None if a == b else key


def warn_of_unused_settings(cfg: Mapping[str, Any], settings: RunSettings,
                            members: Sequence[Mapping[str, Any]] = ()) -> None:
    """train.* given for a head that fits its statistics in one pass, said rather than silently ignored
    (split.* for a dataset that brings its own split: split_unless_own)."""
    trained_heads = [name for name in HEADS.names() if HEADS.get(name).trained]
    for config, run in zip(members, settings.members) if members else [(cfg, settings)]:
        head = config["model"]["head"]["name"]
        changed = {key: value for key, value in run.train.to_dict().items() if value != TrainConfig().to_dict()[key]}
        if changed and not HEADS.get(head).trained:
            log.warning("train.* %s is not used: model.head=%s fits its statistics in one pass (train.* sets the "
                        "epochs of %s)", changed, head, ", ".join(trained_heads))


def build_run_model(cfg: Mapping[str, Any],
                    members: Sequence[Mapping[str, Any]] = ()) -> AnomalyModel | ScoreEnsemble:
    """The run's model: one (build_model), or a score ensemble of its members' models."""
    return ScoreEnsemble([build_model(member) for member in members]) if members else build_model(cfg)


def train_and_evaluate(cfg: Mapping[str, Any], run_dir: str | Path, resolved_config: Mapping | None = None,
                       members: Sequence[Mapping[str, Any]] = (), objective: bool = False) -> dict:
    """The whole workflow into ``run_dir``: dataset.json, model/, metrics.json, pictures/, index.html.
    ``members``: with ``ensemble.members`` set, the members' composed configs
    (anomax.apps.config.ensemble_member_configs); each member is fitted on the train split and
    normalised on the validation split's good images, then everything else runs on the ensemble.
    ``objective``: the run is a search's trial, whose validation image AUROC must be measurable."""
    from anomax.artifact import save_model

    settings = validate_config(cfg, members)  # every setting first: nothing is read before they all hold
    run, train_cfg, evaluate_cfg, split_cfg = settings.run, settings.train, settings.evaluate, settings.split
    # This run's alone: refused while another run holds it, or when it holds another run's outputs.
    # Only process 0 writes outputs, so only it claims the directory.
    with claim_run_dir(run_dir) if is_main() else contextlib.nullcontext(Path(run_dir)) as run_dir:
        log.info("anomax %s", __version__)
        timings = {}
        start = time.perf_counter()
        model = build_run_model(cfg, members)
        check_model(model)
        if is_multi_process():  # one global mesh: each process feeds its devices' shard of every batch
            model.set_params(device="all")
        dataset = read_configured_dataset(cfg["dataset"], split_cfg, run.seed)
        check_same_job(cfg, dataset, ("seed", "batch_size", *RUN_SECTIONS))
        warn_of_unused_settings(cfg, settings, members)
        check_thresholds_possible(dataset, evaluate_cfg)
        check_tileable(model, dataset)
        if objective:
            check_objective_possible(dataset, evaluate_cfg)
        evaluable = has_evaluable_test_split(dataset)
        if is_main():
            dataset.to_json(run_dir / "dataset.json")
        log.info("dataset %s: %s", cfg["dataset"].get("name"), _split_counts(dataset))
        timings["setup_s"] = time.perf_counter() - start

        start = time.perf_counter()
        train = [member.train for member in settings.members] or train_cfg  # members may set their own
        fit_info = model.fit(dataset, "train", train=train, cache_dir=run.cache_dir, progress=run.progress)
        timings["fit_s"] = time.perf_counter() - start
        log.info("fit %s in %.1f s: %s", model.description, timings["fit_s"], fit_summary(fit_info))

        start = time.perf_counter()
        thresholds, on_threshold_split = estimate_thresholds(model, dataset, evaluate_cfg, run.cache_dir,
                                                             run.progress)
        # the objective of a search: the validation split's AUROC only, never another threshold split's (test)
        validation = on_threshold_split if evaluate_cfg.threshold_split == "validation" else {}
        thresholds_s = time.perf_counter() - start
        start = time.perf_counter()
        if is_main():  # before the test split is read: a file there that fails does not cost the fit
            saved = resolved_config and {**resolved_config, "dataset": with_absolute_paths(resolved_config["dataset"])}
            save_model(model, run_dir / "model", thresholds=thresholds, config=saved,
                       onnx=settings.export.onnx)  # (an ONNX export clears JAX's caches: the test split recompiles)
        timings["save_s"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics, summary = None, {}
        if evaluable:
            try:
                metrics = evaluate_split(model, dataset, "test", run_dir, evaluate_cfg, thresholds, run.cache_dir,
                                         title=f"anomax: {model.description} on {cfg['dataset'].get('name')}",
                                         progress=run.progress)
            except AnomaxError as error:
                raise type(error)(f"{error} (the fitted model is saved in {run_dir / 'model'}: once the input is "
                                  f"fixed, anomax-evaluate model_dir={run_dir / 'model'} scores the test split)") from None
            summary = {"image_auroc": metrics["image"]["auroc"], "image_aupr": metrics["image"]["aupr"],
                       "image_f1_max": metrics["image"]["f1_max"]}
            if metrics["pixel"] is not None:
                summary.update(pixel_auroc=metrics["pixel"]["auroc"], pixel_aupro=metrics["pixel"]["aupro"])
        timings["evaluate_s"] = thresholds_s + time.perf_counter() - start  # thresholds + test split, not the save
        record = {"anomax_version": __version__, "summary": summary, "validation": validation, "fit": fit_info,
                  "timings": timings,
                  "splits": _split_counts(dataset), "thresholds": thresholds.to_dict() if thresholds else None,
                  "classification_threshold": evaluate_cfg.classification_threshold, "metrics": metrics}
        if is_main():
            write_json_atomic(run_dir / "metrics.json", record, default=_json_default)
        return record


def summary_text(record: Mapping[str, Any], run_dir: str | Path) -> str:
    """The end-of-run summary: metrics, thresholds and the confusion matrix at the classification threshold
    the model was saved with (HALCON's intermediate by default), and where everything was written."""
    lines = ["test:        " + ("  ".join(f"{key} {value:.4f}" for key, value in record["summary"].items())
                                 or "not evaluated (metrics need good and defective test images)")]
    if record.get("validation", {}).get("image_auroc") is not None:
        lines.append(f"validation:  image_auroc {record['validation']['image_auroc']:.4f}")
    thresholds = record.get("thresholds")
    if thresholds:
        named = ", ".join(f"{key} {thresholds[key]:.4g}" for key in
                          ("segmentation", "largest_good", "smallest_defect", "intermediate", "f1_image")
                          if thresholds.get(key) is not None)
        lines.append(f"thresholds ({thresholds['split']}, {thresholds['num_good']} good, "
                     f"{thresholds['num_defective']} defective): {named}")
        used = record.get("classification_threshold") or "intermediate"  # the one the saved model classifies with
        at = (record["metrics"] or {}).get("at_thresholds", {}).get(used)
        if at is not None:
            (ok_ok, ok_nok), (nok_ok, nok_nok) = at["absolute_confusion_matrix"]
            lines += [f"confusion matrix on test at {used} = {at['threshold']:.4g} (the model's classification threshold):",
                      "                  truth ok  truth nok",
                      f"  predicted ok   {ok_ok:9d}  {ok_nok:9d}",
                      f"  predicted nok  {nok_ok:9d}  {nok_nok:9d}"]
    else:
        lines.append("thresholds: not estimated (no validation split)")
    timings = record["timings"]
    lines.append(f"fit {timings['fit_s']:.1f} s, thresholds + evaluation {timings['evaluate_s']:.1f} s, save "
                 f"{timings['save_s']:.1f} s -> {run_dir}")
    return "\n".join(lines)


def _split_counts(dataset: DLDataset) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sample in dataset.samples:
        split = counts.setdefault(str(sample.split), {"ok": 0, "nok": 0})
        split[sample.anomaly_label] += 1
    return counts


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
