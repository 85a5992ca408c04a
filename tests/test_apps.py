"""The console apps as a user runs them: compose configs, train, sweep, report, evaluate, predict."""
from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from anomax.apps.config import CONF_DIR, register_schemas
from browser import needs_chromium, page_images_in_chromium

SMOKE = ["+experiment=synthetic_smoke", "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4",
         "dataset.validation_from_train=0.25"]


def run(app: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # HOME: the test run's own (conftest.py)
    script = f"import sys; from anomax.apps.{app} import main; sys.argv[0] = 'anomax-{app}'; main()"
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"anomax-{app} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def groups() -> list[tuple[str, str]]:
    conf = Path(CONF_DIR)
    found = []
    for group in ("dataset", "preprocess", "model/backbone", "model/head", "train", "evaluate", "augment", "tiling",
                  "ensemble", "distributed", "experiment"):
        found += [(group, f.stem) for f in sorted((conf / group).glob("*.yaml"))]
    return found


# what an option leaves for the user to give (a path, the processes of a manual run, a trained head)
NEEDS = {("dataset", "mvtec_ad"): ["dataset.root=/data"], ("dataset", "visa"): ["dataset.root=/data"],
         ("distributed", "manual"): ["distributed.coordinator_address=host:1234", "distributed.num_processes=2",
                                     "distributed.process_id=0"],
         ("ensemble", "train_seeds3"): ["model/head=student"],
         ("model/backbone", "vit_small_patch14"): ["preprocess.width=224", "preprocess.height=224"],
         **{("experiment", name): ["model.head.distill_images=/data"]
            for name in ("efficientad_logical", "elpv_efficientad_mono", "elpv_efficientad_poly")}}


@pytest.fixture(scope="module")
def schemas():
    register_schemas()


@pytest.mark.parametrize("group,option", groups())
def test_every_config_group_option_composes_and_validates(schemas, group, option):
    """As anomax-train checks it (compose_train_config: validate_config, ensemble members too), so a
    shipped YAML with a value out of range fails here, not in a user's run."""
    import anomax

    override = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
    cfg = anomax.compose_train_config([override, *NEEDS.get((group, option), [])])
    assert cfg["model"]["head"]["name"] and cfg["model"]["backbone"]["name"] and cfg["dataset"]["format"]


def test_structured_configs_reject_typos_and_wrong_types(schemas):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="coreset_ratoi"):
            compose("anomax_train", overrides=["model.head.coreset_ratoi=0.1"])
        with pytest.raises((ConfigCompositionException, ValidationError), match="coreset_ratio"):
            compose("anomax_train", overrides=["model.head.coreset_ratio=lots"])
        with pytest.raises(ConfigCompositionException, match="max_num_epoch"):
            compose("anomax_train", overrides=["train.max_num_epoch=3"])


