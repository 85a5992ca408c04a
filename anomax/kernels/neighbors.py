"""Chunked exact nearest-neighbour search: memory bounded by query tile x bank tile.

Squared distances use ||a||^2 - 2 a.b + ||b||^2 (one matmul per tile); ||a||^2 does not
change which bank row is nearest, so it is added after the minimum, and the result is
clamped at 0 before the square root. The bank is padded to whole tiles with rows of
infinite norm, so padding can never be the nearest.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from anomax.errors import InputError


def _tile_rows(rows: int, chunk_size: int) -> int:
    """Rows per tile: at most chunk_size, spread evenly so that padding stays small."""
    tiles = -(-rows // chunk_size)
    return -(-rows // tiles)


def _tiles(x: jax.Array, rows: int, fill: float = 0.0) -> jax.Array:
    """(N, ...) -> (tiles, rows, ...), padded with `fill`."""
    padding = [(0, -x.shape[0] % rows)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, padding, constant_values=fill).reshape(-1, rows, *x.shape[1:])


def _smallest(values: jax.Array, index: jax.Array, k: int):
    """The k smallest values per row, ascending, with their indices (argmin when k == 1)."""
    pick = jnp.argmin(values, axis=1, keepdims=True) if k == 1 else jax.lax.top_k(-values, k)[1]
    return jnp.take_along_axis(values, pick, 1), jnp.take_along_axis(index, pick, 1)


@partial(jax.jit, static_argnames=("k", "chunk_size"))
def nearest_neighbors(queries: jax.Array, bank: jax.Array, *, k: int = 1, chunk_size: int = 4096):
    """Exact k nearest bank rows of each query: (distances (Q, k) ascending, indices (Q, k)).
    Ties go to the lower bank index when k == 1."""
    num_queries, num_bank = queries.shape[0], bank.shape[0]
    if not 1 <= k <= num_bank:
        raise InputError(f"nearest_neighbors: k={k} must be between 1 and the bank size {num_bank}")
    bank_rows = _tile_rows(num_bank, max(chunk_size, k))
    query_rows = _tile_rows(num_queries, chunk_size)
    bank_tiles = _tiles(bank, bank_rows)
    norm_tiles = _tiles(jnp.sum(jnp.square(bank), axis=1), bank_rows, fill=jnp.inf)
    offsets = jnp.arange(bank_tiles.shape[0], dtype=jnp.int32) * bank_rows

    def search(query_tile):
        scaled = -2.0 * query_tile

        def merge(best, tile):
            rows, norms, offset = tile
            partial_d2 = norms[None, :] + jnp.dot(scaled, rows.T, precision="highest")  # ||b||^2 - 2 a.b
            index = jnp.broadcast_to(offset + jnp.arange(bank_rows, dtype=jnp.int32), partial_d2.shape)
            found = _smallest(partial_d2, index, k)
            if k == 1:  # strict <: on ties the earlier tile, i.e. the lower index, stays
                better = found[0] < best[0]
                return tuple(jnp.where(better, new, old) for new, old in zip(found, best)), None
            return _smallest(*(jnp.concatenate(pair, axis=1) for pair in zip(best, found)), k), None

        start = (jnp.full((query_rows, k), jnp.inf), jnp.zeros((query_rows, k), jnp.int32))
        (partial_d2, index), _ = jax.lax.scan(merge, start, (bank_tiles, norm_tiles, offsets))
        d2 = partial_d2 + jnp.sum(jnp.square(query_tile), axis=1, keepdims=True)
        return jnp.sqrt(jnp.maximum(d2, 0.0)), index

    distances, indices = jax.lax.map(search, _tiles(queries, query_rows))
    return distances.reshape(-1, k)[:num_queries], indices.reshape(-1, k)[:num_queries]
