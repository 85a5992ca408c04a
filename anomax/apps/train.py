"""anomax-train: compose the config, run the workflow into the Hydra run directory, print key metrics."""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from anomax.apps._common import plain, print_version_if_asked, reports_errors
from anomax.apps.config import CONF_DIR, ensemble_member_configs, register_schemas


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_train")
@reports_errors("anomax-train")
def _train(cfg: DictConfig) -> float | None:
    """Returns the validation image AUROC, the objective of a search (never the test split's)."""
    from anomax import distributed
    from anomax.pipeline import summary_text, train_and_evaluate

    hydra_config = HydraConfig.get()
    run_dir = hydra_config.runtime.output_dir
    config = plain(cfg)
    # a score ensemble's members: the run's config with each member's overrides (conf/ensemble/)
    members = ensemble_member_configs(config, hydra_config.overrides.task, hydra_config.job.config_name)
    distributed.initialize(config.get("distributed"))  # before any other JAX use
    searching = hydra_config.mode == RunMode.MULTIRUN and "optuna" in str(hydra_config.sweeper.get("_target_"))
    record = train_and_evaluate(config, run_dir, resolved_config=config, members=members, objective=searching)
    if distributed.is_main():
        names = [f"{c['model']['head']['name']} + {c['model']['backbone']['name']}" for c in members or [config]]
        print(f"anomax-train: {' and '.join(names)}{' (score ensemble)' if members else ''} on "
              f"{config['dataset'].get('name')}\n{summary_text(record, run_dir)}")
    return record["validation"].get("image_auroc")


def main() -> None:
    print_version_if_asked("anomax-train")
    register_schemas()
    _train()


if __name__ == "__main__":
    main()
