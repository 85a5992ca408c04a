"""Image AUROC of three image-score rules for saved anomax-train runs (levers.md, session 13).

    python experiments/image_score_rules.py RUN_DIR [RUN_DIR ...] [--split validation]

Scores the split once with each run's saved model (a single model or a score ensemble) and prints
the image AUROC of:
- score: the model's own 'anomaly_score' (PatchCore: the re-weighted maximum patch distance; an
  ensemble: the mean of its members' z-normalised scores);
- map max: the maximum of the (smoothed; an ensemble's: z-normalised and averaged) 'anomaly_image';
- max - median: that maximum less the image's own median map value (each image its own reference).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import anomax
from anomax.data.dataset import DLDataset
from anomax.evaluation._results import iterate_results
from anomax.evaluation.metrics import auroc
from anomax.pipeline import results_of


def rule_scores(run_dir: Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three rules' image scores and the labels (1 = defective) of the split's images."""
    model = anomax.load_model(run_dir / "model")
    dataset = DLDataset.from_json(run_dir / "dataset.json")
    scores, maxima, medians, labels = [], [], [], []
    for batch in iterate_results(results_of(model, dataset, split, progress=False)):  # padding dropped
        maps = batch["anomaly_image"].reshape(len(batch["anomaly_image"]), -1)  # one batch of maps at a time
        scores.append(batch["anomaly_score"])
        maxima.append(maps.max(1))
        medians.append(np.median(maps, 1))
        labels.append(batch["anomaly_label_id"])
    maxima = np.concatenate(maxima)
    rules = {"score": np.concatenate(scores), "map max": maxima, "max - median": maxima - np.concatenate(medians)}
    return rules, np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    print("| run | score | map max | max - median |")
    print("|---|---|---|---|")
    for run in args.runs:
        rules, labels = rule_scores(run, args.split)
        print(f"| {run.name} | " + " | ".join(f"{auroc(values, labels):.4f}" for values in rules.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
