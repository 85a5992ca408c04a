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
