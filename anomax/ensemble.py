"""Ensembles of anomaly models: feature concatenation across backbones, and score ensembles.

- ``ConcatBackbone``: several backbones behind one ``Backbone`` interface; their taps are named
  ``<backbone>/<tap>`` and the feature adaptor resizes and concatenates them like any taps. One
  preprocessed image, normalised as the first member wants, feeds them all: the backbones' input
  normalisations are affine in the pixel value, so each other member gets its own by an affine
  map of the first's (with ``keep_domain`` the pixels outside the domain, 0 for the first member,
  become the other members' image of 0: a constant, the same for every image, not their 0).
  ``model/backbone=concat_*`` configs build one (``concat_backbone``).
- ``ScoreEnsemble``: fitted models scored side by side. The members' maps and scores live on
  different scales, so each member's map is z-normalised with the mean and standard deviation of
  its own map pixels on the validation split's good images (its image scores likewise with their
  own statistics), then the normalised maps and scores are averaged. Only validation good images
  enter the statistics: the test split and every defective image stay unseen. Further map and
  score pairs that every member gives (efficientad's ``anomaly_image_local`` / ``anomaly_score_local``
  and ``_global``) are normalised and averaged the same way, each with its own statistics.
  ``ensemble=...`` configs (``EnsembleConfig``) train one in anomax-train; save_model / load_model store it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.backbones import Backbone, build_backbone
from anomax.data.dataset import DLDataset
from anomax.errors import ConfigError, DatasetError, InputError
from anomax.files import sha256_file
from anomax.inference import checked_thresholds, classified
from anomax.model import fit_summary
from anomax.preprocess.params import PreprocessParams
from anomax.registry import BACKBONES
from anomax.settings import Settings

log = logging.getLogger("anomax")

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
        self.requirements = concat_requirements([m.requirements for m in members])
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


def concat_requirements(requirements: Sequence[Mapping[str, Any]]) -> dict:
    """A feature concatenation's input requirements: its first member's normalisation, and sizes that
    every member can take."""
    return {**requirements[0], "input_multiple": math.lcm(*(r["input_multiple"] for r in requirements))}


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


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(Settings):
    """``ensemble``: a score ensemble trained in one anomax-train run. Each entry of ``members`` is a
    list of overrides, and that member's config is the run's config with them ([]: the run's own
    model); the members share the run's dataset, split, evaluation and batch size. Empty: one model."""

    section: ClassVar[str] = "ensemble"
    members: tuple[tuple[str, ...], ...] = ()

    def check(self) -> None:
        if len(self.members) == 1:
            self.fail("members", "empty (one model) or two or more lists of overrides")


STAT_KEYS = ("map_mean", "map_std", "score_mean", "score_std")
BRANCH_MAP = "anomaly_image_"  # a further output: anomaly_image_<branch> with anomaly_score_<branch>


def branches_of(outputs: Mapping[str, Any]) -> tuple[str, ...]:
    """The further map and score pairs of one result batch or dict: ('global', 'local') for efficientad."""
    return tuple(sorted(key[len(BRANCH_MAP):] for key in outputs
                        if key.startswith(BRANCH_MAP) and f"anomaly_score_{key[len(BRANCH_MAP):]}" in outputs))


def good_images(dataset: DLDataset, split: str = "validation") -> DLDataset:
    """``split``'s good images, what a score ensemble normalises on; none is an error."""
    good = DLDataset([s for s in dataset.samples if s.split == split and s.anomaly_label == "ok"], dataset.format)
    if not good.samples:
        raise DatasetError(f"a score ensemble (ensemble.members) normalises its members on the '{split}' split's "
                           f"good images, and the dataset has none; give it a validation split with good images "
                           f"(e.g. dataset.validation_from_train, split.validation_percent) or set ensemble=off")
    return good


def _region(preprocess) -> tuple:
    """What a member's maps cover: its domain handling and box, or its mask file's content (a saved
    ensemble keeps one copy of the mask per member)."""
    domain = preprocess.domain
    if isinstance(domain, str):
        with contextlib.suppress(OSError):  # a missing mask is named where it is read
            domain = f"mask {sha256_file(domain)}"
    return preprocess.domain_handling, domain


