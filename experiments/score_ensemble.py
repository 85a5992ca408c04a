"""Score ensemble of trained runs (anomax.ensemble.ScoreEnsemble): each run's saved model is z-normalised
with its own map and score statistics on the validation split's good images, then the members' normalised
maps and scores are averaged. The runs must share one split (their dataset.json files must be equal).

    python experiments/score_ensemble.py OUT_DIR RUN_DIR RUN_DIR [...] [--tta hflip vflip] [--splits validation]

One RUN_DIR scores that run alone (its z-normalisation does not change its AUROC). ``--tta`` scores every
member with test-time augmentation (anomax.augment: the mean of the maps over the identity and these
transforms, each undone), on models fitted without it. Writes OUT_DIR/ensemble.json: the ensemble's
validation and test image AUROC, the normalisation statistics, and the scoring seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from anomax.artifact import load_model
from anomax.data.dataset import DLDataset
from anomax.ensemble import ScoreEnsemble
from anomax.evaluation.metrics import auroc
from anomax.files import write_json_atomic

CACHE = os.path.expanduser("~/.cache/anomax/preprocessed")


def image_auroc(batches) -> float:
    scores, labels = [], []
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        scores.append(np.asarray(batch["anomaly_score"])[valid])
        labels.append(np.asarray(batch["label"])[valid])
    return auroc(np.concatenate(scores), np.concatenate(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--tta", nargs="*", default=[], help="test-time transforms for every member")
    parser.add_argument("--splits", nargs="+", default=["validation", "test"], choices=["validation", "test"],
                        help="the splits to score: 'validation' alone for a screen that leaves the test split unread")
    args = parser.parse_args()
    datasets = [json.loads((Path(run) / "dataset.json").read_text()) for run in args.runs]
    if any(d != datasets[0] for d in datasets[1:]):
        raise SystemExit("the runs do not share one split (their dataset.json files differ)")
    dataset = DLDataset.from_json(Path(args.runs[0]) / "dataset.json")
    members = [load_model(Path(run) / "model") for run in args.runs]
    for member in members:
        member.set_params(batch_size=16)
        member.augment = dataclasses.replace(member.augment, tta=tuple(args.tta))
        member.augment.check_input(member.preprocess.height, member.preprocess.width)
    ensemble = ScoreEnsemble(members)
    began = time.perf_counter()
    stats = ensemble.normalise(dataset, "validation", cache_dir=CACHE)
    result = {"runs": args.runs, "tta": args.tta, "stats": stats, "normalise_s": time.perf_counter() - began}
    for split in args.splits:
        began = time.perf_counter()
        result[split] = {"ensemble_image_auroc": image_auroc(ensemble.score_split(dataset, split, cache_dir=CACHE))}
        result[split]["seconds"] = time.perf_counter() - began
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "ensemble.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
