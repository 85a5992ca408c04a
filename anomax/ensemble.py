"""Ensembles of anomaly models: feature concatenation across backbones, and score ensembles.

- ``ConcatBackbone``: several backbones behind one ``Backbone`` interface; their taps are named
  ``<backbone>/<tap>`` and the feature adaptor resizes and concatenates them like any taps. The
  members must want the same input normalisation (one preprocessed image feeds them all).
- ``ScoreEnsemble``: fitted models scored side by side. The members' maps and scores live on
  different scales, so each member's map is z-normalised with the mean and standard deviation of
  its own map pixels on the validation split's good images (its image scores likewise with their
  own statistics), then the normalised maps and scores are averaged. Only validation good images
  enter the statistics: the test split and every defective image stay unseen.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.backbones import Backbone
from anomax.data.dataset import DLDataset
from anomax.errors import ConfigError, DatasetError, InputError

NORMALISATION_KEYS = ("normalization_type", "mean", "std", "range_min", "range_max", "num_channels")


class ConcatBackbone:
    """Backbones side by side on the same preprocessed images: taps ``'<name>/<tap>'`` of every member."""

    def __init__(self, members: Sequence[Backbone]):
        if len(members) < 2:
            raise ConfigError("a backbone ensemble needs at least two backbones")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"a backbone ensemble's members must differ, got {names}")
        first = {key: members[0].requirements.get(key) for key in NORMALISATION_KEYS}
        for member in members[1:]:
            other = {key: member.requirements.get(key) for key in NORMALISATION_KEYS}
            if other != first:
                raise ConfigError(f"backbones {members[0].name} and {member.name} want different input "
                                  f"normalisations ({first} vs {other}); a feature ensemble feeds one "
                                  f"preprocessed image to all: choose backbones with the same normalisation")
        self.members = tuple(members)
        self.name = "+".join(names)
        multiple = math.lcm(*(m.requirements["input_multiple"] for m in members))
        self.requirements = {**members[0].requirements, "input_multiple": multiple}
        self.taps = tuple(f"{m.name}/{tap}" for m in members for tap in m.taps)
        self.available_taps = self.taps
        self.channels = {f"{m.name}/{tap}": c for m in members for tap, c in m.channels.items()}
        self.strides = {f"{m.name}/{tap}": s for m in members for tap, s in m.strides.items()}
        self.params = tuple(m.params for m in members)
        self.width_multiplier = 1.0
        self.weights_sha256 = ",".join(str(m.weights_sha256) for m in members)

    def forward(self, params, images: jax.Array) -> dict[str, jax.Array]:
        """Pure and jittable: every member's tapped maps, under '<member>/<tap>'."""
        return {f"{m.name}/{tap}": value for m, p in zip(self.members, params)
                for tap, value in m.forward(p, images).items()}

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.forward(self.params, images)


class ScoreEnsemble:
    """Fitted AnomalyModels whose z-normalised maps and scores are averaged. Call ``normalise``
    (validation good images) before scoring; maps are resized to the first member's input size."""

    def __init__(self, members: Sequence[Any]):
        if not members:
            raise ConfigError("a score ensemble needs at least one member model")
        self.members = tuple(members)
        self.stats: list[dict[str, float]] | None = None

    @property
    def map_size(self) -> tuple[int, int]:
        first = self.members[0].preprocess
        return first.height, first.width

    def normalise(self, dataset: DLDataset, split: str = "validation", cache_dir: str | None = None) -> list[dict]:
        """Each member's mean and std of its map pixels and of its image scores over ``split``'s good
        images only (the defective ones are dropped before anything is scored)."""
        good = DLDataset([s for s in dataset.samples if s.split == split and s.anomaly_label == "ok"], dataset.format)
        if not good.samples:
            raise DatasetError(f"the score ensemble normalises on the '{split}' split's good images, and there are "
                               f"none; give the dataset a validation split with good images")
        self.stats = []
        for member in self.members:
            pixels = _Moments()
            scores = []
            for batch in member.score_split(good, split, cache_dir=cache_dir, progress=False):
                valid = np.asarray(batch["valid"], bool)
                pixels.add(np.asarray(batch["anomaly_image"], np.float64)[valid])
                scores.append(np.asarray(batch["anomaly_score"], np.float64)[valid])
            scores = np.concatenate(scores)
            # a constant map (std 0) is only shifted: it carries no evidence either way
            self.stats.append({"map_mean": pixels.mean, "map_std": pixels.std or 1.0,
                               "score_mean": float(scores.mean()), "score_std": float(scores.std()) or 1.0})
        return self.stats

    def score_split(self, dataset: DLDataset, split: str, *, cache_dir: str | None = None,
                    progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Like AnomalyModel.score_split: batches of the members' mean normalised 'anomaly_image' and
        'anomaly_score', with the first member's 'mask', 'label', 'index', 'valid'."""
        if self.stats is None:
            raise InputError("ScoreEnsemble.score_split before normalise(): call normalise(dataset) first")
        streams = [m.score_split(dataset, split, cache_dir=cache_dir, progress=progress) for m in self.members]
        for batches in zip(*streams):
            indices = [np.asarray(b["index"]) for b in batches]
            if any(not np.array_equal(i, indices[0]) for i in indices[1:]):
                raise InputError("the ensemble's members batch the split differently; give them one batch_size")
            maps, scores = [], []
            for batch, stats in zip(batches, self.stats):
                maps.append((_resized(batch["anomaly_image"], self.map_size) - stats["map_mean"]) / stats["map_std"])
                scores.append((np.asarray(batch["anomaly_score"]) - stats["score_mean"]) / stats["score_std"])
            first = batches[0]
            yield {key: first[key] for key in ("mask", "label", "index", "valid") if key in first} | {
                "anomaly_image": np.mean(maps, axis=0).astype(np.float32),
                "anomaly_score": np.mean(scores, axis=0).astype(np.float32)}


class _Moments:
    """Streamed mean and standard deviation (Chan's parallel update, float64)."""

    def __init__(self):
        self.count, self.mean_, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        if not values.size:
            return
        count, mean = values.size, values.mean()
        delta = mean - self.mean_
        total = self.count + count
        self.m2 += ((values - mean) ** 2).sum() + delta ** 2 * self.count * count / total
        self.mean_ += delta * count / total
        self.count = total

    @property
    def mean(self) -> float:
        return float(self.mean_)

    @property
    def std(self) -> float:
        return float(math.sqrt(self.m2 / self.count)) if self.count else 0.0


def _resized(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    maps = np.asarray(maps, np.float32)
    if maps.shape[1:3] == tuple(size):
        return maps
    return np.asarray(jax.image.resize(jnp.asarray(maps), (maps.shape[0], *size), "bilinear"))
