"""anomax-evaluate: a saved model on a dataset split -> metrics.json, pictures and index.html."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomax.apps._common import load_configured_model, plain, reports_errors
from anomax.apps.config import CONF_DIR, register_schemas


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_evaluate")
@reports_errors("anomax-evaluate")
def _evaluate(cfg: DictConfig) -> float:
    from anomax.artifact import read_metadata
    from anomax.evaluation import AnomalyThresholds
    from anomax.files import write_json_atomic
    from anomax.pipeline import EvaluateConfig, SplitConfig, evaluate_split, read_configured_dataset

    config = plain(cfg)
    evaluate_cfg = EvaluateConfig.from_dict(config["evaluate"])  # before any work: a wrong value fails here
    split_cfg = SplitConfig.from_dict(config["split_percent"])
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    model = load_configured_model(config)
    estimates = read_metadata(config["model_dir"])["thresholds"]["estimates"]
    dataset = read_configured_dataset(config["dataset"], split_cfg, config["seed"])
    metrics = evaluate_split(model, dataset, config["split"], run_dir, evaluate_cfg,
                             estimates and AnomalyThresholds.from_dict(estimates), config["cache_dir"],
                             title=f"anomax: {config['model_dir']} on {config['dataset'].get('name')} "
                                   f"({config['split']})")
    write_json_atomic(run_dir / "metrics.json", metrics)
    auroc = metrics["image"]["auroc"]
    print(f"anomax-evaluate: image_auroc {auroc:.4f} on {metrics['num_images']} images -> {run_dir}")
    return auroc


def main() -> None:
    register_schemas()
    _evaluate()


if __name__ == "__main__":
    main()
