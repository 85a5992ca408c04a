"""anomax-evaluate: a saved model on a dataset split -> metrics.json, pictures and index.html."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from anomax.apps._common import (check_known_keys, load_configured_model, plain, print_version_if_asked,
                                 reports_errors)
from anomax.apps.config import CONF_DIR, EvaluateAppConfig, register_schemas
from anomax.errors import ConfigError, DatasetError

log = logging.getLogger("anomax")

# evaluate settings that estimate thresholds: the model applies the ones saved at training
THRESHOLD_KEYS = ("threshold_split", "allow_test_split", "std_factor", "segmentation_clip", "classification_threshold")


def as_trained(config: Mapping[str, Any], trained: Mapping[str, Any] | None) -> tuple[dict, dict, int, dict | None]:
    """The dataset, split percentages and seed to read: each one given, else the training run's
    (``trained``: the model's config.json), so that its test split is the one it was tested on,
    never images it was trained on; and, when it is the training run's dataset, that run's seed and
    split (for warn_of_a_new_split)."""
    from anomax.data.dataset import with_absolute_paths
    from anomax.pipeline import RunConfig, SplitConfig

    trained = dict(trained or {})
    if trained.get("dataset"):  # models saved before their configs recorded absolute paths
        trained["dataset"] = with_absolute_paths(trained["dataset"])
    dataset = with_absolute_paths(config["dataset"]) if config["dataset"] else trained.get("dataset")
    if not dataset:
        raise ConfigError(f"dataset: the model at {config['model_dir']} was saved without its training config, so "
                          "name the dataset to evaluate on (e.g. dataset=elpv_mono, or dataset=folder "
                          "dataset.image_dir=PATH)")
    seed = config["seed"]  # filled in from the training run before the config resolved (_evaluate)
    RunConfig.from_dict({"seed": seed})  # a negative seed fails here, naming the key
    percent = config["split_percent"] or {}
    if not isinstance(percent, Mapping):
        raise ConfigError(f"split_percent = {percent!r} is invalid: it must hold training_percent and/or "
                          "validation_percent (split_percent.training_percent=60)")
    given = {key: value for key, value in percent.items() if value is not None}

    class SplitPercent(SplitConfig):  # the same rules, its keys named as anomax-evaluate takes them
        section = "split_percent"

    split = SplitPercent.from_dict({**(trained.get("split") or {}), **given}).to_dict()
    if dataset == trained.get("dataset"):
        trained = {"seed": trained.get("seed"), "split": trained.get("split", split)}
    else:
        trained = None
    return dataset, split, seed, trained


def warn_of_a_new_split(own_split: bool, seed: int, split: dict, trained: dict | None) -> None:
    """The training run's dataset read with another seed or split than the run's (``trained``: its
    seed and split, None for another dataset): said, with what it changes for this dataset
    (``own_split``: its format brings its split)."""
    if trained is None:
        return
    if not own_split and (seed, split) != (trained["seed"], trained["split"]):
        log.warning("seed %s and split %s differ from the training run's (%s, %s): on the dataset it was trained on, "
                    "this test split may hold the model's training images", seed, split, trained["seed"],
                    trained["split"])
    elif own_split and seed != trained["seed"]:  # split.* does not apply to it
        log.warning("seed %s differs from the training run's (%s): the dataset brings its own split, so no training "
                    "image is tested on, but the shares it moves to validation are drawn anew and the metrics are "
                    "not the training run's", seed, trained["seed"])


def check_not_trained_on(dataset, split: str, model_dir: str) -> None:
    """Refuse a split holding images the model was trained on, by the training run's dataset.json
    (beside the model in anomax-train's run directory). Re-splitting a folder that gained or lost
    images since training reshuffles its splits, whatever the seed; the config check above cannot see that."""
    from anomax.data.dataset import DLDataset

    record = Path(model_dir).resolve().parent / "dataset.json"  # resolved: a model_dir given through a symlink
    if not record.is_file():
        return
    trained_on = {Path(s.image_file_name).absolute() for s in DLDataset.from_json(record).samples_of("train")}
    overlap = sorted(s.image_file_name for s in dataset.samples_of(split)
                     if Path(s.image_file_name).absolute() in trained_on)
    if overlap and split == "train":
        raise DatasetError(f"split=train is the split the model was trained on ({record}): its metrics would say "
                           f"nothing about new parts; evaluate split=validation or split=test, or a folder of new images")
    if overlap:
        raise DatasetError(f"{len(overlap)} images of the {split} split were in the model's training split "
                           f"({record}), e.g. {overlap[0]}: the dataset changed since training (an image added or "
                           "removed reshuffles the split) or the split settings differ; evaluate on images the model "
                           "has not seen (e.g. a folder of new images)")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_evaluate")
@reports_errors("anomax-evaluate")
def _evaluate(cfg: DictConfig) -> float:
    from anomax.artifact import read_metadata
    from anomax.evaluation import AnomalyThresholds
    from anomax.files import claim_run_dir, write_json_atomic
    from anomax.pipeline import (EvaluateConfig, RunConfig, evaluate_split, read_unsplit_dataset,
                                 split_unless_own)

    metadata = read_metadata(plain(OmegaConf.masked_copy(cfg, ["model_dir"]))["model_dir"])
    if cfg.seed is None:  # the training run's, before the datasets' ${seed} resolves
        cfg.seed = (metadata["config"] or {}).get("seed", RunConfig().seed)
    config = plain(cfg)
    check_known_keys(config, EvaluateAppConfig, "anomax-evaluate")
    evaluate_cfg = EvaluateConfig.from_dict(config["evaluate"])  # before any work: a wrong value fails here
    changed = [key for key in THRESHOLD_KEYS if getattr(evaluate_cfg, key) != getattr(EvaluateConfig(), key)]
    if changed:
        raise ConfigError(f"evaluate.{changed[0]}: anomax-evaluate applies the thresholds saved with the model "
                          f"(estimated when it was trained), so {', '.join('evaluate.' + k for k in changed)} "
                          "would change nothing; leave them out, or train again with them")
    dataset_cfg, split_percent, seed, trained = as_trained(config, metadata["config"])
    dataset = read_unsplit_dataset(dataset_cfg)
    warn_of_a_new_split(dataset.has_split, seed, split_percent, trained)
    dataset = split_unless_own(dataset, split_percent, seed)
    check_not_trained_on(dataset, config["split"], config["model_dir"])
    labels = [s.anomaly_label for s in dataset.samples_of(config["split"])]
    if len(set(labels)) < 2:  # known from the labels: before the directory is claimed and every image scored
        raise DatasetError(f"the {config['split']} split of {dataset_cfg.get('name')} holds only "
                           f"{'good' if labels[0] == 'ok' else 'defective'} images ({len(labels)}); evaluation needs "
                           f"good and defective images (to score a folder of new parts without labels, use anomax-predict)")
    with claim_run_dir(HydraConfig.get().runtime.output_dir) as run_dir:
        model = load_configured_model(config)
        estimates = metadata["thresholds"]["estimates"]
        dataset.to_json(run_dir / "dataset.json")  # which images each split held, as anomax-train records it
        metrics = evaluate_split(model, dataset, config["split"], run_dir, evaluate_cfg,
                                 estimates and AnomalyThresholds.from_dict(estimates), config["cache_dir"],
                                 title=f"anomax: {config['model_dir']} on {dataset_cfg.get('name')} "
                                       f"({config['split']})", progress=config["progress"])
        write_json_atomic(run_dir / "metrics.json", metrics)
    auroc = metrics["image"]["auroc"]
    print(f"anomax-evaluate: image_auroc {auroc:.4f} on {metrics['num_images']} images -> {run_dir}")
    return auroc


def main() -> None:
    print_version_if_asked("anomax-evaluate")
    register_schemas()
    _evaluate()


if __name__ == "__main__":
    main()
