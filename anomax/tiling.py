"""Tiling: score images far larger than a backbone's input tile by tile, and stitch one map back.

An image goes through the preprocess domain step (the HALCON ROI crop), its channels and its
normalisation at its own resolution (optionally scaled by ``resize_before`` first) instead of
being resized to ``preprocess.width x height``; it is then cut into ``tile_size`` squares every
``stride`` pixels (the last row and column of tiles sit flush with the far edge, so every pixel
is covered). Each tile runs through backbone -> adaptor -> head like a small image. The tile maps
are blended back into one map at the ROI-cropped input resolution: every tile's map is weighted
by a separable window that is 1 inside and falls as a raised cosine across the overlap band, and
the weights are normalised to sum to one at every pixel, so no seam appears where tiles meet.
The image's ``anomaly_score`` is the maximum of that stitched, smoothed map.

``mode='shared'`` fits one head on the tiles of every position; ``mode='per_position'`` fits one
head per tile-grid cell (fixed-pose parts: each cell learns its own part of the object) on a
shared backbone, and refuses images whose tile grid differs from the training images'.

Memory stays bounded: tiles stream through the model ``batch_size`` at a time, so only one
batch's features exist at once, whatever the image size; images are read one at a time.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from anomax.data.dataset import DLDataset, Sample
from anomax.data.images import image_shape, read_mask, read_pair
from anomax.errors import ArtifactError, DatasetError, InputError
from anomax.heads._base import FeatureBatches, Head
from anomax.inference import padded
from anomax.preprocess.params import PreprocessParams, domain_box, preprocess_image, preprocess_mask
from anomax.preprocess.cache import grain  # imported there without touching the root logger
from anomax.settings import Settings, setting

log = logging.getLogger("anomax")
GRID_KEYS = ("tiling/rows", "tiling/cols", "tiling/size")  # per_position state: the training grid


@dataclasses.dataclass(frozen=True)
class TilingConfig(Settings):
    """tile_size: side of the square tiles in pixels (null: tiling off). stride: pixels between
    tile starts (null: tile_size, tiles touch; smaller: they overlap by tile_size - stride).
    mode: 'shared' (one head for all tiles) or 'per_position' (one head per grid cell).
    resize_before: scale applied to the ROI-cropped image before tiling (null: 1, native)."""

    section: ClassVar[str] = "tiling"
    tile_size: int | None = setting(None, ge=8)
    stride: int | None = setting(None, ge=1)
    mode: Literal["shared", "per_position"] = "shared"
    resize_before: float | None = setting(None, gt=0)

    def check(self) -> None:
        if self.tile_size is None:  # tiling off: a tiling setting given anyway would be ignored
            for key, unset in (("stride", None), ("resize_before", None), ("mode", "shared")):
                if getattr(self, key) != unset:
                    self.fail(key, f"{'null' if unset is None else repr(unset)} while tiling.tile_size is null "
                                   f"(tiling off): set tiling.tile_size, or choose tiling=default")
        if self.tile_size is not None and self.stride is not None and self.stride > self.tile_size:
            self.fail("stride", f"at most tile_size = {self.tile_size} (a gap between tiles would leave "
                                f"pixels unscored)")

    @property
    def enabled(self) -> bool:
        return self.tile_size is not None

    def for_backbone(self, backbone) -> "TilingConfig":
        """These settings, checked against what the backbone's input size must be a multiple of."""
        multiple = backbone.requirements.get("input_multiple", 1)
        if self.enabled and self.tile_size % multiple:
            self.fail("tile_size", f"a multiple of {multiple} for backbone '{backbone.name}'")
        return self

    @property
    def step(self) -> int:
        return self.stride or self.tile_size


