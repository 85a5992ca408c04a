"""anomax-predict: a saved model on new images -> scores, classes, heatmap overlays, results.csv/json.

Inputs are read, scored and drawn one batch at a time, so memory does not grow with their number.
A file that cannot be read, or that the model refuses (e.g. smaller than its domain box), gets an
error line in the results; the other images are still scored. An overlay that cannot be written
gets its error in the image's line, beside the score.
The job fails (exit status 2) when not a single file could be scored.
"""
from __future__ import annotations

import csv
import glob
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomax.apps._common import (check_known_keys, load_configured_model, plain, print_version_if_asked,
                                 reports_errors)
from anomax.apps.config import CONF_DIR, PredictAppConfig, register_predict_schema
from anomax.data import images as image_files
from anomax.errors import AnomaxError, ConfigError, DatasetError, OutputError
from anomax.files import write_json_atomic, writing
from anomax.preprocess.params import crop_to_domain

log = logging.getLogger("anomax")
STEM_BYTES = 200  # of an overlay's name: the rest of 255 holds its number, branch and suffix
COLUMNS = ["image_file_name", "anomaly_score", "anomaly_class", "anomaly_class_id", "num_regions", "overlay", "error"]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS, with a head's further scores and their overlays (efficientad: _local, _global) each
    after its combined one."""
    branches = sorted({key.removeprefix("anomaly_score_") for row in rows for key in row
                       if key.startswith("anomaly_score_")})
    named = {"anomaly_score": [f"anomaly_score_{b}" for b in branches], "overlay": [f"overlay_{b}" for b in branches]}
    return [name for column in COLUMNS for name in (column, *named.get(column, ()))]


def image_paths(inputs: Any) -> list[Path]:
    """Folders (recursively: every file in them, so a stray non-image is reported), files and globs."""
    if inputs is None:
        raise DatasetError("predict inputs are null; name a folder, an image file or a glob (inputs=PATH)")
    paths: list[Path] = []
    # one item or a list; a folder named like a number (inputs=20240101) comes from Hydra as an int
    for item in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        item = str(Path(str(item)).expanduser())
        if Path(item).is_dir():
            paths += image_files.list_files(item)  # hidden files left out there
        elif Path(item).is_file():
            paths.append(Path(item))
        elif matches := sorted(glob.glob(item, recursive=True)):
            for match in map(Path, matches):  # a matched folder is read like a named one
                paths += image_files.list_files(match) if match.is_dir() else [match]
        else:
            raise DatasetError(f"predict input '{item}' is not a folder, a file or a glob that matches anything")
    if not paths:
        raise DatasetError(f"predict inputs {inputs!r} hold no files")
    return paths


def predict_files(model, paths: list[Path], out_dir: Path, colormap: str = "jet", overlays: bool = True
                  ) -> list[dict[str, Any]]:
    """Score every readable image, ``model.batch_size`` at a time; unreadable ones get {'error': ...}.
    Writes results.csv and results.json; raises DatasetError when no file could be scored."""
    rows: list[dict[str, Any]] = []
    scored = 0
    for start in range(0, len(paths), model.batch_size):
        batch, batch_rows = [], []
        for path in paths[start:start + model.batch_size]:
            rows.append({"image_file_name": str(path)})
            try:
                batch.append(image_files.read_image(path))
                batch_rows.append(rows[-1])
            except AnomaxError as error:
                log.error("%s", error)
                rows[-1]["error"] = str(error)
        for row, image, result in _scored(model, batch, batch_rows):
            _fill(row, result)
            if overlays:
                try:
                    _draw_overlays(out_dir / "overlays" / overlay_name(scored, row["image_file_name"]), row,
                                   crop_to_domain(model.preprocess, image), result, colormap)
                except OutputError as error:  # the score stands; the other images still get theirs
                    log.error("%s", error)
                    row["error"] = f"overlay not written: {error}"
            scored += 1
    image_files.log_conversions("predict")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", rows)
    with writing(out_dir / "results.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    if not scored:
        raise DatasetError(f"none of the {len(rows)} input files could be scored (not images, or unreadable); "
                           f"the reasons are in {out_dir / 'results.csv'}")
    return rows


def _scored(model, images: list, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any, dict[str, Any]]]:
    """(row, image, result) for each image the model takes. When it refuses the batch (an image smaller
    than the domain box, say), the images are scored one by one and the refused ones get their error."""
    try:
        return list(zip(rows, images, model.apply(images) if images else [], strict=True))
    except AnomaxError as error:
        if len(images) == 1:
            log.error("%s: %s", rows[0]["image_file_name"], error)
            rows[0]["error"] = str(error)
            return []
    return [scored for row, image in zip(rows, images) for scored in _scored(model, [image], [row])]


def _fill(row: dict[str, Any], result: dict[str, Any]) -> None:
    row.update({key: value for key, value in result.items() if key.startswith("anomaly_score")})
    if "anomaly_class" in result:
        row["anomaly_class"] = result["anomaly_class"]
        row["anomaly_class_id"] = result["anomaly_class_id"]
        row["num_regions"] = len(result["anomaly_region"]["components"])


def overlay_name(number: int, image_file_name: str) -> str:
    """The number keeps names unique; the image's stem, cut to fit a file system's 255 bytes, says which it is."""
    stem = Path(image_file_name).stem.encode()[:STEM_BYTES].decode(errors="ignore")
    return f"{number:05d}_{stem}.png"


def _draw_overlays(picture: Path, row: dict[str, Any], image, result: dict[str, Any], colormap: str) -> None:
    for key in [key for key in result if key.startswith("anomaly_image")]:
        branch = key.removeprefix("anomaly_image")  # '' for the combined map, else '_local', ...
        row[f"overlay{branch}"] = str(_draw(picture.with_stem(picture.stem + branch), row, image, result,
                                            colormap, branch))


def _draw(picture: Path, row: dict[str, Any], image, result: dict[str, Any], colormap: str, branch: str = "") -> Path:
    """The overlay of the combined map (``branch`` '') with its class and region, or of one branch's map."""
    from anomax.evaluation import plot_anomaly_overlay

    region = result["anomaly_region"]["mask"] if "anomaly_region" in result and not branch else None
    title = f"{Path(row['image_file_name']).name}: {result[f'anomaly_score{branch}']:.4g}"
    if branch:
        title += f" [{branch[1:]} map]"
    elif "anomaly_class" in result:
        title += f" ({result['anomaly_class']})"
    return plot_anomaly_overlay(picture, image, result[f"anomaly_image{branch}"], cmap=colormap, region=region,
                                title=title)


