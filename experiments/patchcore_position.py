"""A validation-only probe of PatchCore with each patch's grid position appended to its feature
(issue 15, experiments/levers.md "Where a patch sits"). Not a head setting: the probe was measured
and the lever not taken.

The run's features are extracted once (any anomax-train overrides, e.g. dataset=elpv_poly seed=1
preprocess.normalization_type=all_channels); then for each weight w the patch's (row, column) in [0, 1]
is appended, times w x the RMS distance between two random training patches (so w = 1: crossing the
whole image costs as much as a typical pair of unrelated patches), the 1 % greedy coreset is chosen
on the 128-dim projection plus the position, and each validation image scores its worst patch's
nearest-bank distance (k = 1, the plain max; the head's k = 9 re-weighting is left out). w = 0 is
PatchCore itself up to that re-weighting.

    python experiments/patchcore_position.py 0,0.1,0.4,1 +experiment=elpv_best ensemble=off dataset=elpv_poly
"""
from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score

from anomax.apps.config import compose_train_config
from anomax.features import random_projection
from anomax.kernels.coreset import greedy_coreset
from anomax.kernels.neighbors import nearest_neighbors
from anomax.pipeline import build_model, read_configured_dataset


def split_features(model, dataset, split: str, cache_dir) -> np.ndarray:
    """(N, h, w, D) features of a split's valid images, in the split's order."""
    return np.concatenate([np.asarray(batch["features"])[np.asarray(batch["valid"]).astype(bool)]
                           for batch in model.feature_batches(dataset, split, cache_dir)])


def grid_positions(features: np.ndarray) -> np.ndarray:
    """(N, h, w, D) -> (N * h * w, 2): each patch's row and column centre in [0, 1], in the features' order."""
    count, height, width, _ = features.shape
    rows, columns = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return np.tile(np.stack([rows, columns], -1).reshape(-1, 2), (count, 1)).astype(np.float32)


def main(weights: list[float], overrides: list[str]) -> None:
    cfg = compose_train_config(overrides)
    head = cfg["model"]["head"]
    model = build_model(cfg)
    dataset = read_configured_dataset(cfg["dataset"], cfg["split"], cfg["seed"])
    began = time.perf_counter()
    train = split_features(model, dataset, "train", cfg.get("cache_dir"))
    validation = split_features(model, dataset, "validation", cfg.get("cache_dir"))
    labels = np.array([sample.anomaly_label != "ok" for sample in dataset.samples_of("validation")])
    dim = train.shape[-1]
    flat = train.reshape(-1, dim)
    spread = float(np.sqrt(2 * flat.var(axis=0).sum()))
    print(f"features: train {train.shape}, validation {validation.shape} ({labels.sum()} defective), "
          f"{time.perf_counter() - began:.0f} s; RMS distance of two training patches {spread:.2f}", flush=True)
    projected = flat @ random_projection(head["seed"], dim, head["projection_dim"])
    start = int(np.random.default_rng(head["seed"]).integers(len(flat)))  # the head's first draw
    size = int(len(flat) * head["coreset_ratio"])
    # The features stay as they are; only the appended positions change with w (the bank keeps the chosen rows).
    train_positions, queries = grid_positions(train), validation.reshape(-1, dim)
    validation_positions = grid_positions(validation)
    for weight in weights:
        scale = np.float32(weight * spread)
        chosen = np.asarray(greedy_coreset(jnp.asarray(np.concatenate([projected, train_positions * scale], 1)),
                                           size, start))
        bank = np.concatenate([flat[chosen], train_positions[chosen] * scale], 1)
        distances, _ = nearest_neighbors(jnp.asarray(np.concatenate([queries, validation_positions * scale], 1)),
                                         jnp.asarray(bank), k=1, indices=False)
        scores = np.asarray(distances).reshape(len(validation), -1).max(axis=1)
        print(f"w={weight}: validation image AUROC {roc_auc_score(labels, scores):.4f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=lambda text: [float(w) for w in text.split(",")],
                        help="position weights w, comma-separated (0 = PatchCore)")
    parser.add_argument("overrides", nargs="*", help="anomax-train config overrides")
    arguments = parser.parse_args()
    main(arguments.weights, arguments.overrides)