# ---- geometry: the grid, the blending window, cutting and stitching -----------------------------
def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets along one axis: every ``stride`` pixels, plus one flush with the end."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return tuple(starts)


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """1-D weights (tile,): 1 inside, a raised cosine over the ``overlap`` pixels at each end,
    never 0 (a border pixel that only one tile covers keeps its value after normalisation)."""
    window = np.ones(tile, np.float64)
    ramp_length = min(overlap, tile // 2)
    if ramp_length > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(ramp_length) + 0.5) / ramp_length) ** 2
        window[:ramp_length] = ramp
        window[tile - ramp_length:] = ramp[::-1]
    return window


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles of an image of ``height x width`` (after ROI crop and resize_before)."""

    height: int
    width: int
    tile: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    overlap: int

    @classmethod
    def of(cls, height: int, width: int, tiling: TilingConfig, where: str = "the image") -> "TileGrid":
        tile = tiling.tile_size
        if height < tile or width < tile:
            raise InputError(f"{where} is {width}x{height} (width x height) after the ROI crop and resize_before, "
                             f"smaller than tiling.tile_size = {tile}; lower tile_size or raise resize_before")
        return cls(height, width, tile, tile_starts(height, tile, tiling.step), tile_starts(width, tile, tiling.step),
                   tile - tiling.step)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def positions(self) -> np.ndarray:
        """(n, 2) int32 (row, col) starts, row-major: tile k is grid cell (k // cols, k % cols)."""
        rows, cols = np.meshgrid(self.rows, self.cols, indexing="ij")
        return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int32)

    def cut(self, image: np.ndarray, cells: Sequence[int]) -> np.ndarray:
        """The tiles ``cells`` of ``image`` (H, W, ...) -> (len(cells), tile, tile, ...)."""
        t = self.tile
        return np.stack([image[r:r + t, c:c + t] for r, c in self.positions[np.asarray(cells, int)]])

    def window(self) -> np.ndarray:
        """(tile, tile) float32 blending window of every tile."""
        line = blend_window(self.tile, self.overlap)
        return np.outer(line, line).astype(np.float32)

    def coverage(self) -> np.ndarray:
        """(height, width) sum of every tile's blending window: what the weights are normalised by."""
        window = self.window()
        return place_add(np.broadcast_to(window, (len(self), *window.shape)), self.positions, (self.height, self.width))

    def weights(self) -> np.ndarray:
        """(n, tile, tile) per-tile weights, normalised: placed back, they sum to one at every pixel."""
        window, total, t = self.window(), self.coverage(), self.tile
        return np.stack([window / total[r:r + t, c:c + t] for r, c in self.positions])

    def stitch(self, tile_maps: np.ndarray) -> np.ndarray:
        """(n, tile, tile) maps of every tile -> (height, width), blended with normalised weights."""
        weighted = place_add(np.asarray(tile_maps, np.float32) * self.window(), self.positions,
                             (self.height, self.width))
        return weighted / self.coverage()


