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

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from anomax.errors import DatasetError, InputError
from anomax.features import random_projection
from anomax.heads._base import Head
from anomax.kernels.coreset import greedy_coreset
from anomax.kernels.neighbors import nearest_neighbors, sharded_nearest_neighbors
from anomax.registry import HEADS

log = logging.getLogger("anomax")


class _Bank:
    """Preallocated (capacity, D) float32 rows, doubled if the batch count was unknown."""

    def __init__(self, capacity: int, dim: int):
        self.rows = np.empty((capacity, dim), np.float32)
        self.size = 0

    def add(self, rows: np.ndarray) -> None:
        end = self.size + len(rows)
        if end > len(self.rows):
            grown = np.empty((max(end, 2 * len(self.rows)), self.rows.shape[1]), np.float32)
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        self.rows[self.size:end] = rows
        self.size = end


@HEADS.register("patchcore")
class PatchCore(Head):
    """coreset_ratio: fraction of bank patches kept (ignored when coreset_size is set).
    num_neighbors: k of the paper's image-score re-weighting (1 = plain max).
    projection_dim: dimension of the seeded Gaussian projection the coreset is chosen on
    (null or >= D: exact features). chunk_size: rows per tile of the nearest-neighbour
    search (tile memory chunk_size^2 x 4 bytes). max_patches_per_image: see module doc."""

    name = "patchcore"
    state_keys = ("memory_bank",)

    def __init__(self, coreset_ratio: float = 0.01, coreset_size: int | None = None, num_neighbors: int = 9,
                 projection_dim: int | None = 128, chunk_size: int = 4096,
                 max_patches_per_image: int | None = None, sigma: float = 4.0, seed: int = 0):
        super().__init__(sigma)
        self.check(isinstance(coreset_ratio, (int, float)) and 0 < coreset_ratio <= 1, "coreset_ratio",
                   coreset_ratio, "a number in (0, 1]")
        self.check_count("coreset_size", coreset_size, optional=True)
        self.check_count("num_neighbors", num_neighbors)
        self.check_count("projection_dim", projection_dim, optional=True)
        self.check_count("chunk_size", chunk_size)
        self.check_count("max_patches_per_image", max_patches_per_image, optional=True)
        self.check(isinstance(seed, int), "seed", seed, "an integer")
        self.coreset_ratio = float(coreset_ratio)
        self.coreset_size = coreset_size
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim
        self.chunk_size = chunk_size
        self.max_patches_per_image = max_patches_per_image
        self.seed = seed

    @property
    def hyperparams(self):
        return {"coreset_ratio": self.coreset_ratio, "coreset_size": self.coreset_size,
                "num_neighbors": self.num_neighbors, "projection_dim": self.projection_dim,
                "chunk_size": self.chunk_size, "max_patches_per_image": self.max_patches_per_image,
                "sigma": self.sigma, "seed": self.seed}

    def fit(self, batches, progress=False):
        rng = np.random.default_rng(self.seed)
        bank = None
        num_images = 0
        for features, valid in self.feature_batches(batches, progress):
            batch, height, width, dim = features.shape
            patches = np.asarray(features, np.float32).reshape(batch, height * width, dim)
            patches = patches[np.asarray(valid, bool)]
            keep = self.max_patches_per_image
            if keep is not None and keep < height * width:
                # Vectorised "choose `keep` of h*w without replacement" per image.
                order = np.argsort(rng.random(patches.shape[:2]), axis=1)[:, :keep]
                patches = np.take_along_axis(patches, order[:, :, None], axis=1)
            if bank is None:
                per_batch = batch * patches.shape[1]
                bank = _Bank(per_batch * (len(batches) if hasattr(batches, "__len__") else 16), dim)
            bank.add(patches.reshape(-1, dim))
            num_images += len(patches)
        if bank is None or bank.size == 0:
            raise DatasetError("patchcore.fit got no valid training images; check the training split")
        rows = bank.rows[: bank.size]
        if not np.isfinite(rows).all():
            raise InputError("patchcore.fit: the training features contain NaN or inf; check the images and backbone")

        size = self.coreset_size or max(1, int(len(rows) * self.coreset_ratio))
        self.check(size <= len(rows), "coreset_size", size, f"at most the bank size {len(rows)}")
        dim = rows.shape[1]
        projected = rows if self.projection_dim is None or self.projection_dim >= dim else (
            rows @ random_projection(self.seed, dim, self.projection_dim))
        start = int(rng.integers(len(rows)))
        # One compiled loop, so no progress bar: say what is coming (1 % of ELPV mono: minutes on 2 cores).
        log.info("patchcore: selecting a coreset of %d from %d patches (%d greedy steps over %d dims)",
                 size, len(rows), size, projected.shape[1])
        began = time.perf_counter()
        chosen = np.asarray(greedy_coreset(jnp.asarray(projected), size, start))
        seconds = time.perf_counter() - began
        self._state = {"memory_bank": rows[chosen]}
        return {"num_images": num_images, "num_patches": len(rows), "coreset_size": size,
                "coreset_seconds": round(seconds, 3)}

    def score(self, state, images, features):
        batch, height, width, dim = features.shape
        bank = state["memory_bank"]
        queries = jnp.reshape(features, (batch, height * width, dim))
        distances, nearest = self._neighbors(queries.reshape(-1, dim), bank, k=1)
        patch_scores = distances.reshape(batch, height * width)
        return patch_scores.reshape(batch, height, width), self._image_scores(
            bank, queries, patch_scores, nearest.reshape(batch, height * width))

    def _image_scores(self, bank, queries, patch_scores, nearest):
        """The paper's re-weighting (anomalib's compute_anomaly_score): the most anomalous
        patch's distance s*, scaled by 1 - softmax over its distances to the k bank
        neighbours of its own nearest bank feature m*, taken at m*. s* counts less when
        m* sits in a dense bank region (the patch is 'near normal' after all)."""
        worst = jnp.argmax(patch_scores, axis=1)
        take = lambda x: jnp.take_along_axis(x, worst[:, None], axis=1)[:, 0]
        score = take(patch_scores)
        if self.num_neighbors == 1:
            return score
        worst_features = jnp.take_along_axis(queries, worst[:, None, None], axis=1)[:, 0]
        k = min(self.num_neighbors, bank.shape[0])
        _, support = self._neighbors(bank[take(nearest)], bank, k=k)
        distances = jnp.linalg.norm(bank[support] - worst_features[:, None, :], axis=-1)
        return score * (1.0 - jax.nn.softmax(distances, axis=1)[:, 0])

    def _neighbors(self, queries, bank, k):
        """The bank is searched on one device, or split over self.mesh (local search, then global best)."""
        if self.mesh is None:
            return nearest_neighbors(queries, bank, k=k, chunk_size=self.chunk_size)
        return sharded_nearest_neighbors(queries, bank, self.mesh, k=k, chunk_size=self.chunk_size)
