"""Greedy k-center coreset (Gonzalez / PatchCore) as compiled loops over chunks of steps.

Each step reads the bank once: the squared distance of every row to the newest centre,
as ||x||^2 - 2 x.c + ||c||^2 (a matrix-vector product, the fastest single pass over
the bank on CPU and accelerators), updates the running distance-to-coreset, and the
farthest row becomes the next centre. Steps run in a few compiled lax loops (one
compilation: the chunk bounds are traced), so a progress bar can advance between
chunks while the state never leaves the device.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from anomax.errors import InputError

PROGRESS_CHUNKS = 50  # host round trips per selection: one per bar update


@partial(jax.jit, donate_argnums=(2, 3))
def _steps(features, norms, nearest_d2, chosen, begin, end):
    def step(i, carry):
        nearest_d2, chosen = carry
        centre = chosen[i - 1]
        d2 = norms - 2.0 * jnp.dot(features, features[centre], precision="highest") + norms[centre]
        # A chosen row is at distance 0 exactly, whatever the rounding of the expansion.
        nearest_d2 = jnp.minimum(nearest_d2, d2).at[centre].set(0.0)
        return nearest_d2, chosen.at[i].set(jnp.argmax(nearest_d2).astype(jnp.int32))

    return jax.lax.fori_loop(begin, end, step, (nearest_d2, chosen))


def greedy_coreset(features: jax.Array, size: int, start: int = 0, *, progress: bool = False,
                   chunks: int = PROGRESS_CHUNKS) -> jax.Array:
    """Indices (size,) int32 of a greedy k-center coreset of features (N, D).

    The first index is `start`; each next one is the row farthest (Euclidean) from all
    chosen so far, the lowest index on ties. Selecting by squared distance is equivalent
    and saves the square root. ``chunks`` compiled calls (and bar updates) in all."""
    features = jnp.asarray(features)
    if not 1 <= size <= features.shape[0]:
        raise InputError(f"greedy_coreset: size={size} must be between 1 and the number of rows {features.shape[0]}")
    norms = jnp.sum(jnp.square(features), axis=1)
    chosen = jnp.zeros((size,), jnp.int32).at[0].set(start)
    nearest_d2 = jnp.full((features.shape[0],), jnp.inf, features.dtype)
    per_chunk = max(1, -(-(size - 1) // max(1, chunks)))
    with tqdm(total=size - 1, desc="coreset", unit="step", disable=not progress) as bar:
        for begin in range(1, size, per_chunk):
            end = min(begin + per_chunk, size)
            nearest_d2, chosen = _steps(features, norms, nearest_d2, chosen, jnp.int32(begin), jnp.int32(end))
            if progress:
                chosen.block_until_ready()
                bar.update(end - begin)
    return chosen
