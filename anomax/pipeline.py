"""The workflow as library functions, driven by a composed config (a mapping, no Hydra needed).

read dataset -> split -> build model (backbone requirements -> preprocess) -> fit on 'train'
-> thresholds on 'validation' -> evaluate on 'test' -> metrics, pictures, report, artifact.
The console apps in ``anomax.apps`` only compose the config and call these.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from anomax.backbones import build_backbone
from anomax.data.dataset import DLDataset, read_dataset, split_dl_dataset
from anomax.data.images import read_image
from anomax.evaluation import (AnomalyThresholds, compute_dl_anomaly_thresholds, evaluate_dl_model,
                               plot_anomaly_overlay, plot_worst_cases, write_evaluation_pictures, write_html_report)
from anomax.features import FeatureAdaptor
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param
from anomax.registry import HEADS

log = logging.getLogger("anomax")


@dataclasses.dataclass
class EvaluateConfig:
    """Threshold estimation and evaluation settings (conf/evaluate/)."""

    threshold_split: str = "validation"
    allow_test_split: bool = False
    std_factor: float = 4.0
    segmentation_clip: Any = None  # [low, high] or null
    classification_threshold: str = "intermediate"  # largest_good | smallest_defect | intermediate | f1_image
    exact: bool = False
    num_bins: int = 10_000
    pixel_range: Any = None
    fpr_limit: float = 0.3
    native_resolution: bool = False
    histogram_bins: int = 50
    num_worst: int = 4
    colormap: str = "jet"


def read_configured_dataset(dataset_cfg: Mapping[str, Any], split_cfg: Mapping[str, Any], seed: int) -> DLDataset:
    """Read the dataset a config names; split it by percentages when the format brings no split."""
    kwargs = dict(dataset_cfg)
    fmt = kwargs.pop("format")
    kwargs.pop("name", None)
    dataset = read_dataset(fmt, **kwargs)
    if not dataset.has_split:
        dataset = split_dl_dataset(dataset, split_cfg["training_percent"], split_cfg["validation_percent"], seed=seed)
    return dataset


def build_model(cfg: Mapping[str, Any]) -> AnomalyModel:
    """Backbone, preprocess params from its requirements (config values override), adaptor and head."""
    backbone_cfg = dict(cfg["model"]["backbone"])
    backbone = build_backbone(backbone_cfg.pop("name"), **backbone_cfg)
    preprocess = {key: value for key, value in backbone.requirements.items() if key != "input_multiple"}
    preprocess.update({key: value for key, value in dict(cfg["preprocess"]).items() if value is not None})
    head_cfg = dict(cfg["model"]["head"])
    head_cls = HEADS.get(head_cfg.pop("name"))
    adaptor_cfg = dict(head_cfg.pop("adaptor"))
    adaptor_cfg["taps"] = list(adaptor_cfg.get("taps") or backbone.taps)
    if "train" in inspect.signature(head_cls).parameters:  # trained heads take the train/ group
        head_cfg["train"] = dict(cfg["train"])
    return AnomalyModel(create_dl_preprocess_param(**preprocess), backbone, FeatureAdaptor(**adaptor_cfg),
                        head_cls(**head_cfg), batch_size=cfg["batch_size"])


def results_of(model: AnomalyModel, dataset: DLDataset, split: str, cache_dir: str | None = None,
               progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Scored batches of a split under HALCON's result keys (what thresholds and evaluation read)."""
    samples = dataset.samples_of(split)
    for batch in model.score_split(dataset, split, cache_dir=cache_dir, progress=progress):
        yield {"anomaly_image": batch["anomaly_image"], "anomaly_score": batch["anomaly_score"],
               "anomaly_ground_truth": batch["mask"], "anomaly_label_id": batch["label"],
               "defect_type": np.array([samples[i].defect_type for i in batch["index"]]),
               "index": batch["index"], "valid": batch["valid"]}


def estimate_thresholds(model: AnomalyModel, dataset: DLDataset, evaluate_cfg: EvaluateConfig,
                        cache_dir: str | None = None) -> AnomalyThresholds | None:
    """HALCON's thresholds on the threshold split; None (with a warning) when the dataset has no such split."""
    split = evaluate_cfg.threshold_split
    if not any(s.split == split for s in dataset.samples):
        log.warning("the dataset has no '%s' split: thresholds are not estimated (hold out validation images, "
                    "e.g. dataset.validation_from_train=0.1)", split)
        return None
    thresholds = compute_dl_anomaly_thresholds(
        list(results_of(model, dataset, split, cache_dir)), split=split, allow_test_split=evaluate_cfg.allow_test_split,
        std_factor=evaluate_cfg.std_factor, clip=evaluate_cfg.segmentation_clip, exact=evaluate_cfg.exact,
        num_bins=evaluate_cfg.num_bins, pixel_range=evaluate_cfg.pixel_range)
    model.thresholds = {"segmentation": thresholds.segmentation,
                        "classification": getattr(thresholds, evaluate_cfg.classification_threshold)}
    return thresholds


