"""anomax-report: the runs of a sweep -> one table (markdown and CSV), mean ± std over seeds."""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from anomax import __version__
from anomax.errors import AnomaxError, DatasetError
from anomax.files import output_errors, write_text_atomic

log = logging.getLogger("anomax")

METRICS = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pixel_aupro")
OBJECTIVE = "validation_image_auroc"  # what anomax-train returns to a search (hydra/sweeper=optuna)


def read_runs(*sweep_dirs: str | Path) -> list[dict[str, Any]]:
    """One row per run under the sweep directories: its overrides, summary metrics and fit time. A failed
    or unfinished run (no metrics.json) is a row with metrics None: left out of the table, warned of,
    but its parameters still show what the sweep varied. A run whose metrics.json or overrides cannot
    be read (e.g. truncated by a full disk) is skipped with a warning naming the file."""
    missing = [str(d) for d in sweep_dirs if not Path(d).is_dir()]
    if missing:  # a mistyped one among several would otherwise drop its runs silently
        raise DatasetError(f"no such sweep directory: {', '.join(missing)}")
    run_dirs = sorted({hydra.parent for d in sweep_dirs for hydra in Path(d).glob("**/.hydra")}
                      | {metrics.parent for d in sweep_dirs for metrics in Path(d).glob("**/metrics.json")},
                      key=_in_job_order)
    unfinished = [str(run_dir) for run_dir in run_dirs
                  if not (run_dir / "metrics.json").is_file() and not _another_process(run_dir)]
    if unfinished:  # a failed or still running job: means over seeds would silently count fewer runs
        log.warning("%d run%s without metrics.json (failed or not finished) left out: %s", len(unfinished),
                    "s" * (len(unfinished) != 1), ", ".join(unfinished))
    rows = []
    for run_dir in run_dirs:
        sweep_dir = next(Path(d) for d in sweep_dirs if run_dir.is_relative_to(d))
        metrics_file = run_dir / "metrics.json"
        if str(run_dir) in unfinished:
            metrics = None
        elif not metrics_file.is_file():  # another process of a multi-process run
            continue
        else:
            try:
                record = json.loads(metrics_file.read_text())
                metrics = {**record["summary"], "fit_s": record["timings"]["fit_s"]}
                if (record.get("validation") or {}).get("image_auroc") is not None:
                    metrics[OBJECTIVE] = record["validation"]["image_auroc"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                log.warning("skipping %s: not readable JSON (%s)", metrics_file, error)
                continue
            except (KeyError, TypeError) as error:
                log.warning("skipping %s: not a training run's metrics (no %s)", metrics_file, error)
                continue
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        try:
            overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
            # '~key' (a deletion) has no value
            # distributed.*: where the processes ran (a port, a process id), not what was measured
            params = {key: value if sep else "(deleted)" for key, sep, value in
                      (item.partition("=") for item in overrides or [] if not item.startswith(("hydra.", "distributed")))}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
            log.warning("skipping %s: its overrides %s are unreadable (%s)", run_dir, overrides_file, error)
            continue
        rows.append({"run": str(run_dir.relative_to(sweep_dir)), "params": params, "metrics": metrics})
    if not any(row["metrics"] is not None for row in rows):
        raise DatasetError(f"no finished runs (metrics.json) under {', '.join(map(str, sweep_dirs))}; "
                           "is it a multirun directory?")
    return rows


def _another_process(run_dir: Path) -> bool:
    """A multi-process run's process other than 0: it writes its log only, never metrics.json."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return any(str(item).startswith("distributed.process_id=") and str(item).partition("=")[2] != "0"
               for item in overrides)


def _in_job_order(path: Path) -> list:
    """Hydra numbers a sweep's jobs 0_..., 1_..., 10_...: by number, not as text (0, 1, 10, 11, 2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def summarise(rows: list[dict[str, Any]], seed_key: str = "seed",
              best_first: bool = False) -> tuple[list[str], list[list[str]]]:
    """Table header and rows (of finished runs): the swept parameters, then each metric; runs that differ only in the seed
    are one row with mean ± std (sample std) and the number of seeds. Runs with the same parameters
    (a search that draws a point again) are one row too, with the number of runs."""
    keys = sorted({key for row in rows for key in row["params"]})
    # what the sweep varied, failed runs included: a value whose runs all failed still leaves its key a column
    swept = [k for k in keys if len({row["params"].get(k) for row in rows}) > 1 or len(rows) == 1]
    rows = [row for row in rows if row["metrics"] is not None]
    columns = [k for k in swept if k != seed_key]
    metrics = [m for m in (*METRICS, OBJECTIVE, "fit_s") if any(m in row["metrics"] for row in rows)]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["params"].get(k, "") for k in columns), []).append(row)
    grouped = seed_key in swept or any(len(members) > 1 for members in groups.values())
    if best_first:  # a search's trials: the best mean validation AUROC first (run order for ties)
        groups = dict(sorted(groups.items(), key=lambda item: -statistics.mean(
            m["metrics"].get(OBJECTIVE, -1.0) for m in item[1])))
    table = []
    for values, members in groups.items():
        cells = [_cell([m["metrics"].get(name) for m in members], grouped, ".1f" if name.endswith("_s") else ".4f")
                 for name in metrics]
        table.append([*values, *([str(len(members))] if grouped else []), *cells])
    header = [*columns, *([("seeds" if seed_key in swept else "runs")] if grouped else []), *metrics]
    return header, table


def _cell(values: list[float | None], grouped: bool, spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if not grouped or len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def write_tables(out_dir: str | Path, header: list[str], table: list[list[str]]) -> str:
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(row) + " |" for row in table)]) + "\n"
    comma_separated = io.StringIO(newline="")
    csv.writer(comma_separated).writerows([header, *table])
    out_dir = Path(out_dir)
    if not out_dir.exists():  # --out may name a new folder
        with output_errors(out_dir / "report.md"):
            out_dir.mkdir(parents=True)
    write_text_atomic(out_dir / "report.md", markdown)
    write_text_atomic(out_dir / "report.csv", comma_separated.getvalue())
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomax-report", description=__doc__)
    parser.add_argument("sweep_dirs", nargs="+", help="multirun directories, e.g. multirun/2026-11-28_12-00-00")
    parser.add_argument("--out", help="where report.md and report.csv go (default: the first sweep directory)")
    parser.add_argument("--version", action="version", version=f"anomax-report (anomax {__version__})")
    parser.add_argument("--best-first", action="store_true",
                        help=f"rows by {OBJECTIVE}, best first (automatic for an Optuna search's directory)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="anomax-report: warning: %(message)s", level=logging.WARNING)
    try:
        search = any((Path(d) / "optimization_results.yaml").is_file() for d in args.sweep_dirs)
        header, table = summarise(read_runs(*args.sweep_dirs), best_first=args.best_first or search)
        print(write_tables(args.out or args.sweep_dirs[0], header, table), end="")
    except AnomaxError as error:
        print(f"anomax-report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
