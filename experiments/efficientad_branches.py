"""Image AUROC per defect type of each map a head returns (combined, local, global), for anomax-train runs.

    python experiments/efficientad_branches.py RUN_DIR [RUN_DIR ...] [--split test] [--recalibrate] [--border N]
        [--combine mean|max] [--sigma S] [--image-score max|branches]

Reads each run's saved model and dataset manifest, scores the split once and prints one markdown
row per run and defect type: AUROC of 'anomaly_score' and, where the head gives them,
'anomaly_score_local' and 'anomaly_score_global' (good images of the split against that type).
--recalibrate: an efficientad model's map quantiles are first taken again, as its fit does, on the
good validation images or, without a validation split, on the training images fit held out
(for models saved before a change to how maps are computed).
--border N: an efficientad model's maps with N grid cells zeroed at each edge instead of its own
setting, the quantiles taken again (--recalibrate) for them: the border is a map setting, so
it is compared on the same trained networks without a refit.
--combine mean|max: an efficientad model's combined map as the branches' mean or pointwise maximum
instead of its own setting (each branch is normalised on its own, so the quantiles stay).
--sigma S: the maps' Gaussian smoothing (input pixels) instead of the model's own; a map setting
applied after the quantile normalisation, so the quantiles stay.
--image-score max|branches: an efficientad model's image score rule instead of its own ('branches':
the local map's maximum and the global map's mean, standardised on the good validation images, so
the model is calibrated again, which also takes the quantiles again: the same ones, from the same images).
A score ensemble's run (ensemble=...) is scored as saved: the members' normalised maps and scores averaged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import anomax
from anomax.data.dataset import DLDataset
from anomax.evaluation.metrics import auroc

SCORES = ("anomaly_score", "anomaly_score_local", "anomaly_score_global")


def recalibrate(model, dataset: DLDataset, run_dir: Path) -> str:
    """Quantile images as in EfficientAD.fit: good validation images, else the held-out training ones."""
    from anomax.preprocess.cache import iterate_batches

    split = "validation" if any(s.split == "validation" and s.anomaly_label == "ok" for s in dataset.samples) \
        else "train"
    images, features, labels = [], [], []
    for batch in iterate_batches(dataset, split, model.preprocess, model.batch_size):
        valid = np.asarray(batch["valid"], bool)
        images.append(np.asarray(batch["image"])[valid])
        labels.append(np.asarray(batch["label"])[valid])
        if model.head.uses_backbone:  # teacher='backbone': the quantiles' maps need the images' features
            features.append(np.asarray(model._features(model.backbone.params, model.adaptor_params,
                                                       batch["image"]))[valid])
    images, labels = np.concatenate(images), np.concatenate(labels)
    features = np.concatenate(features) if features else None
    if split == "validation":
        keep = labels == 0
    else:
        seed = json.loads((run_dir / "model" / "config.json").read_text())["train"]["seed"]
        order = np.random.default_rng(seed).permutation(len(images))
        keep = np.sort(order[:max(1, round(model.head.config.holdout * len(images)))])
    images, features = images[keep], None if features is None else features[keep]
    model.head.calibrate(images, model.batch_size, features)
    return f"{len(images)} {split} images"


def branch_aurocs(run_dir: Path, split: str, calibrate: bool = False, border: int | None = None,
                  combine: str | None = None, sigma: float | None = None,
                  image_score: str | None = None) -> tuple[str, dict[str, dict[str, float]]]:
    model = anomax.load_model(run_dir / "model")
    dataset = DLDataset.from_json(run_dir / "dataset.json")
    settings = {key: value for key, value in (("combine", combine), ("sigma", sigma), ("border", border),
                                              ("image_score", image_score)) if value is not None}
    ensemble = not hasattr(model, "head")  # a score ensemble: its members' maps and scores, averaged
    if ensemble and (settings or calibrate):
        raise SystemExit(f"{run_dir}: a score ensemble; --recalibrate, --border, --combine, --sigma and "
                         "--image-score change one model")
    if not ensemble:
        model.head.config = dataclasses.replace(model.head.config, **settings)
        # a new border changes the maps the quantiles come from; the branch scores' statistics depend
        # on every map setting
        branch_scores = getattr(model.head.config, "image_score", "max") == "branches"
        calibrate = calibrate or border is not None or (branch_scores and bool(settings))
        if calibrate and hasattr(model.head, "calibrate"):
            print(f"<!-- {run_dir.name}: quantiles again from {recalibrate(model, dataset, run_dir)} -->")
    samples = dataset.samples_of(split)
    scores: dict[str, list[float]] = {}
    types: list[str] = []
    for batch in model.score_split(dataset, split, progress=False):
        valid = np.asarray(batch["valid"], bool)
        for key in SCORES:
            if key in batch:
                scores.setdefault(key, []).extend(np.asarray(batch[key])[valid].tolist())
        # Batches carry each image's position in the split; its sample names the defect type.
        types.extend(samples[int(i)].defect_type if samples[int(i)].anomaly_label == "nok" else "good"
                     for i in np.asarray(batch["index"])[valid])
    types_arr = np.asarray(types)
    table = {}
    for defect in sorted(set(types) - {"good"}):
        chosen = (types_arr == "good") | (types_arr == defect)
        labels = (types_arr[chosen] == defect).astype(int)
        table[defect] = {key: auroc(np.asarray(values)[chosen], labels) for key, values in scores.items()}
    return ("score ensemble: " + ", ".join(m.head.name for m in model.members)) if ensemble else model.head.name, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--recalibrate", action="store_true")
    parser.add_argument("--border", type=int, help="efficientad: map border (grid cells), quantiles taken again")
    parser.add_argument("--combine", choices=("mean", "max"), help="efficientad: the combined map's rule")
    parser.add_argument("--sigma", type=float, help="the maps' Gaussian smoothing in input pixels")
    parser.add_argument("--image-score", choices=("max", "branches"), help="efficientad: the image score's rule")
    args = parser.parse_args()
    print("| run | head | defect type | combined | local | global |")
    print("|---|---|---|---|---|---|")
    everything = {}
    for run in args.runs:
        head, table = branch_aurocs(run, args.split, args.recalibrate, args.border, args.combine,
                                   args.sigma, args.image_score)
        everything[str(run)] = {"head": head, "image_auroc": table}
        for defect, values in table.items():
            cells = [f"{values[key]:.4f}" if key in values else "–" for key in SCORES]
            print(f"| {run.name} | {head} | {defect} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