def place_add(tiles: np.ndarray, positions: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Sum of ``tiles`` (n, t, t) placed at ``positions`` (n, 2) on a zero canvas ``out_hw``. On the host,
    where the tile maps are: a compiled loop recompiled for every image size (about 0.6 s each)."""
    canvas = np.zeros(out_hw, np.float32)
    size = np.shape(tiles)[1:3]
    for tile, (row, col) in zip(np.asarray(tiles, np.float32), positions):
        canvas[row:row + size[0], col:col + size[1]] += tile
    return canvas


# ---- the ROI-native resolution ----------------------------------------------------------------
def roi_shape(preprocess: PreprocessParams, shape: tuple[int, int], where: str | None = None) -> tuple[int, int]:
    """(rows, cols) of an image of ``shape`` after the preprocess domain step (crop_domain crops);
    ``where``: the image file, named in the error when the domain does not fit it."""
    if preprocess.domain_handling != "crop_domain":
        return int(shape[0]), int(shape[1])
    try:
        row1, col1, row2, col2 = domain_box(preprocess, tuple(shape))
    except InputError as error:
        if where is None:
            raise
        raise InputError(f"{where}: {error}") from None
    return int(row2 - row1 + 1), int(col2 - col1 + 1)


def scaled_shape(roi: tuple[int, int], tiling: TilingConfig) -> tuple[int, int]:
    scale = tiling.resize_before or 1.0
    return max(1, round(roi[0] * scale)), max(1, round(roi[1] * scale))


def native_mask(preprocess: PreprocessParams, sample: Sample) -> np.ndarray:
    """The sample's ground truth at its original resolution after the domain step: uint8 {0, 1}
    (rows, cols) of the ROI (all zeros without a mask file)."""
    if sample.anomaly_file_name is None:
        mask = np.zeros(image_shape(sample.image_file_name), bool)
    else:
        mask = read_mask(sample.anomaly_file_name)
    rows, cols = roi_shape(preprocess, mask.shape, sample.anomaly_file_name or sample.image_file_name)
    return preprocess_mask(preprocess.replace(height=rows, width=cols), mask)


# ---- images in, tile batches out ----------------------------------------------------------------
def _prepared(preprocess: PreprocessParams, tiling: TilingConfig, image: np.ndarray,
              mask: np.ndarray | None = None) -> dict[str, Any]:
    """An image preprocessed at its tiled resolution (no resize beyond resize_before), its grid, and
    its mask at the ROI-cropped resolution."""
    roi = roi_shape(preprocess, image.shape[:2])
    rows, cols = scaled_shape(roi, tiling)
    record = {"image": preprocess_image(preprocess.replace(height=rows, width=cols), image),
              "grid": TileGrid.of(rows, cols, tiling), "roi": roi}
    if mask is not None:
        record["mask"] = preprocess_mask(preprocess.replace(height=roi[0], width=roi[1]), mask)
    return record


def _dataset_records(dataset: DLDataset, split: str, preprocess: PreprocessParams,
                     tiling: TilingConfig) -> Iterator[dict[str, Any]]:
    """The split's images one at a time (two read ahead on two threads: images are large)."""
    samples = dataset.samples_of(split)

    def load(index: int, sample: Sample) -> dict[str, Any]:
        image, mask = read_pair(sample.image_file_name, sample.anomaly_file_name)
        try:
            record = _prepared(preprocess, tiling, image, mask)
        except InputError as error:
            raise InputError(f"{sample.image_file_name}: {error}") from None
        return {**record, "index": index, "label": int(sample.anomaly_label == "nok")}

    records = grain.MapDataset.source(samples).map_with_index(load)
    return iter(records.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def _tile_batches(records: Iterable[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Fixed-size batches of tiles across images, in order: {'image' (B, t, t, C), 'cell' (B,),
    'owner' (B,) position of the tile's image in ``records``, 'valid' (B,), 'records' {owner: record}
    of the images the batch holds tiles of}. The last batch is padded by repeating its last tile,
    marked invalid."""
    pieces: list[tuple[np.ndarray, np.ndarray, int]] = []
    held: dict[int, dict[str, Any]] = {}
    count = 0

    def batch() -> dict[str, Any]:
        tiles = np.concatenate([p[0] for p in pieces])
        cell_ids = np.concatenate([p[1] for p in pieces]).astype(np.int32)
        owners = np.concatenate([np.full(len(p[1]), p[2], np.int64) for p in pieces])
        return {"image": padded(tiles, batch_size), "cell": padded(cell_ids, batch_size),
                "owner": padded(owners, batch_size), "valid": np.arange(batch_size) < len(tiles),
                "records": dict(held)}

    for owner, record in enumerate(records):
        chosen = np.arange(len(record["grid"]))
        held[owner] = record
        start = 0
        while start < len(chosen):
            take = chosen[start:start + batch_size - count]
            pieces.append((record["grid"].cut(record["image"], take), take, owner))
            count, start = count + len(take), start + len(take)
            if count == batch_size:
                yield batch()
                pieces, count = [], 0
                held = {owner: record} if start < len(chosen) else {}
    if count:
        yield batch()


# ---- per_position: one head per grid cell ---------------------------------------------------------
class PerPositionHeads:
    """One fitted head per tile-grid cell. Their states are stacked along a leading cell axis (what
    the artifact stores, with the training grid under GRID_KEYS); ``scorer``, cell 0's head, scores
    any cell given that cell's slice of the stacked state (all cells share settings and shapes)."""

    def __init__(self, scorer: Head, stacked: Mapping[str, np.ndarray], grid: TileGrid):
        self.scorer, self.stacked, self.grid = scorer, dict(stacked), grid
        self.name = scorer.name
        self.uses_backbone, self.wants_validation = scorer.uses_backbone, scorer.wants_validation
        self.config = scorer.config

    @property
    def hyperparams(self) -> dict[str, Any]:
        return self.scorer.hyperparams

    @property
    def state(self) -> dict[str, np.ndarray]:
        grid = self.grid
        return {**self.stacked, GRID_KEYS[0]: np.asarray(grid.rows, np.int32),
                GRID_KEYS[1]: np.asarray(grid.cols, np.int32), GRID_KEYS[2]: np.asarray([grid.height, grid.width],
                                                                                        np.int32)}

    @classmethod
    def of(cls, heads: Sequence[Head], grid: TileGrid) -> "PerPositionHeads":
        states = [head.state for head in heads]
        for cell, state in enumerate(states[1:], 1):
            if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
                shapes = {k: v.shape for k, v in state.items()}
                raise InputError(f"tiling.mode=per_position: the head of grid cell {cell} has state {shapes}, unlike "
                                 f"cell 0's {({k: v.shape for k, v in states[0].items()})}; the per-cell heads must "
                                 f"have equal shapes (set model.head.coreset_size rather than a ratio)")
        return cls(heads[0], {key: np.stack([s[key] for s in states]) for key in states[0]}, grid)

    @classmethod
    def from_state(cls, head_cls: type[Head], hyperparams: Mapping[str, Any], state: Mapping[str, np.ndarray],
                   tiling: TilingConfig) -> "PerPositionHeads":
        missing = [key for key in GRID_KEYS if key not in state]
        if missing:
            raise ArtifactError(f"the per-position head state lacks the training tile grid {missing}; refit the model")
        rows, cols = (tuple(int(v) for v in np.asarray(state[key]).ravel()) for key in GRID_KEYS[:2])
        height, width = (int(v) for v in np.asarray(state[GRID_KEYS[2]]).ravel())
        grid = TileGrid.of(height, width, tiling)
        if (grid.rows, grid.cols) != (rows, cols):
            raise ArtifactError(f"the stored tile grid (rows {rows}, cols {cols}) does not follow from tiling "
                                f"{tiling.to_dict()} on {width}x{height} images; the artifact was modified")
        cells = {key: np.asarray(value) for key, value in state.items() if key not in GRID_KEYS}
        if any(value.ndim == 0 or len(value) != len(grid) for value in cells.values()):
            raise ArtifactError(f"the per-position head state must hold {len(grid)} cells along its first axis")
        heads = [head_cls.from_state(hyperparams, {key: value[cell] for key, value in cells.items()})
                 for cell in range(len(grid))]  # each cell checked by its head class
        return cls.of(heads, grid)

    def check_grid(self, grid: TileGrid, where: str) -> None:
        check_same_grid(grid, self.grid, where)


def check_same_grid(grid: TileGrid, trained: TileGrid, where: str) -> None:
    """Per position, an image must have the training images' tile grid."""
    if (grid.rows, grid.cols) != (trained.rows, trained.cols):
        raise InputError(
            f"{where}: tiling.mode=per_position keeps one head per tile-grid cell, but this image's grid is "
            f"{grid.shape[0]}x{grid.shape[1]} tiles (a {grid.width}x{grid.height} image, tiles at rows "
            f"{list(grid.rows)}, cols {list(grid.cols)}) while the model was trained on a "
            f"{trained.shape[0]}x{trained.shape[1]} grid ({trained.width}x{trained.height}, rows "
            f"{list(trained.rows)}, cols {list(trained.cols)}); give images of the training size (after "
            f"the ROI crop and resize_before) or train with tiling.mode=shared")


def load_head(head_cls: type[Head], hyperparams: Mapping[str, Any], state: Mapping[str, np.ndarray],
              tiling: TilingConfig) -> Head | PerPositionHeads:
    """The saved head of a model with these tiling settings (what ``load_model`` calls)."""
    if tiling.enabled and tiling.mode == "per_position":
        return PerPositionHeads.from_state(head_cls, hyperparams, state, tiling)
    return head_cls.from_state(hyperparams, state)


# ---- the model, tiled: fit, score a split, apply ----------------------------------------------------
def _fresh(head) -> Head:
    """An unfitted head with the same settings."""
    inner = head.scorer if isinstance(head, PerPositionHeads) else head
    return type(inner)(inner.config)


def _grids(model, dataset: DLDataset, split: str) -> list[TileGrid]:
    """Every image's grid, from the file headers (nothing decoded)."""
    grids = []
    for sample in dataset.samples_of(split):
        roi = roi_shape(model.preprocess, image_shape(sample.image_file_name), sample.image_file_name)
        grids.append(TileGrid.of(*scaled_shape(roi, model.tiling), model.tiling, where=sample.image_file_name))
    return grids


def check_tileable(model, dataset: DLDataset, train_split: str = "train") -> None:
    """Every split's images against the tiling, from their headers: an image smaller than a tile, or
    (per_position) one whose grid differs from the training images', is named before the fit, which
    would otherwise be lost when that image is scored."""
    if not model.tiling.enabled:
        return
    train = _grids(model, dataset, train_split)
    for split in sorted({sample.split for sample in dataset.samples} - {train_split}):
        grids = _grids(model, dataset, split)
        if model.tiling.mode == "per_position" and train:
            for sample, grid in zip(dataset.samples_of(split), grids):
                check_same_grid(grid, train[0], sample.image_file_name)


def _with_features(model, make_batches: Callable[[], Iterable[dict[str, Any]]], count: int) -> FeatureBatches:
    """Re-iterable {'image', 'features', 'valid'} of tile batches {'image', 'valid'}: what a head's fit
    reads, ``count`` tiles in all (a tile counts as an image)."""
    params = model._placed({"backbone": model.backbone.params, "adaptor": model.adaptor_params})

    def batches() -> Iterator[dict[str, Any]]:
        for batch in make_batches():
            tiles = model._placed(batch["image"], split_batch=True)
            yield {"image": batch["image"], "valid": batch["valid"],
                   "features": model._features(params["backbone"], params["adaptor"], tiles)}

    return FeatureBatches(batches, count, model.batch_size)


def tile_feature_batches(model, dataset: DLDataset, split: str) -> FeatureBatches:
    """The split's tiles with their features, ``model.batch_size`` tiles at a time, images read one by one."""
    count = sum(len(grid) for grid in _grids(model, dataset, split))
    return _with_features(model, lambda: _tile_batches(_dataset_records(dataset, split, model.preprocess,
                                                                        model.tiling), model.batch_size), count)


def _cell_major_tiles(model, dataset: DLDataset, split: str, grid: TileGrid, folder: str) -> np.ndarray:
    """Every image of the split read once and its tiles written, cell by cell, to a file in ``folder``:
    (cells, images, t, t, C) float32, memory-mapped, so each cell's head then reads its own tiles
    (contiguous) instead of every image being decoded again per cell."""
    samples = dataset.samples_of(split)
    channels = model.preprocess.num_channels
    tiles = np.lib.format.open_memmap(f"{folder}/{split}.npy", mode="w+", dtype=np.float32,
                                      shape=(len(grid), len(samples), grid.tile, grid.tile, channels))
    trained = PerPositionHeads(_fresh(model.head), {}, grid)
    for record in _dataset_records(dataset, split, model.preprocess, model.tiling):
        trained.check_grid(record["grid"], samples[record["index"]].image_file_name)
        tiles[:, record["index"]] = grid.cut(record["image"], range(len(grid)))
    tiles.flush()
    return tiles


def _cell_feature_batches(model, tiles: np.ndarray, cell: int) -> FeatureBatches:
    """One grid cell's tiles of every image (``tiles`` from _cell_major_tiles) with their features."""
    block, size = tiles[cell], model.batch_size

    def batches() -> Iterator[dict[str, Any]]:
        for start in range(0, len(block), size):
            chunk = np.asarray(block[start:start + size])
            yield {"image": padded(chunk, size), "valid": np.arange(size) < len(chunk)}

    return _with_features(model, batches, len(block))


def fit_tiled(model, dataset: DLDataset, split: str = "train", *, train=None,
              validation_split: str | None = "validation", progress: bool = True) -> dict[str, Any]:
    """``AnomalyModel.fit`` with tiling: the head(s) learn from tiles; sets ``model.head``."""
    tiling, proto = model.tiling, _fresh(model.head)
    validation = None
    if proto.wants_validation and any(s.split == validation_split and s.anomaly_label == "ok"
                                      for s in dataset.samples):
        good_only = [s for s in dataset.samples if s.split != validation_split or s.anomaly_label == "ok"]
        validation = (dataclasses.replace(dataset, samples=good_only), validation_split)
    grids = _grids(model, dataset, split)
    if not grids:
        raise DatasetError(f"the '{split}' split holds no images to fit on")
    if tiling.mode == "shared":
        head = proto
        info = head.fit(tile_feature_batches(model, dataset, split), train=train, progress=progress,
                        validation=validation and tile_feature_batches(model, *validation), **head.fit_inputs(model))
        model.head = head
        return {**info, "tiling": {"mode": "shared", "num_tiles": sum(len(g) for g in grids)}}
    grid = grids[0]
    for sample, other in zip(dataset.samples_of(split), grids):
        check_same_grid(other, grid, sample.image_file_name)
    infos, fitted = [], []
    # read once for all cells (e.g. efficientad's generic images, each put through the backbone)
    inputs = {key: list(value) if isinstance(value, Iterator) else value for key, value in proto.fit_inputs(model).items()}
    with tempfile.TemporaryDirectory(prefix="anomax-tiles-") as folder:  # the tiles, on disk, not in memory
        tiles = _cell_major_tiles(model, dataset, split, grid, folder)
        held_out = validation and _cell_major_tiles(model, *validation, grid, folder)
        for cell in tqdm(range(len(grid)), desc="fit per-position heads", unit="cell", disable=not progress):
            head = _fresh(proto)
            infos.append(head.fit(_cell_feature_batches(model, tiles, cell), train=train, progress=False,
                                  validation=None if held_out is None else _cell_feature_batches(model, held_out, cell),
                                  **inputs))
            fitted.append(head)
        del tiles, held_out  # the memory maps close before their folder goes
    model.head = PerPositionHeads.of(fitted, grid)
    return {"tiling": {"mode": "per_position", "grid": list(grid.shape), "image_size": [grid.height, grid.width]},
            "num_images": len(grids), "cells": infos}


def _tile_infer(model) -> Callable:
    """The jitted tile scorer (params, tiles, cells) -> head outputs per tile, cached on the model."""
    head, mesh = model.head, model.mesh
    cached = getattr(model, "_tile_infer", None)
    if cached is not None and cached[0] is head and cached[1] is mesh:
        return cached[2]
    if isinstance(head, PerPositionHeads):
        scorer, keys = head.scorer, tuple(head.stacked)

        def infer(params, tiles, cells):
            features = (model.features(params["backbone"], params["adaptor"], tiles) if scorer.uses_backbone
                        else None)
            state = {key: params["head"][key][cells] for key in keys}

            def one(cell_state, tile, feature):
                return scorer.score(cell_state, tile[None], None if feature is None else feature[None])

            return {key: value[:, 0] for key, value in jax.vmap(one)(state, tiles, features).items()}
    else:
        def infer(params, tiles, cells):
            return model.infer(params, tiles, mesh=mesh)
    compiled = jax.jit(infer)
    model._tile_infer = (head, mesh, compiled)
    return compiled


def _stitched(model, records: Iterable[dict[str, Any]], where: Callable[[dict], str]) -> Iterator[tuple[dict, dict]]:
    """(record, result) per image: tiles scored batch by batch, each image's maps stitched as soon as
    its last tile is scored, then brought back to the ROI-cropped resolution."""
    per_position = isinstance(model.head, PerPositionHeads)

    def checked(records):
        for record in records:
            if per_position:
                model.head.check_grid(record["grid"], where(record))
            yield record

    params = model._placed_params()  # placed once while the model keeps its arrays
    infer = _tile_infer(model)
    pending: dict[int, dict[str, Any]] = {}
    for batch in _tile_batches(checked(records), model.batch_size):
        out = jax.device_get(infer(params, model._placed(batch["image"], split_batch=True),
                                   model._placed(batch["cell"], split_batch=True)))
        for owner, record in batch["records"].items():
            pending.setdefault(owner, {"record": record, "maps": {}, "left": len(record["grid"])})
        valid = batch["valid"]
        for owner in np.unique(batch["owner"][valid]):
            rows = valid & (batch["owner"] == owner)
            entry = pending[owner]
            grid = entry["record"]["grid"]
            for key, value in out.items():
                if key.startswith("anomaly_image"):
                    maps = entry["maps"].setdefault(key, np.zeros((len(grid), grid.tile, grid.tile), np.float32))
                    maps[batch["cell"][rows]] = value[rows]
            entry["left"] -= int(rows.sum())
            if entry["left"] == 0:
                done = pending.pop(owner)
                yield done["record"], _finished(done["record"], done["maps"])


def _finished(record: dict[str, Any], maps: Mapping[str, np.ndarray]) -> dict[str, Any]:
    grid, roi = record["grid"], record["roi"]
    result = {}
    for key, tile_maps in maps.items():
        stitched = grid.stitch(tile_maps)
        if stitched.shape != tuple(roi):  # resize_before: back to the ROI-cropped resolution
            stitched = jax.image.resize(stitched, roi, "bilinear")
        result[key] = np.asarray(stitched)
    for key in maps:  # each map's score is its maximum, as untiled (efficientad: the local and global ones too)
        result[key.replace("anomaly_image", "anomaly_score")] = float(result[key].max())
    return result


def score_split_tiled(model, dataset: DLDataset, split: str, progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """``AnomalyModel.score_split`` with tiling: one image per batch, maps and masks at the
    ROI-cropped resolution: {'anomaly_image' (1, H, W), 'anomaly_score', 'mask', 'label', 'index',
    'valid', and any further maps}."""
    samples = dataset.samples_of(split)
    records = _dataset_records(dataset, split, model.preprocess, model.tiling)
    records = tqdm(records, total=len(samples), desc=f"score {split}", unit="image", disable=not progress)
    for record, result in _stitched(model, records, lambda r: samples[r["index"]].image_file_name):
        yield {**{key: value[None] if key.startswith("anomaly_image") else np.asarray([value], np.float32)
                  for key, value in result.items()},
               "mask": record["mask"][None], "label": np.asarray([record["label"]], np.int32),
               "index": np.asarray([record["index"]], np.int32), "valid": np.asarray([True])}


def apply_tiled(model, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """``AnomalyModel.apply`` with tiling: one result per raw image, maps at its ROI-cropped size."""
    def records():
        for index, image in enumerate(images):
            try:
                record = _prepared(model.preprocess, model.tiling, np.asarray(image))
            except InputError as error:
                raise InputError(f"image {index}: {error}") from None
            yield {**record, "index": index}

    return [result for _, result in _stitched(model, records(), lambda r: f"image {r['index']}")]
