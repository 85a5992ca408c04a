"""PatchCore: a memory bank of training patch features, thinned by a greedy k-center
coreset; a patch's score is the distance to its nearest bank feature.

Memory: the full bank (every kept patch of every training image, float32) lives in one
host numpy array until the coreset is chosen — N images x h*w patches x D x 4 bytes.
max_patches_per_image keeps a seeded random subset of each image's patches to bound it
for huge datasets; the trade-off is a coreset chosen from fewer candidates, so rare
normal patterns are more likely to be missed (more false positives), while the
coreset is usually a small fraction of the bank anyway.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from anomax.errors import ArtifactError, ConfigError, DatasetError, InputError
from anomax.features import random_projection
from anomax.heads._base import Head, HeadConfig
from anomax.kernels.coreset import greedy_coreset, sharded_greedy_coreset
from anomax.kernels.neighbors import nearest_neighbors, sharded_nearest_neighbors
from anomax.parallel import data_mesh, gather, gather_rows, local_rows
from anomax.registry import HEADS
from anomax.settings import MAX_SEED, setting

log = logging.getLogger("anomax")


class _Bank:
    """Preallocated (capacity, D) float32 rows written batch by batch; doubled only when the image
    count was unknown. With one process the rows live on the device, where the coreset is chosen, so
    the whole bank is never copied from host to device (a transfer holds it twice over); with
    several processes each keeps its own rows in host memory."""

    def __init__(self, capacity: int, dim: int, on_device: bool):
        self.on_device = on_device
        self.rows = jnp.zeros((capacity, dim), jnp.float32) if on_device else np.empty((capacity, dim), np.float32)
        self.size = 0

    def add(self, rows: np.ndarray) -> None:
        end = self.size + len(rows)
        if end > len(self.rows):
            capacity, dim = max(end, 2 * len(self.rows)), self.rows.shape[1]
            if self.on_device:
                self.rows = jnp.concatenate([self.rows[: self.size], jnp.zeros((capacity - self.size, dim))])
            else:
                grown = np.empty((capacity, dim), np.float32)
                grown[: self.size] = self.rows[: self.size]
                self.rows = grown
        if self.on_device:
            self.rows = _write_rows(self.rows, jnp.asarray(rows), self.size)
        else:
            self.rows[self.size:end] = rows
        self.size = end

    def filled(self):
        """The rows written so far (no copy when the bank is full, as it is when the count was known)."""
        return self.rows if self.size == len(self.rows) else self.rows[: self.size]


@partial(jax.jit, donate_argnums=0)
def _write_rows(bank: jax.Array, rows: jax.Array, start: int) -> jax.Array:
    return jax.lax.dynamic_update_slice(bank, rows, (start, 0))


@dataclasses.dataclass(frozen=True)
class PatchCoreConfig(HeadConfig):
    """coreset_ratio: fraction of bank patches kept (ignored when coreset_size is set).
    num_neighbors: k of the paper's image-score re-weighting (1 = plain max).
    projection_dim: dimension of the seeded Gaussian projection the coreset is chosen on
    (null or >= D: exact features). chunk_size: rows per tile of the nearest-neighbour
    search (tile memory chunk_size^2 x 4 bytes). max_patches_per_image: see module doc."""

    coreset_ratio: float = setting(0.01, gt=0, le=1)
    coreset_size: int | None = setting(None, ge=1)
    num_neighbors: int = setting(9, ge=1)
    projection_dim: int | None = setting(128, ge=1)
    chunk_size: int = setting(4096, ge=1)
    max_patches_per_image: int | None = setting(None, ge=1)
    seed: int = setting(0, ge=0, le=MAX_SEED)


@HEADS.register("patchcore")
class PatchCore(Head):
    name = "patchcore"
    Config = PatchCoreConfig
    state_keys = ("memory_bank",)

    @staticmethod
    def check_state(state):
        bank = state["memory_bank"].shape
        if len(bank) != 2 or 0 in bank:
            raise ArtifactError(f"head 'patchcore' state: 'memory_bank' has shape {bank}, expected (patches, D) "
                                "with both > 0; the artifact was modified — save the model again")

    def fit(self, batches, *, train=None, validation=None, progress=False):
        config = self.config
        rng = np.random.default_rng(config.seed)
        bank = None
        num_images = 0
        for features, valid in self.feature_batches(batches, progress):
            batch, height, width, dim = features.shape
            # this process's rows only: with several processes the bank stays split between them
            patches = local_rows(features).astype(np.float32, copy=False).reshape(-1, height * width, dim)
            batch = len(patches)
            patches = patches[local_rows(valid).astype(bool)]
            keep = config.max_patches_per_image
            if keep is not None and keep < height * width:
                # Vectorised "choose `keep` of h*w without replacement" per image.
                order = np.argsort(rng.random(patches.shape[:2]), axis=1)[:, :keep]
                patches = np.take_along_axis(patches, order[:, :, None], axis=1)
            if bank is None:
                bank = self._empty_bank(batches, batch, patches.shape[1], dim)
            bank.add(patches.reshape(-1, dim))
            num_images += len(patches)
        if bank is None or bank.size == 0:
            raise DatasetError("patchcore.fit got no valid training images; check the training split")
        rows = bank.filled()
        if not (jnp if bank.on_device else np).isfinite(rows).all():
            raise InputError("patchcore.fit: the training features contain NaN or inf; check the images and backbone")

        processes = jax.process_count()
        num_patches = len(rows) if processes == 1 else int(gather(np.array([len(rows)])).sum())
        num_images = num_images if processes == 1 else int(gather(np.array([num_images])).sum())
        size = self._coreset_size(num_patches)
        dim = rows.shape[1]
        projected = rows if config.projection_dim is None or config.projection_dim >= dim else (
            rows @ random_projection(config.seed, dim, config.projection_dim))
        start = int(rng.integers(num_patches))
        log.info("patchcore: selecting a coreset of %d from %d patches (%d greedy steps over %d dims)",
                 size, num_patches, size, projected.shape[1])
        began = time.perf_counter()
        if processes == 1:
            chosen = np.asarray(greedy_coreset(jnp.asarray(projected), size, start, progress=progress))
            memory_bank = np.asarray(rows[chosen])
        else:  # the bank is the rows of processes 0, 1, ... in order; it is never gathered whole
            start = int(multihost_utils.broadcast_one_to_all(start))
            log.info("patchcore: this process holds %d of the %d bank rows (%.1f MiB)", len(rows), num_patches,
                     rows.nbytes / 2**20)
            chosen = sharded_greedy_coreset(projected, size, start, data_mesh(), progress=progress)
            memory_bank = gather_rows(rows, chosen)
        seconds = time.perf_counter() - began
        self._state = {"memory_bank": memory_bank}
        return {"num_images": num_images, "num_patches": num_patches, "coreset_size": size,
                "coreset_seconds": round(seconds, 3), "coreset_indices": chosen.tolist()}

    def _coreset_size(self, bank_size: int) -> int:
        size = self.config.coreset_size or max(1, int(bank_size * self.config.coreset_ratio))
        if size > bank_size:
            raise ConfigError(f"model.head.coreset_size = {size} is invalid: it must be at most the memory bank "
                              f"size {bank_size} (training images x patches per image)")
        return size

    def _empty_bank(self, batches, batch_size: int, patches_per_image: int, dim: int) -> _Bank:
        """Sized from the known image count when the batches say it (the model's do), so the bank
        is allocated once; a wrong coreset_size fails here, before the features are extracted."""
        num_images = getattr(batches, "num_images", None)
        on_device = jax.process_count() == 1
        if num_images is None:
            batches_known = len(batches) if hasattr(batches, "__len__") else 16
            return _Bank(batch_size * patches_per_image * batches_known, dim, on_device)
        # num_images is this process's share; the exact check follows once the bank is complete
        self._coreset_size(num_images * patches_per_image * jax.process_count())
        return _Bank(num_images * patches_per_image, dim, on_device)

    def score(self, state, images, features, mesh=None):
        batch, height, width, dim = features.shape
        bank = state["memory_bank"]
        queries = jnp.reshape(features, (batch, height * width, dim))
        distances, _ = self._neighbors(queries.reshape(-1, dim), bank, 1, mesh, indices=False)
        patch_scores = distances.reshape(batch, height * width)
        image_scores = self._image_scores(bank, queries, patch_scores, mesh)
        return self.outputs(patch_scores.reshape(batch, height, width), images, image_scores)

    def _image_scores(self, bank, queries, patch_scores, mesh):
        """The paper's re-weighting (anomalib's compute_anomaly_score): the most anomalous
        patch's distance s*, scaled by 1 - softmax over its distances to the k bank
        neighbours of its own nearest bank feature m*, taken at m*. s* counts less when
        m* sits in a dense bank region (the patch is 'near normal' after all).

        m* is searched again for the B worst patches alone, so that the search over all patches
        needs only distances, no arg-min (the slowest step of the exported graph otherwise)."""
        worst = jnp.argmax(patch_scores, axis=1)
        score = jnp.take_along_axis(patch_scores, worst[:, None], axis=1)[:, 0]
        k = min(self.config.num_neighbors, bank.shape[0])
        if k == 1:  # no neighbours to weigh against: 1 - softmax of one distance would make every score 0
            return score
        worst_features = jnp.take_along_axis(queries, worst[:, None, None], axis=1)[:, 0]
        _, nearest = self._neighbors(worst_features, bank, 1, mesh)
        _, support = self._neighbors(bank[nearest[:, 0]], bank, k, mesh)
        distances = jnp.linalg.norm(bank[support] - worst_features[:, None, :], axis=-1)
        return score * (1.0 - jax.nn.softmax(distances, axis=1)[:, 0])

    def _neighbors(self, queries, bank, k, mesh, indices=True):
        """The bank is searched on one device, or split over the mesh (local search, then global best)."""
        if mesh is None:
            return nearest_neighbors(queries, bank, k=k, chunk_size=self.config.chunk_size, indices=indices)
        return sharded_nearest_neighbors(queries, bank, mesh, k=k, chunk_size=self.config.chunk_size,
                                         indices=indices)
