"""Greedy k-center coreset (Gonzalez / PatchCore) as one compiled loop.

Each step reads the bank once: the squared distance of every row to the newest centre,
as ||x||^2 - 2 x.c + ||c||^2 (a matrix-vector product, the fastest single pass over
the bank on CPU and accelerators), updates the running distance-to-coreset, and the
farthest row becomes the next centre. The whole selection is a single lax.fori_loop,
so there is no host round trip per step.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from anomax.errors import InputError


@partial(jax.jit, static_argnames=("size",))
def greedy_coreset(features: jax.Array, size: int, start: int | jax.Array = 0) -> jax.Array:
    """Indices (size,) int32 of a greedy k-center coreset of features (N, D).

    The first index is `start`; each next one is the row farthest (Euclidean) from all
    chosen so far, the lowest index on ties. Selecting by squared distance is equivalent
    and saves the square root."""
    if not 1 <= size <= features.shape[0]:
        raise InputError(f"greedy_coreset: size={size} must be between 1 and the number of rows {features.shape[0]}")

    norms = jnp.sum(jnp.square(features), axis=1)

    def step(i, carry):
        nearest_d2, chosen = carry
        centre = chosen[i - 1]
        d2 = norms - 2.0 * jnp.dot(features, features[centre], precision="highest") + norms[centre]
        # A chosen row is at distance 0 exactly, whatever the rounding of the expansion.
        nearest_d2 = jnp.minimum(nearest_d2, d2).at[centre].set(0.0)
        return nearest_d2, chosen.at[i].set(jnp.argmax(nearest_d2).astype(jnp.int32))

    chosen = jnp.zeros((size,), jnp.int32).at[0].set(start)
    nearest_d2 = jnp.full((features.shape[0],), jnp.inf, features.dtype)
    return jax.lax.fori_loop(1, size, step, (nearest_d2, chosen))[1]
