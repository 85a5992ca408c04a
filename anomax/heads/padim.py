"""PaDiM: one Gaussian per feature-map position over all training images; the anomaly
score of a patch is its Mahalanobis distance to the Gaussian of its position."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from anomax import parallel
from anomax.errors import ArtifactError, DatasetError, InputError
from anomax.heads._base import Head, HeadConfig
from anomax.kernels.stats import covariance, init_moments, update_moments
from anomax.registry import HEADS
from anomax.settings import setting


def whitening(moments, eps):
    """Lower-triangular W with W (cov + eps I) W^T = I, so that the squared Mahalanobis
    distance is ||W (x - mean)||^2: the inverse of the Cholesky factor.

    Computed on one device: the moments are the same on every device, and jaxlib's batched CPU
    Cholesky waits on the thread pool that also runs the devices' programs, so with one copy per
    CPU device, as many as the pool has threads, every thread waited and the fit hung (2 simulated
    devices: within 100 calls)."""
    if not all(array.sharding.is_fully_replicated for array in moments):
        raise RuntimeError("padim whitening: the moments must be replicated on every device")  # update_moments' output
    return _whitening(jax.tree.map(lambda array: array.addressable_data(0), moments), eps)


@parallel.jit
def _whitening(moments, eps):
    cov = covariance(moments)
    identity = jnp.eye(cov.shape[-1], dtype=cov.dtype)
    cholesky = jnp.linalg.cholesky(cov + eps * identity)
    return jax.scipy.linalg.solve_triangular(cholesky, jnp.broadcast_to(identity, cov.shape), lower=True)


@dataclasses.dataclass(frozen=True)
class PadimConfig(HeadConfig):
    """eps: covariance regulariser eps * I (anomalib's 0.01). The channel subset of the
    paper is the FeatureAdaptor's projection='subset'."""

    eps: float = setting(0.01, gt=0)


@HEADS.register("padim")
class Padim(Head):
    name = "padim"
    Config = PadimConfig
    state_keys = ("mean", "whitening")

    @staticmethod
    def check_state(state):
        mean, whitening = state["mean"].shape, state["whitening"].shape
        if len(mean) != 3 or whitening != (*mean, mean[-1]):
            raise ArtifactError(f"head 'padim' state: 'mean' {mean} and 'whitening' {whitening} do not fit together "
                                "(expected (h, w, D) and (h, w, D, D)); the artifact was modified — save the model again")

    def fit(self, batches, *, train=None, validation=None, progress=False):
        moments = None
        for features, valid in self.feature_batches(batches, progress):
            batch, height, width, dim = features.shape
            if moments is None:
                grid = (height, width, dim)
                moments = init_moments(height * width, dim)
            elif (height, width, dim) != grid:
                raise InputError(f"padim.fit: features changed shape from {grid} to {(height, width, dim)} "
                                 f"between batches; all images must be preprocessed to one size")
            previous_count = moments.count
            moments = update_moments(moments, jnp.reshape(features, (batch, height * width, dim)), valid)
            # jit dispatches asynchronously: without this wait a fast producer queues every batch in
            # memory. One batch stays in flight, so reading overlaps compute and memory stays flat.
            jax.block_until_ready(previous_count)
        count = 0 if moments is None else int(moments.count)
        if count < 2:
            raise DatasetError(f"padim.fit needs at least 2 training images to estimate a covariance, got {count}")
        state = {"mean": np.asarray(moments.mean).reshape(grid),
                 "whitening": np.asarray(whitening(moments, self.config.eps)).reshape(*grid, grid[-1])}
        if not np.isfinite(state["mean"]).all():
            raise InputError("padim.fit: the training features contain NaN or inf; check the images and backbone")
        if not np.isfinite(state["whitening"]).all():  # float32's Cholesky of cov + eps I failed: features finite
            raise InputError(f"padim.fit: the covariance is too ill-conditioned to whiten in float32 (features of a "
                             f"large scale, few images); raise model.head.eps (now {self.config.eps}), add training "
                             "images, or normalise the inputs")
        self._state = state
        return {"num_images": count}

    def score(self, state, images, features, mesh=None):
        return self.outputs(self.distances(state, features), images)

    @staticmethod
    def distances(state, features):
        """(B, h, w, D) -> (B, h, w) Mahalanobis distance to each position's Gaussian."""
        batch, height, width, dim = features.shape
        # positions as the leading batch axis of one dot_general: XLA's CPU matmul is ~6x faster on
        # (P, B, D) x (P, D, D) than on the einsum over (B, h, w, D) with positions in the middle
        delta = (features - state["mean"]).reshape(batch, height * width, dim).transpose(1, 0, 2)
        whitening = state["whitening"].reshape(height * width, dim, dim)
        whitened = jax.lax.dot_general(delta, whitening, (((2,), (2,)), ((0,), (0,))),
                                       precision=jax.lax.Precision.HIGHEST)  # (P, B, D)
        return jnp.sqrt(jnp.sum(jnp.square(whitened), axis=-1)).T.reshape(batch, height, width)
