"""anomax-train: compose the config, run the workflow into the Hydra run directory, print key metrics."""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomax.apps._common import plain, reports_errors
from anomax.apps.config import CONF_DIR, register_schemas


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_train")
@reports_errors("anomax-train")
def _train(cfg: DictConfig) -> float:
    from anomax.pipeline import train_and_evaluate

    run_dir = HydraConfig.get().runtime.output_dir
    config = plain(cfg)
    record = train_and_evaluate(config, run_dir, resolved_config=config)
    summary = "  ".join(f"{key} {value:.4f}" for key, value in record["summary"].items())
    print(f"anomax-train: {summary}  (fit {record['timings']['fit_s']:.1f} s) -> {run_dir}")
    return record["summary"]["image_auroc"]


def main() -> None:
    register_schemas()
    _train()


if __name__ == "__main__":
    main()
