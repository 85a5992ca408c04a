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
from anomax.evaluation.metrics import auroc


def rule_scores(run_dir: Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    model = anomax.load_model(run_dir / "model")
    dataset = DLDataset.from_json(run_dir / "dataset.json")
    scores, maxima, medians, labels = [], [], [], []
    for batch in model.score_split(dataset, split, progress=False):
        valid = np.asarray(batch["valid"], bool)
        maps = np.asarray(batch["anomaly_image"], np.float64)[valid].reshape(int(valid.sum()), -1)
        scores.append(np.asarray(batch["anomaly_score"], np.float64)[valid])
        maxima.append(maps.max(1))
        medians.append(np.median(maps, 1))
        labels.append(np.asarray(batch["label"])[valid])
    maxima, medians = np.concatenate(maxima), np.concatenate(medians)
    rules = {"score": np.concatenate(scores), "map max": maxima, "max - median": maxima - medians}
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