def check_batch_size(batch_size: Any) -> None:
    """None keeps the model's saved batch size; anything else must be a positive integer."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}; "
                          "leave it out (null) to use the batch size saved with the model")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_predict")
@reports_errors("anomax-predict")
def _predict(cfg: DictConfig) -> None:
    from anomax.evaluation.config import COLORMAP_RULE, is_colormap
    from anomax.files import claim_run_dir

    config = plain(cfg)
    check_known_keys(config, PredictAppConfig, "anomax-predict")
    check_batch_size(config["batch_size"])
    if not is_colormap(config["colormap"]):  # before any image is scored and drawn
        raise ConfigError(f"colormap = {config['colormap']!r} is invalid: it must be {COLORMAP_RULE}")
    paths = image_paths(config["inputs"])
    with claim_run_dir(HydraConfig.get().runtime.output_dir) as out_dir:
        model = load_configured_model(config)
        rows = predict_files(model, paths, out_dir, config["colormap"], config["overlays"])
    failed = sum("anomaly_score" not in row for row in rows)
    print(f"anomax-predict: {len(rows) - failed} images scored, {failed} failed -> {out_dir / 'results.csv'}")


def main() -> None:
    print_version_if_asked("anomax-predict")
    register_predict_schema()
    _predict()


if __name__ == "__main__":
    main()
