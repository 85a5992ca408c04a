"""The Optuna search (hydra/sweeper=optuna, conf/hparams_search/): composes, runs 3 trials on the synthetic
set with the validation image AUROC as objective, and anomax-report lists the trials best first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the search extra: pip install 'anomax[search]'")

SMOKE = ["+experiment=synthetic_smoke", "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4"]


def run(app: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = f"import sys; from anomax.apps.{app} import main; sys.argv[0] = 'anomax-{app}'; main()"
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=dict(os.environ), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"anomax-{app} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_every_search_space_composes():
    from hydra import compose, initialize_config_dir

    from anomax.apps.config import CONF_DIR, register_schemas

    register_schemas()
    spaces = sorted(Path(CONF_DIR, "hparams_search").glob("*.yaml"))
    assert spaces
    for space in spaces:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("anomax_train", overrides=[f"+hparams_search={space.stem}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.params


def test_three_trial_search_maximises_validation_auroc_and_reports_best_first(tmp_path):
    run("train", *SMOKE, "+hparams_search=synthetic_smoke", "hydra.sweep.dir=search", cwd=tmp_path)
    sweep = tmp_path / "search"
    trials = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(trials) == 3
    objectives = [json.loads((t / "metrics.json").read_text())["validation"]["image_auroc"] for t in trials]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(objectives))  # Optuna got what the app returned
    report = run("report", str(sweep), cwd=tmp_path).stdout
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    column = header.index("validation_image_auroc")
    listed = [float(line.strip("|").split("|")[column]) for line in lines[1:]]
    assert len(listed) == 3 and listed == sorted(listed, reverse=True)
    assert listed[0] == pytest.approx(max(objectives), abs=1e-4)


def test_report_lists_best_mean_validation_auroc_first_only_when_asked():
    from anomax.apps.report import summarise

    def row(lr, seed, validation):
        return {"params": {"lr": lr, "seed": seed}, "metrics": {"image_auroc": 0.5, "validation_image_auroc": validation}}

    rows = [row("a", "0", 0.9), row("a", "1", 0.5), row("b", "0", 0.8), row("b", "1", 0.8)]
    _, in_run_order = summarise(rows)
    _, best_first = summarise(rows, best_first=True)
    assert [r[0] for r in in_run_order] == ["a", "b"]
    assert [r[0] for r in best_first] == ["b", "a"]  # means 0.8 > 0.7, although 'a' has the single best run


def test_a_search_without_defective_validation_images_is_refused_before_the_fit(tmp_path):
    """Its objective, the validation image AUROC, could not be measured: every trial would fit for nothing."""
    script = "import sys; from anomax.apps.train import main; sys.argv[0] = 'anomax-train'; main()"
    done = subprocess.run([sys.executable, "-c", script, *SMOKE, "+hparams_search=synthetic_smoke",
                           "dataset.validation_from_test=0", "hydra.sweep.dir=search"], cwd=tmp_path,
                          env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "a search (hydra/sweeper=optuna) optimises the validation image AUROC" in done.stderr
    assert not any((tmp_path / "search").glob("*/model"))  # refused before any fit
