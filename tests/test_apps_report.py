"""anomax-report over a sweep with damaged runs: each is skipped with a warning, the table is still written."""
import json
import logging

import pytest

from anomax.apps import report


def finished_run(run_dir, head: str, auroc: float) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model/head={head}\n")
    (run_dir / "metrics.json").write_text(json.dumps({"summary": {"image_auroc": auroc}, "timings": {"fit_s": 1.0}}))


def test_unreadable_runs_are_skipped_with_a_warning(tmp_path, capsys, caplog):
    finished_run(tmp_path / "0", "padim", 0.9)
    finished_run(tmp_path / "1", "patchcore", 0.8)
    text = (tmp_path / "1" / "metrics.json").read_text()
    (tmp_path / "1" / "metrics.json").write_text(text[:20])  # the disk filled up mid-write
    finished_run(tmp_path / "2", "student", 0.7)
    (tmp_path / "2" / "metrics.json").write_text(json.dumps({"image": {"auroc": 0.7}}))  # not a training run's
    finished_run(tmp_path / "3", "fastflow", 0.6)
    (tmp_path / "3" / "metrics.json").write_bytes(b"\xff\xfe")
    with caplog.at_level(logging.WARNING, logger="anomax"):
        report.main([str(tmp_path)])
    table = (tmp_path / "report.md").read_text()
    assert table == capsys.readouterr().out
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| padim"]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    for run, reason in [("1", "not readable JSON"), ("2", "'summary'"), ("3", "not readable JSON")]:
        assert any(w.startswith(f"skipping {tmp_path / run / 'metrics.json'}: ") and reason in w for w in warnings)
    assert (tmp_path / "report.csv").read_text().splitlines() == ["model/head,image_auroc,fit_s", "padim,0.9000,1.0"]


def test_no_readable_run_is_an_error(tmp_path, capsys):
    finished_run(tmp_path / "0", "padim", 0.9)
    (tmp_path / "0" / "metrics.json").write_text("{")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no finished runs" in capsys.readouterr().err


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    finished_run(tmp_path / "sweep" / "0", "padim", 0.9)
    (tmp_path / "out").write_text("a file, not a directory")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"cannot write {tmp_path / 'out' / 'report.md'}: Not a directory" in capsys.readouterr().err


def test_output_folder_is_created(tmp_path, capsys):
    finished_run(tmp_path / "sweep" / "0", "padim", 0.9)
    report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "new" / "report")])
    assert (tmp_path / "new" / "report" / "report.md").read_text() == capsys.readouterr().out
    assert (tmp_path / "new" / "report" / "report.csv").read_text().splitlines()[1] == "padim,0.9000,1.0"


def test_a_missing_sweep_directory_is_an_error(tmp_path, capsys):
    finished_run(tmp_path / "sweep" / "0", "padim", 0.9)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "sweep"), str(tmp_path / "swep")])  # a typo must not drop runs silently
    assert exit_info.value.code == 2
    assert f"no such sweep directory: {tmp_path / 'swep'}" in capsys.readouterr().err


def test_a_run_with_a_deletion_override_is_listed(tmp_path, capsys):
    """'~key' (Hydra's deletion) has no '=': the run is a row like any other, not skipped."""
    finished_run(tmp_path / "0", "padim", 0.9)
    finished_run(tmp_path / "1", "padim", 0.8)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- model/head=padim\n- ~model.head.sigma\n")
    report.main([str(tmp_path)])
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[0] == "~model.head.sigma,image_auroc,fit_s" and len(csv) == 3
    assert "(deleted),0.8000,1.0" in csv


def test_runs_of_the_same_point_are_one_row_and_the_best_come_first(tmp_path, capsys):
    """A search may draw a point twice: both runs count (mean ± std, and how many), and rows stay best first;
    the table showed the first run's numbers only and sorted by the hidden mean."""
    for name, sigma, validation in (("0", 4, 0.95), ("1", 2, 0.90), ("2", 4, 0.50)):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- model.head.sigma={sigma}\n")
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"summary": {"image_auroc": 0.5}, "timings": {"fit_s": 1.0}, "validation": {"image_auroc": validation}}))
    (tmp_path / "optimization_results.yaml").write_text("best_params: {}\n")
    report.main([str(tmp_path)])
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv == ["model.head.sigma,runs,image_auroc,validation_image_auroc,fit_s",
                   "2,1,0.5000,0.9000,1.0", "4,2,0.5000 ± 0.0000,0.7250 ± 0.3182,1.0 ± 0.0"]


def test_runs_without_metrics_are_named(tmp_path, caplog):
    """A failed job of a sweep left only its .hydra folder and log: the table counted fewer runs silently."""
    finished_run(tmp_path / "0", "padim", 0.9)
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="anomax"):
        report.main([str(tmp_path)])
    assert f"1 run without metrics.json (failed or not finished) left out: {tmp_path / '1'}" in caplog.text


def test_runs_are_listed_in_job_order(tmp_path, capsys):
    """Hydra's job folders 0_..., 2_..., 10_... sort as text 0, 10, 2: the table follows the job numbers."""
    for job, head in ((0, "a"), (2, "b"), (10, "c"), (11, "d")):
        finished_run(tmp_path / f"{job}_run", head, 0.5)
    report.main([str(tmp_path)])
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["| a", "| b", "| c", "| d"]


def test_a_multi_process_run_is_one_run_without_where_its_processes_ran(tmp_path, caplog):
    """Process 1 writes its log only: it was reported as a failed run, and the coordinator's port and
    the process id became columns of the table."""
    for process in (0, 1):
        run_dir = tmp_path / "run" / f"process_{process}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            f"- model/head=padim\n- distributed=manual\n- distributed.coordinator_address=10.0.0.1:{12355 + process}\n"
            f"- distributed.process_id={process}\n")
    (tmp_path / "run" / "process_0" / "metrics.json").write_text(
        json.dumps({"summary": {"image_auroc": 0.9}, "timings": {"fit_s": 1.0}}))
    with caplog.at_level(logging.WARNING, logger="anomax"):
        rows = report.read_runs(tmp_path)
    assert not caplog.records
    assert [row["params"] for row in rows] == [{"model/head": "padim"}]


def test_a_swept_value_whose_runs_all_failed_keeps_its_column(tmp_path, capsys):
    """model/head=padim,patchcore with every patchcore run failed: the table lost its model/head column,
    so nothing said which head the numbers were of."""
    for job, (head, seed) in enumerate((("padim", 0), ("padim", 1), ("patchcore", 0), ("patchcore", 1))):
        run_dir = tmp_path / f"{job}_run"
        finished_run(run_dir, head, 0.8 + 0.1 * seed)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model/head={head}\n- seed={seed}\n")
        if head == "patchcore":
            (run_dir / "metrics.json").unlink()
    report.main([str(tmp_path)])
    assert (tmp_path / "report.csv").read_text().splitlines() == [
        "model/head,seeds,image_auroc,fit_s", "padim,2,0.8500 ± 0.0707,1.0 ± 0.0"]