def evaluate_split(model: AnomalyModel, dataset: DLDataset, split: str, run_dir: Path, evaluate_cfg: EvaluateConfig,
                   thresholds: AnomalyThresholds | None = None, cache_dir: str | None = None,
                   title: str = "anomax evaluation") -> dict[str, Any]:
    """Metrics of a split, with pictures and the HTML report written into ``run_dir``."""
    results = list(results_of(model, dataset, split, cache_dir))
    named = thresholds.classification() if thresholds is not None else None
    metrics = evaluate_dl_model(results, thresholds=named, exact=evaluate_cfg.exact, num_bins=evaluate_cfg.num_bins,
                                pixel_range=evaluate_cfg.pixel_range, fpr_limit=evaluate_cfg.fpr_limit,
                                histogram_bins=evaluate_cfg.histogram_bins, num_worst=evaluate_cfg.num_worst)
    pictures = write_evaluation_pictures(run_dir, metrics, named)
    pictures.update(_example_pictures(model, dataset, split, results, metrics, run_dir, evaluate_cfg.colormap))
    write_html_report(run_dir, metrics, pictures, thresholds=thresholds, title=title)
    return metrics


def _example_pictures(model, dataset, split, results, metrics, run_dir: Path, cmap: str) -> dict[str, Path]:
    """Overlays of the worst false positives and false negatives, on the original images."""
    samples = dataset.samples_of(split)
    by_index = {int(i): (batch, row) for batch in results
                for row, i in enumerate(batch["index"]) if batch["valid"][row]}
    maps = np.concatenate([b["anomaly_image"][b["valid"]] for b in results])
    value_range = (float(np.percentile(maps, 1)), float(maps.max()))

    def case(entry: Mapping[str, Any]) -> dict[str, Any]:
        batch, row = by_index[entry["index"]]
        sample = samples[entry["index"]]
        anomaly_image = batch["anomaly_image"][row]
        region = None
        if "segmentation" in model.thresholds:
            region = anomaly_image >= model.thresholds["segmentation"]
        return {"image": read_image(sample.image_file_name), "anomaly_image": anomaly_image,
                "anomaly_score": entry["anomaly_score"], "anomaly_ground_truth": batch["anomaly_ground_truth"][row],
                "anomaly_region": region,
                "title": f"{Path(sample.image_file_name).name} ({sample.defect_type})\nscore {entry['anomaly_score']:.4g}"}

    false_positives = [case(e) for e in metrics["worst_false_positives"]]
    false_negatives = [case(e) for e in metrics["worst_false_negatives"]]
    pictures = {"worst_cases": plot_worst_cases(run_dir / "pictures" / "worst_cases.png", false_positives,
                                                false_negatives, cmap=cmap, value_range=value_range)}
    for number, example in enumerate(false_negatives[:2] + false_positives[:1]):
        pictures[f"overlay_{number}"] = plot_anomaly_overlay(
            run_dir / "pictures" / f"overlay_{number}.png", example["image"], example["anomaly_image"], cmap=cmap,
            ground_truth=example["anomaly_ground_truth"], region=example["anomaly_region"],
            value_range=value_range, title=example["title"])
    return pictures


def train_and_evaluate(cfg: Mapping[str, Any], run_dir: str | Path, resolved_config: Mapping | None = None) -> dict:
    """The whole workflow into ``run_dir``: dataset.json, model/, metrics.json, pictures/, index.html."""
    from anomax.artifact import save_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluate_cfg = EvaluateConfig(**dict(cfg["evaluate"]))
    cache_dir = cfg.get("cache_dir")
    timings = {}
    start = time.perf_counter()
    model = build_model(cfg)  # first: a bad backbone, head or weights file fails before any image is read
    dataset = read_configured_dataset(cfg["dataset"], cfg["split"], cfg["seed"])
    dataset.to_json(run_dir / "dataset.json")
    log.info("dataset %s: %s", cfg["dataset"].get("name"), _split_counts(dataset))
    timings["setup_s"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_info = model.fit(dataset, "train", cache_dir=cache_dir)
    timings["fit_s"] = time.perf_counter() - start
    log.info("fit %s in %.1f s: %s", cfg["model"]["head"]["name"], timings["fit_s"], _short(fit_info))

    start = time.perf_counter()
    thresholds = estimate_thresholds(model, dataset, evaluate_cfg, cache_dir)
    metrics = evaluate_split(model, dataset, "test", run_dir, evaluate_cfg, thresholds, cache_dir,
                             title=f"anomax: {cfg['model']['head']['name']} + {cfg['model']['backbone']['name']} "
                                   f"on {cfg['dataset'].get('name')}")
    timings["evaluate_s"] = time.perf_counter() - start

    save_model(model, run_dir / "model", thresholds=thresholds, config=resolved_config, overwrite=True)
    summary = {"image_auroc": metrics["image"]["auroc"], "image_aupr": metrics["image"]["aupr"],
               "image_f1_max": metrics["image"]["f1_max"]}
    if metrics["pixel"] is not None:
        summary.update(pixel_auroc=metrics["pixel"]["auroc"], pixel_aupro=metrics["pixel"]["aupro"])
    record = {"summary": summary, "fit": fit_info, "timings": timings, "splits": _split_counts(dataset),
              "thresholds": thresholds.to_dict() if thresholds else None, "metrics": metrics}
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=1, default=_json_default))
    return record


def _split_counts(dataset: DLDataset) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sample in dataset.samples:
        split = counts.setdefault(str(sample.split), {"ok": 0, "nok": 0})
        split[sample.anomaly_label] += 1
    return counts


def _short(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if not isinstance(v, (list, dict))}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
