"""Ensembles of anomaly models: feature concatenation across backbones, and score ensembles.

- ``ConcatBackbone``: several backbones behind one ``Backbone`` interface; their taps are named
  ``<backbone>/<tap>`` and the feature adaptor resizes and concatenates them like any taps. One
  preprocessed image, normalised as the first member wants, feeds them all: the backbones' input
  normalisations are affine in the pixel value, so each other member gets its own by an affine
  map of the first's. ``model/backbone=concat_*`` configs build one (``concat_backbone``).
- ``ScoreEnsemble``: fitted models scored side by side. The members' maps and scores live on
  different scales, so each member's map is z-normalised with the mean and standard deviation of
  its own map pixels on the validation split's good images (its image scores likewise with their
  own statistics), then the normalised maps and scores are averaged. Only validation good images
  enter the statistics: the test split and every defective image stay unseen.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.backbones import Backbone, build_backbone
from anomax.data.dataset import DLDataset
from anomax.errors import ConfigError, DatasetError, InputError
from anomax.preprocess.params import PreprocessParams
from anomax.registry import BACKBONES

NORMALISATION_KEYS = ("normalization_type", "mean", "std", "range_min", "range_max")


class ConcatBackbone:
    """Backbones side by side on the same preprocessed images: taps ``'<name>/<tap>'`` of every member."""

    def __init__(self, members: Sequence[Backbone]):
        if len(members) < 2:
            raise ConfigError("a backbone ensemble needs at least two backbones")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"a backbone ensemble's members must differ, got {names}")
        channels = {m.name: m.requirements.get("num_channels", 3) for m in members}
        if len(set(channels.values())) > 1:
            raise ConfigError(f"a backbone ensemble's members must take the same number of channels, got {channels}")
        self.members = tuple(members)
        self.name = "+".join(names)
        multiple = math.lcm(*(m.requirements["input_multiple"] for m in members))
        self.requirements = {**members[0].requirements, "input_multiple": multiple}
        # member i's input = first member's input * scale + shift (per channel)
        first_scale, first_shift = _input_affine(members[0])
        self._renormalise = []
        for member in members:
            scale, shift = _input_affine(member)
            same = np.allclose(scale, first_scale) and np.allclose(shift, first_shift)
            self._renormalise.append(None if same else (scale / first_scale, shift - first_shift * scale / first_scale))
        self.taps = tuple(f"{m.name}/{tap}" for m in members for tap in m.taps)
        self.available_taps = self.taps
        self.channels = {f"{m.name}/{tap}": c for m in members for tap, c in m.channels.items()}
        self.strides = {f"{m.name}/{tap}": s for m in members for tap, s in m.strides.items()}
        self.params = tuple(m.params for m in members)
        self.width_multiplier = 1.0
        self.weights_sha256 = ",".join(str(m.weights_sha256) for m in members)

    def forward(self, params, images: jax.Array) -> dict[str, jax.Array]:
        """Pure and jittable: every member's tapped maps, under '<member>/<tap>'."""
        features = {}
        for member, member_params, renormalise in zip(self.members, params, self._renormalise):
            inputs = images if renormalise is None else images * renormalise[0] + renormalise[1]
            features.update({f"{member.name}/{tap}": value for tap, value in member.forward(member_params, inputs).items()})
        return features

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.forward(self.params, images)


def _input_affine(backbone: Backbone) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel with the network's input = scale * pixel / 255 + shift: the two
    normalisations a backbone can ask for (anomax.preprocess.params._normalize)."""
    defaults = {field.name: field.default for field in dataclasses.fields(PreprocessParams)}
    wanted = {key: backbone.requirements.get(key, defaults[key]) for key in NORMALISATION_KEYS}
    if wanted["normalization_type"] == "constant_values":
        mean, std = np.asarray(wanted["mean"], np.float32), np.asarray(wanted["std"], np.float32)
        return np.broadcast_to(1 / std, (3,)).astype(np.float32), np.broadcast_to(-mean / std, (3,)).astype(np.float32)
    if wanted["normalization_type"] == "none":
        low, high = np.float32(wanted["range_min"]), np.float32(wanted["range_max"])
        return np.full(3, high - low, np.float32), np.full(3, low, np.float32)
    raise ConfigError(f"backbone '{backbone.name}' wants normalization_type '{wanted['normalization_type']}', which "
                      f"depends on each image; a backbone ensemble needs fixed (constant_values or none) normalisations")


MEMBER_KEYS = tuple(inspect.signature(build_backbone).parameters)  # name, taps, pretrained, seed, width_multiplier


def check_concat_members(members: Any) -> list[dict]:
    """The members of ``model.backbone.members``, each a build_backbone mapping; a wrong one raises
    ConfigError naming its key. No weights are read here."""
    if isinstance(members, str) or not isinstance(members, Sequence) or len(members) < 2:
        raise ConfigError(f"model.backbone.members must list at least two backbones, got {members!r}")
    checked = []
    for i, member in enumerate(members):
        if not isinstance(member, Mapping) or "name" not in member:
            raise ConfigError(f"model.backbone.members[{i}] must be a mapping with a 'name', got {member!r}")
        unknown = sorted(set(member) - set(MEMBER_KEYS))
        if unknown:
            raise ConfigError(f"model.backbone.members[{i}]: unknown key(s) {unknown}; known: {list(MEMBER_KEYS)}")
        if member["name"] not in BACKBONES.names():
            raise ConfigError(f"model.backbone.members[{i}].name: unknown backbone '{member['name']}'; known: "
                              f"{', '.join(BACKBONES.names())}")
        checked.append(dict(member))
    return checked


def concat_backbone(members: Any) -> ConcatBackbone:
    """The ConcatBackbone of config mappings (``model.backbone.members``), members checked before any is built."""
    return ConcatBackbone([build_backbone(**member) for member in check_concat_members(members)])


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
