"""anomax-predict: a saved model on new images -> scores, classes, heatmap overlays, results.csv/json.

A file that cannot be read gets an error line in the results; the other images are still scored.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomax.apps._common import load_configured_model, plain, reports_errors
from anomax.apps.config import CONF_DIR, register_schemas
from anomax.errors import AnomaxError, DatasetError

log = logging.getLogger("anomax")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def image_paths(inputs: str | Iterable[str]) -> list[Path]:
    """Folders (recursively: every file in them, so a stray non-image is reported), files and globs."""
    paths: list[Path] = []
    for item in [inputs] if isinstance(inputs, str) else inputs:
        item = str(Path(item).expanduser())
        if Path(item).is_dir():
            paths += sorted(p for p in Path(item).rglob("*") if p.is_file() and not p.name.startswith("."))
        elif Path(item).is_file():
            paths.append(Path(item))
        elif matches := sorted(glob.glob(item, recursive=True)):
            paths += [Path(m) for m in matches if Path(m).is_file()]
        else:
            raise DatasetError(f"predict input '{item}' is not a folder, a file or a glob that matches anything")
    if not paths:
        raise DatasetError(f"predict inputs {inputs!r} hold no files")
    return paths


def predict_files(model, paths: list[Path], out_dir: Path, colormap: str = "jet", overlays: bool = True
                  ) -> list[dict[str, Any]]:
    """Score every readable image; unreadable ones get {'error': ...}. Writes results.csv and results.json."""
    from anomax.data.images import read_image
    from anomax.evaluation import plot_anomaly_overlay

    rows: list[dict[str, Any]] = []
    images, readable = [], []
    for path in paths:
        try:
            images.append(read_image(path))
            readable.append(len(rows))
            rows.append({"image_file_name": str(path)})
        except AnomaxError as error:
            log.error("%s", error)
            rows.append({"image_file_name": str(path), "error": str(error)})
    results = model.apply(images) if images else []
    for number, (row_index, image, result) in enumerate(zip(readable, images, results)):
        row = rows[row_index]
        row["anomaly_score"] = result["anomaly_score"]
        if "anomaly_class" in result:
            row["anomaly_class"] = result["anomaly_class"]
            row["anomaly_class_id"] = result["anomaly_class_id"]
            row["num_regions"] = len(result["anomaly_region"]["components"])
        if overlays:
            picture = out_dir / "overlays" / f"{number:05d}_{Path(row['image_file_name']).stem}.png"
            region = result["anomaly_region"]["mask"] if "anomaly_region" in result else None
            plot_anomaly_overlay(picture, image, result["anomaly_image"], cmap=colormap, region=region,
                                 title=f"{Path(row['image_file_name']).name}: {result['anomaly_score']:.4g}"
                                       + (f" ({result['anomaly_class']})" if "anomaly_class" in result else ""))
            row["overlay"] = str(picture)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    columns = ["image_file_name", "anomaly_score", "anomaly_class", "anomaly_class_id", "num_regions", "overlay",
               "error"]
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="anomax_predict")
@reports_errors("anomax-predict")
def _predict(cfg: DictConfig) -> None:
    config = plain(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    model = load_configured_model(config)
    rows = predict_files(model, image_paths(config["inputs"]), out_dir, config["colormap"], config["overlays"])
    failed = sum("error" in row for row in rows)
    print(f"anomax-predict: {len(rows) - failed} images scored, {failed} failed -> {out_dir / 'results.csv'}")


def main() -> None:
    register_schemas()
    _predict()


if __name__ == "__main__":
    main()
