"""The benchmark harness runs its CI-sized suite end to end (numbers are not checked: no timed assertions)."""
import json

import pytest

from benchmarks.run import SUITES, TABLES, run_suite


@pytest.mark.slow  # seven fresh python processes: ~30 s on 2 idle cores
def test_quick_suite_writes_json_and_tables(tmp_path):
    report = run_suite("quick", tmp_path)
    assert [r for r in report["results"] if "error" in r] == []
    assert [r["measurement"] for r in report["results"]] == [name for name, _ in SUITES["quick"]]
    assert all(r["peak_rss_mib"] > 0 and r["kwargs"] == kwargs for r, (_, kwargs) in zip(report["results"],
                                                                                         SUITES["quick"]))
    assert json.loads((tmp_path / "quick.json").read_text())["results"] == report["results"]
    table = (tmp_path / "quick.md").read_text()
    for name, _ in SUITES["quick"]:
        assert TABLES[name][0] in table
    assert "FAILED" not in table


def test_every_measurement_is_named_and_a_wrong_name_or_an_empty_plan_says_what_exists(tmp_path):
    """measure.py's bare KeyError for a wrong name or --help; run.py's KeyError for an --only the suite lacks."""
    import subprocess
    import sys

    from benchmarks import measure, run

    assert set(measure.MEASUREMENTS) == set(run.TABLES) and all(callable(getattr(measure, name))
                                                                for name in measure.MEASUREMENTS)
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", "--help"], capture_output=True, text=True)
    assert done.returncode == 1 and "NAME one of matmul, backbone" in done.stderr
    with pytest.raises(SystemExit, match="suite 'quick' has no train measurement .* --train"):
        run.run_suite("quick", tmp_path, only=("train",))
