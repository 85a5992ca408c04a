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
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from anomax import parallel
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


@parallel.jit(static_argnames=("mesh",), donate_argnums=(2, 3))
def _sharded_steps(features, norms, nearest_d2, chosen, begin, end, *, mesh: Mesh):
    """_steps on a bank split over the mesh's devices: the newest centre comes from the device
    that holds it (a psum of one row), each device updates its own rows, and the next centre is
    the best of the devices' farthest rows (ties: the lowest device, then the lowest row)."""

    def local(features, norms, nearest_d2, chosen, begin, end):
        rows, me = features.shape[0], jax.lax.axis_index("data")

        def step(i, carry):
            nearest_d2, chosen = carry
            centre = chosen[i - 1]
            mine, row = centre // rows == me, centre % rows
            centre_row = jax.lax.psum(jnp.where(mine, features[row], 0.0), "data")
            centre_norm = jax.lax.psum(jnp.where(mine, norms[row], 0.0), "data")
            d2 = norms - 2.0 * jnp.dot(features, centre_row, precision="highest") + centre_norm
            nearest_d2 = jnp.minimum(nearest_d2, d2)
            nearest_d2 = nearest_d2.at[row].set(jnp.where(mine, 0.0, nearest_d2[row]))
            best = jnp.argmax(nearest_d2).astype(jnp.int32)
            values = jax.lax.all_gather(nearest_d2[best], "data")
            candidates = jax.lax.all_gather(best + me.astype(jnp.int32) * rows, "data")
            return nearest_d2, chosen.at[i].set(candidates[jnp.argmax(values)])

        return jax.lax.fori_loop(begin, end, step, (nearest_d2, chosen))

    # check_vma off: the loop carry mixes per-device rows and the replicated choice.
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P(), P(), P()),
                         out_specs=(P("data"), P()), check_vma=False)(features, norms, nearest_d2, chosen, begin, end)


def sharded_greedy_coreset(local_features: np.ndarray, size: int, start: int, mesh: Mesh, *,
                           progress: bool = False, chunks: int = PROGRESS_CHUNKS) -> np.ndarray:
    """greedy_coreset of the rows of all processes, each process passing its own rows (N_p, D);
    the rows of processes 0, 1, ... in order are the bank. The bank is never gathered: each device
    keeps its block, and per step only the newest centre and one candidate per device travel.
    Returns the same indices (size,) as greedy_coreset on the whole bank, on every process."""
    from anomax.parallel import gather, replicate, shard_batch

    processes = [device.process_index for device in mesh.devices.flat]
    if processes != sorted(processes):
        raise InputError("sharded_greedy_coreset: the mesh must list the devices process by process")
    counts = gather(np.array([len(local_features)], np.int64))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    if not 1 <= size <= total:
        raise InputError(f"greedy_coreset: size={size} must be between 1 and the number of rows {total}")
    local_devices = processes.count(jax.process_index())
    block = -(-int(counts.max()) // local_devices) * local_devices  # rows per process, padded
    padded = np.zeros((block, local_features.shape[1]), np.float32)
    padded[: len(local_features)] = local_features
    # padding rows start at -inf: never the farthest row
    initial = np.where(np.arange(block) < len(local_features), np.inf, -np.inf).astype(np.float32)
    features = shard_batch(mesh, padded)
    nearest_d2 = shard_batch(mesh, initial)
    norms = parallel.jit(lambda x: jnp.sum(jnp.square(x), axis=1))(features)
    owner = int(np.searchsorted(offsets, start, side="right") - 1)
    chosen = np.zeros((size,), np.int32)
    chosen[0] = owner * block + start - offsets[owner]
    chosen = replicate(mesh, chosen)
    per_chunk = max(1, -(-(size - 1) // max(1, chunks)))
    with tqdm(total=size - 1, desc="coreset", unit="step", disable=not progress) as bar:
        for begin in range(1, size, per_chunk):
            end = min(begin + per_chunk, size)
            nearest_d2, chosen = _sharded_steps(features, norms, nearest_d2, chosen, np.int32(begin),
                                                np.int32(end), mesh=mesh)
            if progress:
                chosen.block_until_ready()
                bar.update(end - begin)
    padded_index = np.asarray(chosen).astype(np.int64)
    return (offsets[padded_index // block] + padded_index % block).astype(np.int32)
