"""Image AUROC per defect type of each map a head returns (combined, local, global), for anomax-train runs.

    python experiments/efficientad_branches.py RUN_DIR [RUN_DIR ...] [--split test]

Reads each run's saved model and dataset manifest, scores the split once and prints one markdown
row per run and defect type: AUROC of 'anomaly_score' and, where the head gives them,
'anomaly_score_local' and 'anomaly_score_global' (good images of the split against that type).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import anomax
from anomax.data.dataset import DLDataset
from anomax.evaluation.metrics import auroc

SCORES = ("anomaly_score", "anomaly_score_local", "anomaly_score_global")


def branch_aurocs(run_dir: Path, split: str) -> tuple[str, dict[str, dict[str, float]]]:
    model = anomax.load_model(run_dir / "model")
    dataset = DLDataset.from_json(run_dir / "dataset.json")
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
    return model.head.name, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    print("| run | head | defect type | combined | local | global |")
    print("|---|---|---|---|---|---|")
    everything = {}
    for run in args.runs:
        head, table = branch_aurocs(run, args.split)
        everything[str(run)] = {"head": head, "image_auroc": table}
        for defect, values in table.items():
            cells = [f"{values[key]:.4f}" if key in values else "–" for key in SCORES]
            print(f"| {run.name} | {head} | {defect} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
