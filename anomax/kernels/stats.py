"""Streamed per-position mean and covariance: memory independent of the number of samples.

Batches are merged with Chan et al.'s pairwise update (each batch is centred on its own
mean before the outer products), so float32 accumulation does not suffer the
cancellation of raw sum / sum-of-squares formulas.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from anomax import parallel


class Moments(NamedTuple):
    count: jax.Array  # () float32, number of valid samples so far
    mean: jax.Array   # (P, D)
    m2: jax.Array     # (P, D, D) sum of outer products of deviations from the mean


def init_moments(positions: int, dim: int) -> Moments:
    return Moments(jnp.zeros((), jnp.float32), jnp.zeros((positions, dim), jnp.float32),
                   jnp.zeros((positions, dim, dim), jnp.float32))


def update_moments(moments: Moments, x: jax.Array, valid: jax.Array) -> Moments:
    """Merge a batch x (B, P, D) whose rows with valid[b] False are padding. The old mean and
    m2 buffers are donated (reused for the result, so P*D*D is held once, not twice) and must not
    be read afterwards; the count is not donated, so a caller can wait on the previous one."""
    return Moments(*_update(moments.count, moments.mean, moments.m2, x, valid))


@parallel.jit(donate_argnums=(1, 2))
def _update(count: jax.Array, mean: jax.Array, m2: jax.Array, x: jax.Array, valid: jax.Array):
    moments = Moments(count, mean, m2)
    weight = valid.astype(jnp.float32)[:, None, None]
    n_batch = weight.sum()
    batch_mean = (x * weight).sum(0) / jnp.maximum(n_batch, 1.0)
    deviation = (x - batch_mean) * weight
    batch_m2 = jnp.einsum("bpi,bpj->pij", deviation, deviation, precision="highest")
    count = moments.count + n_batch
    delta = batch_mean - moments.mean
    share = n_batch / jnp.maximum(count, 1.0)
    mean = moments.mean + delta * share
    m2 = moments.m2 + batch_m2 + jnp.einsum("pi,pj->pij", delta, delta, precision="highest") * (
        moments.count * share)
    return Moments(count, mean, m2)


def covariance(moments: Moments) -> jax.Array:
    """Unbiased (ddof=1) covariance (P, D, D), like numpy.cov and anomalib's PaDiM."""
    return moments.m2 / (moments.count - 1.0)