class ScoreEnsemble:
    """Fitted AnomalyModels whose z-normalised maps and scores are averaged. Call ``normalise``
    (validation good images) before scoring, or pass saved ``stats``; maps are resized to the first
    member's input size. Like an AnomalyModel it has ``score_split``, ``apply`` (HALCON's result
    dicts, classified with its own ``thresholds``) and ``get_params`` / ``set_params``."""

    def __init__(self, members: Sequence[Any], stats: Sequence[Mapping[str, float]] | None = None):
        if not members:
            raise ConfigError("a score ensemble needs at least one member model")
        if any(member.tiling.enabled for member in members):  # tiled maps come at each image's own size
            raise ConfigError("a score ensemble's members score whole images: tiling is not available in an "
                              "ensemble; use tiling=off")
        regions = [_region(member.preprocess) for member in members]
        for number, region in enumerate(regions):
            if region != regions[0]:  # a cropped member's map covers its box only: the maps would not line up
                raise ConfigError(f"ensemble member {number}'s preprocess.domain_handling / domain {region} differ "
                                  f"from member 0's {regions[0]}: the members' maps must cover the same region of "
                                  f"the image; give every member the same domain settings")
        self.members = tuple(members)
        self.stats: list[dict[str, float]] | None = None if stats is None else _checked_stats(stats, len(members))
        self.thresholds: dict[str, float] = {}

    @property
    def description(self) -> str:
        """'score ensemble of patchcore + efficientnet_lite2 and patchcore + mobilenet_v2'."""
        return "score ensemble of " + " and ".join(member.description for member in self.members)

    @property
    def map_size(self) -> tuple[int, int]:
        first = self.members[0].preprocess
        return first.height, first.width

    # what the pipeline reads of a model: the ensemble's maps are at the first member's input size
    preprocess = property(lambda self: self.members[0].preprocess)
    tiling = property(lambda self: self.members[0].tiling)
    batch_size = property(lambda self: self.members[0].batch_size)

    def get_params(self) -> dict[str, Any]:
        return {**self.members[0].get_params(), "thresholds": dict(self.thresholds)}

    def set_params(self, *, batch_size: int | None = None, thresholds: Mapping[str, float] | None = None,
                   device: Any = None) -> None:
        """As AnomalyModel.set_params: batch size and device apply to every member (they score the
        same batches), thresholds classify the ensemble's own maps and scores."""
        checked = None if thresholds is None else checked_thresholds(thresholds)
        for member in self.members:
            member.set_params(batch_size=batch_size, device=device)
        if checked is not None:
            self.thresholds = checked

    def fit(self, dataset: DLDataset, split: str = "train", *, train: Any = None,
            normalise_split: str = "validation", cache_dir: str | None = None, progress: bool = True) -> dict:
        """Fit each member on ``split``, then ``normalise`` on ``normalise_split``'s good images; like
        AnomalyModel.fit for one model. ``train``: one TrainConfig for every member, or one per member
        (members may set their own train section). A split without good images to normalise on fails
        before any member is fitted."""
        good_images(dataset, normalise_split)
        trains = list(train) if isinstance(train, (list, tuple)) else [train] * len(self.members)
        if len(trains) != len(self.members):
            raise ConfigError(f"a score ensemble of {len(self.members)} members got {len(trains)} train settings")
        fitted = []
        for number, (member, member_train) in enumerate(zip(self.members, trains)):
            fitted.append(member.fit(dataset, split, train=member_train, cache_dir=cache_dir, progress=progress))
            log.info("fit member %d (%s): %s", number, member.description, fit_summary(fitted[-1]))
        return {"members": fitted, "normalisation": self.normalise(dataset, normalise_split, cache_dir=cache_dir)}

    def normalise(self, dataset: DLDataset, split: str = "validation", cache_dir: str | None = None) -> list[dict]:
        """Each member's mean and std of its map pixels and of its image scores over ``split``'s good
        images only (the defective ones are dropped before anything is scored); for its further
        outputs (``branches_of``) the same, under the entry's 'branches'."""
        good = good_images(dataset, split)
        stats = []
        for number, member in enumerate(self.members):
            moments: dict[str, tuple[_Moments, list]] = {}  # output suffix ('', '_local', ...) -> pixels, scores
            for batch in member.score_split(good, split, cache_dir=cache_dir, progress=False):
                valid = np.asarray(batch["valid"], bool)
                for suffix in ("", *(f"_{branch}" for branch in branches_of(batch))):
                    pixels, scores = moments.setdefault(suffix, (_Moments(), []))
                    # at the size the ensemble averages maps at (_combined resizes before normalising)
                    pixels.add(_resized(batch[f"anomaly_image{suffix}"], self.map_size)[valid])
                    scores.append(np.asarray(batch[f"anomaly_score{suffix}"], np.float64)[valid])
            entries = {suffix: _stat_entry(pixels, np.concatenate(scores)) for suffix, (pixels, scores) in moments.items()}
            for suffix, entry in entries.items():
                try:
                    _checked_entry(entry)  # what a loaded artifact's statistics must pass too
                except ConfigError as error:
                    raise InputError(f"ensemble member {number} ({member.description}) gives non-finite "
                                     f"anomaly_image{suffix} or anomaly_score{suffix} values on the '{split}' split's "
                                     f"good images ({error}); check that member's inputs and weights") from None
            entry = entries.pop("")
            stats.append({**entry, "branches": {suffix[1:]: value for suffix, value in entries.items()}}
                         if entries else entry)
        self.stats = stats  # only once every member's statistics are whole
        return self.stats

    @property
    def branches(self) -> tuple[str, ...]:
        """The further outputs every member gives (normalised by ``normalise``), averaged like the main ones."""
        self._check_normalised()
        shared = set.intersection(*(set(stats.get("branches", {})) for stats in self.stats))
        return tuple(sorted(shared))

    def score_split(self, dataset: DLDataset, split: str, *, cache_dir: str | None = None,
                    progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Like AnomalyModel.score_split: batches of the members' mean normalised 'anomaly_image' and
        'anomaly_score', with the first member's 'mask', 'label', 'index', 'valid'."""
        self._check_normalised()
        streams = [m.score_split(dataset, split, cache_dir=cache_dir, progress=progress) for m in self.members]
        for batches in zip(*streams):
            indices = [np.asarray(b["index"]) for b in batches]
            if any(not np.array_equal(i, indices[0]) for i in indices[1:]):
                raise InputError("the ensemble's members batch the split differently; give them one batch_size")
            first = batches[0]
            yield {key: first[key] for key in ("mask", "label", "index", "valid") if key in first} | self._combined(
                batches)

    def apply(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Raw images -> one result dict per image as AnomalyModel.apply gives them: the ensemble's
        'anomaly_image' and 'anomaly_score', and with thresholds 'anomaly_class', 'anomaly_class_id',
        'anomaly_region'."""
        self._check_normalised()
        if not len(images):
            return []
        keys = [f"anomaly_{kind}{suffix}" for suffix in ("", *(f"_{b}" for b in self.branches))
                for kind in ("image", "score")]
        outputs = [member.apply(images) for member in self.members]
        combined = self._combined([{key: np.stack([r[key] for r in out]) for key in keys} for out in outputs])
        results = [{key: combined[key][i] if key.startswith("anomaly_image") else float(combined[key][i])
                    for key in keys} for i in range(len(images))]
        return classified(results, self.thresholds)

    def _combined(self, outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The mean of the members' normalised maps (resized to map_size) and scores, for the main
        output and each shared branch: one formula for score_split and apply."""
        combined = {}
        for branch in ("", *self.branches):
            suffix = f"_{branch}" if branch else ""
            stats = [s["branches"][branch] if branch else s for s in self.stats]
            maps = [(_resized(out[f"anomaly_image{suffix}"], self.map_size) - s["map_mean"]) / s["map_std"]
                    for out, s in zip(outputs, stats)]
            scores = [(np.asarray(out[f"anomaly_score{suffix}"]) - s["score_mean"]) / s["score_std"]
                      for out, s in zip(outputs, stats)]
            combined[f"anomaly_image{suffix}"] = np.mean(maps, axis=0).astype(np.float32)
            combined[f"anomaly_score{suffix}"] = np.mean(scores, axis=0).astype(np.float32)
        return combined

    def _check_normalised(self) -> None:
        if self.stats is None:
            raise InputError("a ScoreEnsemble scores after normalise(): call normalise(dataset) first")


def _stat_entry(pixels: _Moments, scores: np.ndarray) -> dict[str, float]:
    # a constant map (std 0) is only shifted: it carries no evidence either way
    return {"map_mean": pixels.mean, "map_std": pixels.std or 1.0,
            "score_mean": float(scores.mean()), "score_std": float(scores.std()) or 1.0}


def _checked_stats(stats: Any, count: int) -> list[dict[str, Any]]:
    """One {map_mean, map_std, score_mean, score_std} per member: finite numbers, standard deviations > 0;
    optionally 'branches': {name: the same four} for the member's further outputs."""
    if not isinstance(stats, Sequence) or len(stats) != count:
        raise ConfigError(f"a score ensemble's stats need one entry per member ({count}), got {stats!r}")
    checked = []
    for entry in stats:
        if not isinstance(entry, Mapping):
            _checked_entry(entry)  # raises, naming what an entry holds
        branches = entry.get("branches", {})
        if not isinstance(branches, Mapping) or not all(isinstance(name, str) for name in branches):
            raise ConfigError(f"a score ensemble's stats 'branches' must map output names to statistics, got {entry!r}")
        main = {key: value for key, value in entry.items() if key != "branches"}
        checked.append({**_checked_entry(main), **({"branches": {name: _checked_entry(value)
                                                                 for name, value in branches.items()}}
                                                   if branches else {})})
    return checked


def _checked_entry(entry: Any) -> dict[str, float]:
    if not isinstance(entry, Mapping) or sorted(entry) != sorted(STAT_KEYS):
        raise ConfigError(f"a score ensemble's stats entry must have exactly the keys {list(STAT_KEYS)} "
                          f"(and 'branches'), got {entry!r}")
    for key, value in entry.items():
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not (number and math.isfinite(value)) or (key.endswith("_std") and value <= 0):
            raise ConfigError(f"a score ensemble's stats '{key}' must be a finite number"
                              f"{' > 0' if key.endswith('_std') else ''}, got {value!r}")
    return {key: float(entry[key]) for key in STAT_KEYS}


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
