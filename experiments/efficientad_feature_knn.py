"""Where an efficientad run loses a defect's signal: the image AUROC of a plain 1-nearest-neighbour
patch distance in each feature space the head works with, on one split.

    python experiments/efficientad_feature_knn.py RUN_DIR [--split validation] [--bank 20000]

Spaces: the backbone's adapted features (the PDN teacher's target), the teacher's output, the
student's teacher channels; each standardised per channel on the training images, the border ring
dropped as in the head's maps, a seeded random bank of ``--bank`` training patches, the image score
the largest patch distance. Beside them the head's own local map read as its raw maximum. A space
that scores far below the backbone's has lost what tells a defective image from a good one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import anomax
from anomax.data.dataset import DLDataset
from anomax.distributed import local_batches
from anomax.evaluation.metrics import auroc
from anomax.kernels.neighbors import nearest_neighbors

SPACES = ("backbone", "teacher", "student")


def feature_spaces(model, dataset: DLDataset, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{space: (N, h, w, D)} of the split's images, and their labels."""
    head = model.head
    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    params = (model.backbone.params, model.adaptor_params)

    @jax.jit
    def spaces(images):
        features = model.features(*params, images)
        teacher = head._teacher_output(state, images, features)
        student = head._student.apply(head._student.params(state), images)[..., :teacher.shape[-1]]
        return features, teacher, student

    out, labels = {space: [] for space in SPACES}, []
    for batch in local_batches(dataset, split, model.preprocess, model.batch_size):
        valid = np.asarray(batch["valid"], bool)
        for space, value in zip(SPACES, spaces(jnp.asarray(batch["image"]))):
            out[space].append(np.asarray(value)[valid])
        labels.append(np.asarray(batch["label"])[valid])
    return {space: np.concatenate(values) for space, values in out.items()}, np.concatenate(labels)


def nearest_neighbour_scores(train: np.ndarray, query: np.ndarray, bank_size: int, seed: int = 0) -> np.ndarray:
    """Per query image: the largest distance of its patches to their nearest bank patch."""
    train, query = train[:, 1:-1, 1:-1], query[:, 1:-1, 1:-1]  # the maps' border ring
    flat = train.reshape(-1, train.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    bank = (flat - mean) / std
    bank = bank[np.random.default_rng(seed).choice(len(bank), min(bank_size, len(bank)), replace=False)]
    patches = ((query - mean) / std).reshape(-1, query.shape[-1])
    distances, _ = nearest_neighbors(jnp.asarray(patches), jnp.asarray(bank), indices=False)
    return np.asarray(distances).reshape(len(query), -1).max(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--bank", type=int, default=20000)
    args = parser.parse_args()
    model = anomax.load_model(args.run / "model")
    dataset = DLDataset.from_json(args.run / "dataset.json")
    train, _ = feature_spaces(model, dataset, "train")
    query, labels = feature_spaces(model, dataset, args.split)
    for space in SPACES:
        print(f"| {space} | {auroc(nearest_neighbour_scores(train[space], query[space], args.bank), labels):.4f} |")
    local = np.square(query["teacher"] - query["student"]).mean(-1)[:, 1:-1, 1:-1]
    print(f"| local map, raw maximum | {auroc(local.reshape(len(labels), -1).max(1), labels):.4f} |")


if __name__ == "__main__":
    main()