def test_typo_in_override_fails_before_any_work(tmp_path):
    done = run("train", "model.head.coreset_ratoi=0.1", cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "coreset_ratoi" in done.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was started


def test_bad_value_is_one_clear_line(tmp_path):
    done = run("train", *SMOKE, "train.domain_ratio=1.5", "model/head=student", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "anomax-train: error: train.domain_ratio" in done.stderr
    assert "Traceback" not in done.stderr


def test_efficientad_elpv_recipes_are_what_validation_chose(schemas):
    """experiments/efficientad.md's ELPV recipes, composable with the ELPV protocol."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        mono, poly = (compose("anomax_train", overrides=[f"+experiment=[elpv_protocol,elpv_efficientad_{cells}]",
                                                          "model.head.distill_images=/generic"])
                      for cells in ("mono", "poly"))
    for cfg, cells in ((mono, "elpv_mono"), (poly, "elpv_poly")):
        head = cfg.model.head
        assert (cfg.dataset.name, head.name, head.distill_images, head.generic_penalty, head.distill_epochs,
                cfg.train.domain_ratio, cfg.train.max_num_epochs, head.combine, cfg.dataset.validation_from_test) == (
            cells, "efficientad", "/generic", 0, 20, 1, 100, "mean", 0)
    assert list(mono.model.backbone.taps) == ["features.3", "features.6", "features.13"]  # the teacher at stride 4
    assert mono.preprocess.normalization_type == "all_channels"
    assert (list(poly.model.backbone.taps), poly.preprocess.normalization_type) == (
        ["features.6", "features.13"], None)  # the backbone's default taps: stride 8


def test_efficientad_logical_recipe_is_what_validation_chose(schemas):
    """experiments/efficientad.md's recipe for logical rules on the synthetic parts."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("anomax_train", overrides=["+experiment=efficientad_logical", "model.head.distill_images=/generic"])
    head = cfg.model.head
    assert (cfg.dataset.name, cfg.preprocess.width, cfg.preprocess.height, head.name, head.distill_images,
            head.width, head.ae_width, head.combine, head.sigma, head.image_score, cfg.train.domain_ratio) == (
        "synthetic_parts", 128, 128, "efficientad", "/generic", 32, 32, "max", 8, "branches", 1)
    # three training seeds of that model as a score ensemble
    assert [list(member) for member in cfg.ensemble.members] == [[], ["train.seed=1001"], ["train.seed=1002"]]


def test_an_unset_value_is_one_clear_line_naming_its_key(tmp_path):
    """??? left in a config, or an interpolation that does not resolve, is named before anything
    reads it (it used to reach the dataset reader as the path '???')."""
    env = {k: v for k, v in os.environ.items() if k != "ANOMAX_GENERIC_IMAGES"}
    for app, args, expected in [
            ("train", ["dataset=mvtec_ad"], "dataset.root has no value (??? in the config); set it"),
            ("predict", [], "model_dir has no value (??? in the config)"),
            ("train", ["+experiment=elpv_efficientad_mono"],
             "model.head.distill_images does not resolve: KeyError raised while resolving interpolation: "
             "\"Environment variable 'ANOMAX_GENERIC_IMAGES' not found\"")]:
        script = f"import sys; from anomax.apps.{app} import main; sys.argv[0] = 'anomax-{app}'; main()"
        done = subprocess.run([sys.executable, "-c", script, *args, f"hydra.run.dir={tmp_path / app}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and done.stderr.startswith(f"anomax-{app}: error: "), done.stderr
        assert expected in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("app,key", [("train", "model:"), ("evaluate", "model_dir:"), ("predict", "inputs:")])
def test_help_names_the_app_and_lists_only_what_it_takes(app, key, tmp_path):
    done = run(app, "--help", cwd=tmp_path)
    assert done.stdout.startswith(f"anomax-{app}: ")
    assert f"\n{key}" in done.stdout  # the composed config, top-level keys unindented
    # predict composes no config group, so listing the training groups would only mislead
    assert ("Configuration groups" in done.stdout) == (app != "predict")
    assert not (tmp_path / "outputs").exists()
    if app == "evaluate":  # its own list (the training groups are refused): every dataset option, nothing else
        groups = done.stdout.split("== Configuration groups (group=option) ==\n")[1].split("\n\n")[0]
        datasets = sorted(p.stem for p in (Path(CONF_DIR) / "dataset").glob("*.yaml") if not p.stem.startswith("schema"))
        assert groups.splitlines() == [f"dataset: {', '.join(datasets)}", "evaluate: default"]


@pytest.mark.parametrize("app", ["train", "evaluate", "predict", "report"])
def test_version_is_anomax_s(app, tmp_path):
    import anomax

    done = run(app, "--version", cwd=tmp_path)
    assert done.stdout.strip() == f"anomax-{app} (anomax {anomax.__version__})"
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A small run as a user starts it, through the preprocessed cache (TFDS array_record)."""
    cwd = tmp_path_factory.mktemp("train")
    done = run("train", *SMOKE, "model/head=padim", f"cache_dir={cwd / 'cache'}", cwd=cwd)
    assert "image_auroc" in done.stdout
    (run_dir,) = (cwd / "outputs").iterdir()
    return run_dir, done


@pytest.fixture(scope="module")
def trained_run(trained) -> Path:
    return trained[0]


def test_the_console_is_quiet_and_ends_with_a_summary(trained):
    """No third-party warnings or TFDS notes on the console (they go to train.log); one summary
    with the metrics, the thresholds and the confusion matrix at HALCON's intermediate threshold."""
    run_dir, done = trained
    console = done.stdout + done.stderr
    for noise in ("absl", "WARNING:", "Downloading and preparing", "dataset_info.json", "UserWarning"):
        assert noise not in console, noise
    assert "confusion matrix on test at intermediate = " in done.stdout and "truth nok" in done.stdout
    assert "thresholds (validation" in done.stdout and str(run_dir) in done.stdout
    for bar in ("fit padim", "score validation", "score test", "report"):
        assert bar in done.stderr, bar
    assert "fit padim + " in (run_dir / "train.log").read_text()  # the log file has what the console left out


def test_train_writes_a_complete_run(trained_run):
    assert "head-padim" in trained_run.name  # run directories are named from the overrides
    import anomax

    record = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= record["summary"]["image_auroc"] <= 1.0
    assert record["anomax_version"] == anomax.__version__
    assert record["thresholds"]["split"] == "validation"
    assert record["splits"]["train"] == {"ok": 6, "nok": 0}
    for name in ("index.html", "train.log", "dataset.json", "model/manifest.json", "pictures/roc.png",
                 "pictures/worst_cases.png"):
        assert (trained_run / name).is_file(), name
    page = html.unescape((trained_run / "index.html").read_text())
    assert "The model classifies images with the 'intermediate' threshold" in page


def test_a_rerun_into_a_used_directory_is_refused_and_changes_nothing(trained_run, tmp_path):
    before = {p: p.read_bytes() for p in (trained_run / ".hydra").iterdir()}
    done = run("train", *SMOKE, "model/head=patchcore", f"hydra.run.dir={trained_run}", cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert f"anomax-train: error: {trained_run} already holds" in done.stderr and "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in (trained_run / ".hydra").iterdir()} == before  # the first run's record


@needs_chromium
def test_report_of_a_real_run_opens_in_chromium_with_every_picture(trained_run):
    assert page_images_in_chromium(trained_run / "index.html") == "ALL-IMAGES-LOADED"


def test_evaluate_app_on_a_saved_model(trained_run, tmp_path):
    done = run("evaluate", f"model_dir={trained_run / 'model'}", "dataset=synthetic", "dataset.n_train=8",
               "dataset.n_test_good=4", "dataset.n_test_defect=4", "dataset.validation_from_train=0.25",
               cwd=tmp_path)
    assert "image_auroc" in done.stdout
    (run_dir,) = (tmp_path / "outputs" / "evaluate").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trained = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["image"]["auroc"] == trained["metrics"]["image"]["auroc"]  # same model, same split
    assert (run_dir / "index.html").is_file()


def test_evaluate_with_another_seed_says_what_it_changes(trained_run, tmp_path):
    """The synthetic set brings its own split: another seed draws its validation shares anew, but
    no training image can be tested on (the warning said it could)."""
    done = run("evaluate", f"model_dir={trained_run / 'model'}", "seed=5", "progress=false", cwd=tmp_path)
    assert "seed 5 differs from the training run's (0): the dataset brings its own split, so no training image " \
           "is tested on" in done.stderr and "may hold the model's training images" not in done.stderr


def test_evaluate_reads_the_split_the_model_was_trained_with(tmp_path):
    """A model trained with seed 1 on a folder dataset: anomax-evaluate, given only the model, reads
    the same dataset, seed and percentages from its config, so its test split holds no training image;
    from another working directory too (the folder was given relative to the training's)."""
    from anomax.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "parts", n_train=2, n_test_good=12, n_test_defect=6, size=32)
    run("train", "+experiment=synthetic_smoke", "dataset=folder", "dataset.image_dir=parts/brick/test",
        "seed=1", "progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    (tmp_path / "elsewhere").mkdir()
    done = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", "progress=false",
               f"hydra.run.dir={tmp_path / 'evaluated'}", cwd=tmp_path / "elsewhere")
    assert "image_auroc" in done.stdout and "it:" not in done.stderr  # no progress bars
    def test_split(run_dir):
        samples = json.loads((run_dir / "dataset.json").read_text())["samples"]
        return sorted(s["image_file_name"] for s in samples if s["split"] == "test")

    assert test_split(tmp_path / "evaluated") == test_split(tmp_path / "run")  # seed 1's, not seed 0's
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert evaluated["image"]["auroc"] == trained["metrics"]["image"]["auroc"]
    half = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", "split_percent.training_percent=60",
               "progress=false", f"hydra.run.dir={tmp_path / 'sixty'}", cwd=tmp_path)
    assert "differ from the training run's" in half.stderr  # the other key stays the run's: 15
    assert len(test_split(tmp_path / "sixty")) > len(test_split(tmp_path / "run"))
    again = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", f"hydra.run.dir={tmp_path / 'evaluated'}",
                cwd=tmp_path, check=False)  # a used directory is refused, not overwritten
    assert again.returncode == 2 and "already holds" in again.stderr
    ignored = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", "evaluate.std_factor=2", cwd=tmp_path,
                  check=False)
    assert ignored.returncode == 2 and "evaluate.std_factor: anomax-evaluate applies the thresholds saved" in \
        ignored.stderr
    for override, said in (("+splt.training_percent=60", "unknown key(s) splt: not a setting of anomax-evaluate"),
                           ("split_percent=50", "split_percent = 50 is invalid: it must hold training_percent"),
                           ("split_percent.training_percent=120", "split_percent.training_percent = 120 is invalid")):
        refused = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", override, cwd=tmp_path, check=False)
        assert refused.returncode == 2 and f"anomax-evaluate: error: {said}" in refused.stderr, refused.stderr
    # an image added since training reshuffles the re-read split: training images would be tested on
    import shutil

    good = tmp_path / "parts" / "brick" / "test" / "good"
    shutil.copy(min(good.iterdir()), good / "0000-new.png")
    grown = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", f"hydra.run.dir={tmp_path / 'grown'}",
                cwd=tmp_path, check=False)
    assert grown.returncode == 2 and "were in the model's training split" in grown.stderr, grown.stderr
    assert str(tmp_path / "run" / "dataset.json") in grown.stderr and not (tmp_path / "grown" / "metrics.json").exists()
    (good / "0000-new.png").unlink()
    # the training split itself: it was blamed on a changed dataset
    own = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", "split=train", cwd=tmp_path, check=False)
    assert own.returncode == 2 and "split=train is the split the model was trained on" in own.stderr, own.stderr
    # a folder of good parts only: refused from its labels, not after every image was scored into a claimed directory
    shutil.copytree(good, tmp_path / "new" / "good")
    only_good = run("evaluate", f"model_dir={tmp_path / 'run' / 'model'}", "dataset=folder",
                    f"dataset.image_dir={tmp_path / 'new'}", "split_percent.training_percent=0",
                    "split_percent.validation_percent=0", f"hydra.run.dir={tmp_path / 'good_only'}", cwd=tmp_path,
                    check=False)
    assert only_good.returncode == 2 and "the test split of folder holds only good images (12)" in only_good.stderr, \
        only_good.stderr
    assert not (tmp_path / "good_only").exists() or not (tmp_path / "good_only" / "dataset.json").exists()
    # a classification threshold set by hand, none of the estimates: the metrics never counted at it
    import anomax
    from anomax.artifact import read_metadata
    from anomax.evaluation import AnomalyThresholds

    model, metadata = anomax.load_model(tmp_path / "run" / "model"), read_metadata(tmp_path / "run" / "model")
    model.set_params(thresholds={**model.thresholds, "classification": 7.0})
    anomax.save_model(model, tmp_path / "by_hand", config=metadata["config"],
                      thresholds=AnomalyThresholds.from_dict(metadata["thresholds"]["estimates"]))
    run("evaluate", f"model_dir={tmp_path / 'by_hand'}", f"hydra.run.dir={tmp_path / 'by_hand_evaluated'}",
        "progress=false", cwd=tmp_path)
    at = json.loads((tmp_path / "by_hand_evaluated" / "metrics.json").read_text())["at_thresholds"]
    assert at["model"]["threshold"] == 7.0 and {"intermediate", "largest_good"} <= set(at)


