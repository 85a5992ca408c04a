"""Chunked exact nearest-neighbour search: memory bounded by query tile x bank tile.

Squared distances use ||a||^2 - 2 a.b + ||b||^2 (one matmul per tile); ||a||^2 does not
change which bank row is nearest, so it is added after the minimum, and the result is
clamped at 0 before the square root. The bank is padded to whole tiles with rows of
infinite norm, so padding can never be the nearest. ``indices=False`` skips the arg-min:
for 1-NN a row minimum is far cheaper, in XLA and most of all in an exported graph
(OpenVINO runs an arg-min as a k=1 TopK that took longer than the distance matmul).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from anomax import parallel
from anomax.errors import InputError


def _tile_rows(rows: int, chunk_size: int) -> int:
    """Rows per tile: at most chunk_size, spread evenly so that padding stays small."""
    tiles = -(-rows // chunk_size)
    return -(-rows // tiles)


def _tiles(x: jax.Array, rows: int, fill: float = 0.0) -> jax.Array:
    """(N, ...) -> (tiles, rows, ...), padded with `fill`."""
    padding = [(0, -x.shape[0] % rows)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, padding, constant_values=fill).reshape(-1, rows, *x.shape[1:])


def _smallest(values: jax.Array, index: jax.Array | None, k: int):
    """The k smallest values per row, ascending, with their entries of `index` (argmin when k == 1);
    index None: the values alone (a minimum when k == 1)."""
    if index is None:
        return (jnp.min(values, axis=1, keepdims=True) if k == 1 else -jax.lax.top_k(-values, k)[0]), None
    column = _smallest_columns(values, k)
    return jnp.take_along_axis(values, column, 1), jnp.take_along_axis(index, column, 1)


def _smallest_columns(values: jax.Array, k: int) -> jax.Array:
    return jnp.argmin(values, axis=1, keepdims=True) if k == 1 else jax.lax.top_k(-values, k)[1]


@partial(jax.jit, static_argnames=("k", "chunk_size", "indices"))
def nearest_neighbors(queries: jax.Array, bank: jax.Array, *, k: int = 1, chunk_size: int = 4096,
                      indices: bool = True):
    """Exact k nearest bank rows of each query: (distances (Q, k) ascending, indices (Q, k), or
    None when ``indices=False``). Ties go to the lower bank index when k == 1."""
    _check_k(k, bank.shape[0])
    return _search(queries, bank, jnp.sum(jnp.square(bank), axis=1), k, chunk_size, indices)


@parallel.jit(static_argnames=("mesh", "k", "chunk_size", "indices"))
def sharded_nearest_neighbors(queries: jax.Array, bank: jax.Array, mesh: Mesh, *, k: int = 1,
                              chunk_size: int = 4096, indices: bool = True):
    """nearest_neighbors with the bank split over the devices of `mesh` (axis 'data'): each
    device searches its own rows, then the k best of all devices are kept. Same results and
    tie-breaking as on one device (candidates are merged in global index order)."""
    num_bank, devices = bank.shape[0], mesh.shape["data"]
    _check_k(k, num_bank)
    rows = -(-num_bank // devices)
    padding = rows * devices - num_bank  # padded rows have infinite norm: never a neighbour
    norms = jnp.pad(jnp.sum(jnp.square(bank), axis=1), (0, padding), constant_values=jnp.inf)
    bank = jnp.pad(bank, ((0, padding), (0, 0)))

    def local(queries, bank, norms):
        distances, index = _search(queries, bank, norms, min(k, rows), chunk_size, indices)
        index = None if index is None else index + jax.lax.axis_index("data") * rows
        gathered = jax.tree.map(lambda x: jax.lax.all_gather(x, "data", axis=1, tiled=True), (distances, index))
        return _smallest(*gathered, k)

    # check_vma off: the search's scan carry starts device-invariant and becomes per-device.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()),
                         check_vma=False)(queries, bank, norms)


def _check_k(k: int, num_bank: int) -> None:
    if not 1 <= k <= num_bank:
        raise InputError(f"nearest_neighbors: k={k} must be between 1 and the bank size {num_bank}")


def _search(queries: jax.Array, bank: jax.Array, bank_norms: jax.Array, k: int, chunk_size: int,
            indices: bool = True):
    """The tiled search; bank_norms (N,) are ||b||^2, or inf for rows that must never match.
    (distances, indices), indices None when not asked for."""
    num_queries = queries.shape[0]
    # A tile holds at least k rows (padding rows have infinite norm), so top_k always has k candidates.
    bank_rows = max(_tile_rows(bank.shape[0], chunk_size), k)
    # A symbolic query count (ONNX export with a free batch size) cannot be cut into tiles: then all
    # queries form one tile and the few bank tiles are unrolled, as ONNX runtimes run loops slowly.
    unrolled = not isinstance(num_queries, int)
    query_rows = num_queries if unrolled else _tile_rows(num_queries, chunk_size)
    bank_tiles = _tiles(bank, bank_rows)
    norm_tiles = _tiles(bank_norms, bank_rows, fill=jnp.inf)
    offsets = jnp.arange(bank_tiles.shape[0], dtype=jnp.int32) * bank_rows

    def search(query_tile):
        scaled = -2.0 * query_tile

        def merge(best, tile):
            rows, norms, offset = tile
            partial_d2 = norms[None, :] + jnp.dot(scaled, rows.T, precision="highest")  # ||b||^2 - 2 a.b
            if indices:  # a tile's bank index is offset + column: no (queries, bank) index array to gather from
                column = _smallest_columns(partial_d2, k)
                found = jnp.take_along_axis(partial_d2, column, 1), offset + column
            else:
                found = _smallest(partial_d2, None, k)
            if k == 1:  # strict <: on ties the earlier tile, i.e. the lower index, stays
                better = found[0] < best[0]
                return jax.tree.map(lambda new, old: jnp.where(better, new, old), found, best), None
            return _smallest(*jax.tree.map(lambda *pair: jnp.concatenate(pair, axis=1), best, found), k), None

        start = (jnp.full((query_rows, k), jnp.inf), jnp.zeros((query_rows, k), jnp.int32) if indices else None)
        if unrolled:
            best = start
            for tile in zip(bank_tiles, norm_tiles, offsets):
                best, _ = merge(best, tile)
            partial_d2, index = best
        else:
            (partial_d2, index), _ = jax.lax.scan(merge, start, (bank_tiles, norm_tiles, offsets))
        d2 = partial_d2 + jnp.sum(jnp.square(query_tile), axis=1, keepdims=True)
        return jnp.sqrt(jnp.maximum(d2, 0.0)), index

    if unrolled:
        return search(queries)
    found = jax.lax.map(search, _tiles(queries, query_rows))
    return jax.tree.map(lambda x: x.reshape(-1, k)[:num_queries], found)