def test_a_bad_test_image_does_not_cost_the_fitted_model(tmp_path):
    """The model is saved once its thresholds are set, before the test split is read: one unreadable
    test image ends the run with a clear error that says where the model is."""
    import anomax
    from anomax.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "parts", n_train=8, n_test_good=2, n_test_defect=2, size=32)
    bad = root / "brick" / "test" / "hole" / "000.png"
    bad.write_bytes(bad.read_bytes()[:-40])  # cut off after its header: the dataset reads, the image does not
    done = run("train", "+experiment=synthetic_smoke", "dataset=mvtec_ad", f"dataset.root={root}",
               "dataset.category=brick", "dataset.validation_from_test=0", "dataset.validation_from_train=0.25",
               "progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert done.returncode == 2 and "000.png" in done.stderr and "Traceback" not in done.stderr
    assert f"the fitted model is saved in {tmp_path / 'run' / 'model'}" in done.stderr
    assert anomax.load_model(tmp_path / "run" / "model").thresholds  # complete, with its thresholds


def test_predict_scores_every_image_and_reports_the_bad_one(trained_run, tmp_path):
    dataset = json.loads((trained_run / "dataset.json").read_text())
    folder = tmp_path / "new"
    folder.mkdir()
    for number, sample in enumerate(dataset["samples"][-3:]):  # defect folders reuse file names
        (folder / f"{number}.png").write_bytes(Path(sample["image_file_name"]).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    done = run("predict", f"model_dir={trained_run / 'model'}", f"inputs={folder}", cwd=tmp_path)
    assert "3 images scored, 1 failed" in done.stdout
    (out_dir,) = (tmp_path / "outputs" / "predict").iterdir()
    rows = json.loads((out_dir / "results.json").read_text())
    assert len(rows) == 4
    bad = [row for row in rows if "error" in row]
    assert len(bad) == 1 and "notes.txt" in bad[0]["error"]
    good = [row for row in rows if "error" not in row]
    assert all(row["anomaly_class"] in ("ok", "nok") and Path(row["overlay"]).is_file() for row in good)
    assert (out_dir / "results.csv").read_text().count("\n") == 5


def test_train_app_runs_a_score_ensemble_and_predict_applies_it(tmp_path):
    """ensemble=lite2_mobilenet_v2 from the command line: both members fitted, normalised on the
    validation good images, one artifact that anomax-predict's loader and writer read."""
    from anomax.apps._common import load_configured_model
    from anomax.apps.predict import predict_files
    from anomax.data.dataset import DLDataset
    from anomax.data.images import read_image
    from anomax.ensemble import ScoreEnsemble

    done = run("train", *SMOKE, "ensemble=lite2_mobilenet_v2", "progress=false", cwd=tmp_path)
    assert "patchcore + efficientnet_lite2 and patchcore + mobilenet_v2 (score ensemble)" in done.stdout
    (run_dir,) = (tmp_path / "outputs").iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert len(record["fit"]["members"]) == 2 and 0.0 <= record["summary"]["image_auroc"] <= 1.0
    assert record["thresholds"]["split"] == "validation" and (run_dir / "index.html").is_file()
    model = load_configured_model({"model_dir": str(run_dir / "model"), "batch_size": None})  # as anomax-predict
    assert isinstance(model, ScoreEnsemble)
    assert [m.backbone.name for m in model.members] == ["efficientnet_lite2", "mobilenet_v2"]
    assert set(model.thresholds) == {"segmentation", "classification"}
    # the saved statistics are the members' on the run's validation good images
    stats = ScoreEnsemble(model.members).normalise(DLDataset.from_json(run_dir / "dataset.json"))
    for saved, again in zip(model.stats, stats):
        assert saved == pytest.approx(again, rel=1e-5)
    assert model.stats == record["fit"]["normalisation"]

    samples = json.loads((run_dir / "dataset.json").read_text())["samples"][-3:]
    paths = [Path(sample["image_file_name"]) for sample in samples]
    rows = predict_files(model, paths, tmp_path / "predict")
    assert all(row["anomaly_class"] in ("ok", "nok") and Path(row["overlay"]).is_file() for row in rows)
    applied = model.apply([read_image(path) for path in paths])
    assert [row["anomaly_score"] for row in rows] == [result["anomaly_score"] for result in applied]


def test_parallel_multirun_and_report(tmp_path):
    """Two jobs through the joblib launcher (hydra/launcher=parallel), then one table."""
    run("train", "-m", "hydra/launcher=parallel", *SMOKE, "model/head=padim,patchcore", cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun").iterdir()
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert runs[0].startswith("0_") and "head-padim" in runs[0]
    assert runs[1].startswith("1_") and "head-patchcore" in runs[1]
    done = run("report", str(sweep), cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| model/head | image_auroc")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| padim", "| patchcore"]
    assert (sweep / "report.csv").read_text().count("\n") == 3


def test_report_groups_seeds_into_mean_and_std():
    from anomax.apps.report import summarise

    runs = [("padim", 0, 0.9), ("padim", 1, 0.8), ("patchcore", 0, 0.95), ("patchcore", 1, 0.97)]
    rows = [{"params": {"model/head": head, "seed": str(seed)}, "metrics": {"image_auroc": auroc, "fit_s": 2.0}}
            for head, seed, auroc in runs]
    header, table = summarise(rows)
    assert header == ["model/head", "seeds", "image_auroc", "fit_s"]
    assert table == [["padim", "2", "0.8500 ± 0.0707", "2.0 ± 0.0"], ["patchcore", "2", "0.9600 ± 0.0141", "2.0 ± 0.0"]]


def test_a_dataset_of_good_images_only_is_fitted_and_saved(tmp_path):
    """HALCON's usual start: no defective images yet. The fit ran, then the run failed on the metrics."""
    done = run("train", *SMOKE, "dataset.n_test_defect=0", "model/head=padim", "progress=false",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "test:        not evaluated" in done.stdout and "holds good images only" in done.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["metrics"] is None and record["summary"] == {} and record["splits"]["test"]["nok"] == 0
    import anomax

    assert anomax.load_model(tmp_path / "run" / "model").thresholds["classification"] > 0
    # a split that leaves the test split empty fails before the fit, not after it
    from anomax.data.synthetic import make_synthetic_dataset

    folder = make_synthetic_dataset(tmp_path / "parts", n_train=2, n_test_good=10, n_test_defect=4, size=32)
    emptied = run("train", "+experiment=synthetic_smoke", "dataset=folder", f"dataset.image_dir={folder / 'brick' / 'test'}",
                  "split.training_percent=80", "split.validation_percent=20", f"hydra.run.dir={tmp_path / 'empty'}",
                  cwd=tmp_path, check=False)
    assert emptied.returncode == 2 and "split 'test'" in emptied.stderr and "is empty" in emptied.stderr
    assert not (tmp_path / "empty" / "model").exists()


def test_a_failing_job_fails_alone_and_a_used_sweep_directory_names_its_key(tmp_path):
    """In a sweep, one job's error is reported on its line and the other jobs still run; the sweep
    then ends with an error status. Rerunning into the same sweep directory names hydra.sweep.dir."""
    done = run("train", "-m", *SMOKE, "model/head=padim", "progress=false", "seed=-1,3", "hydra.sweep.dir=sweep",
               cwd=tmp_path, check=False)
    assert done.returncode != 0 and "anomax-train: error: " in done.stderr and "seed" in done.stderr
    finished = [p.name for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").is_file()]
    assert len(finished) == 1 and finished[0].startswith("1_"), finished  # the second job ran after the first failed
    again = run("train", "-m", *SMOKE, "model/head=padim", "seed=3", "hydra.sweep.dir=sweep", cwd=tmp_path,
                check=False)
    assert again.returncode == 2 and "choose another hydra.sweep.dir" in again.stderr


def test_thresholds_on_test_give_no_validation_objective(tmp_path):
    """With evaluate.threshold_split=test the test split's AUROC is not recorded (or returned to a
    search) as the validation AUROC."""
    done = run("train", *SMOKE, "model/head=padim", "progress=false", "evaluate.threshold_split=test",
               "evaluate.allow_test_split=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["validation"] == {} and record["thresholds"]["split"] == "test"
    assert "validation:" not in done.stdout and "image_auroc" in done.stdout


def test_a_dataset_of_ones_own_in_a_config_dir(tmp_path):
    """README's --config-dir example, its YAML taken from the README itself, with a tiny random-init backbone."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    yaml_text = readme.split("cat > myconf/dataset/gravel_small.yaml <<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    (tmp_path / "myconf" / "dataset").mkdir(parents=True)
    (tmp_path / "myconf" / "dataset" / "gravel_small.yaml").write_text(yaml_text)
    run("train", "--config-dir", "myconf", "dataset=gravel_small", "preprocess.width=64", "preprocess.height=64",
        "model.backbone.pretrained=null", "model.backbone.width_multiplier=0.25", "model/head=padim",
        "model.head.adaptor.projection_dim=null", "dataset.n_train=8", "dataset.n_test_good=4",
        "dataset.n_test_defect=4", "progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["splits"]["validation"]["nok"] > 0 and record["validation"]["image_auroc"] is not None
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (saved["dataset"]["name"], saved["dataset"]["texture"]) == ("gravel_small", "gravel")
