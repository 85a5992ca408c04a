"""Data parallelism with jax.sharding: one 1-D mesh named 'data' over every device of every process.

Batches are split along their first axis (NamedSharding(mesh, P('data'))) and parameters
are replicated; jit then compiles one SPMD program in which XLA inserts the cross-device
reductions itself (PaDiM's sums over the batch become all-reduces). With several processes
(``anomax.distributed``) the mesh spans all of them: each process feeds only its own shard of
a global batch (``shard_batch`` assembles it from process-local rows), the same reductions then
run across processes, and ``gather`` brings a sharded result back to every process.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from anomax.errors import InputError

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of the default backend, of all processes)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (AXIS,))


def jit(fun: Callable | None = None, /, **options: Any) -> Callable:
    """``jax.jit`` for programs that may run on a mesh of several devices. With several CPU devices in
    a process, every call waits for its result: XLA:CPU's collectives deadlock when two such programs
    are in flight at once. Across processes (gloo), a 2-process x 2-device all-reduce loop with async
    dispatch hung in 6 runs of 6 here; in one process (its in-process rendezvous), the sharded coreset
    on 4 devices hung in 6 runs of 24 on a loaded 2-core machine. Waiting after each call never hung
    (the coreset: 0 of 59), nor did one device per process. Anywhere else (GPUs, TPUs, one CPU device) it is plain
    ``jax.jit`` with asynchronous dispatch."""
    if fun is None:
        return functools.partial(jit, **options)
    return _Jitted(jax.jit(fun, **options))


class _Jitted:
    """A jax.jit function (its other attributes, e.g. lower and clear_cache, pass through) whose
    calls wait for their results where ``jit`` says."""

    def __init__(self, compiled: Callable):
        self._compiled = compiled
        functools.update_wrapper(self, compiled)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return settled(self._compiled(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)


def settled(result: Any) -> Any:
    """``result`` of a program on the mesh, waited for where ``jit`` says; for programs compiled
    ahead of time (``jax.jit(f).lower(...).compile()``), which ``jit`` does not wrap."""
    return jax.block_until_ready(result) if _one_program_at_a_time() else result


def _one_program_at_a_time() -> bool:
    return jax.local_device_count() > 1 and jax.default_backend() == "cpu"


def mesh_size(mesh: Mesh) -> int:
    return mesh.shape[AXIS]


def spans_processes(mesh: Mesh) -> bool:
    return any(device.process_index != jax.process_index() for device in mesh.devices.flat)


def shard_batch(mesh: Mesh, array) -> jax.Array:
    """Place a batch (B, ...) with B split over the mesh; B must be a multiple of the device count.
    On a mesh over several processes ``array`` is this process's rows of the global batch."""
    devices = sum(device.process_index == jax.process_index() for device in mesh.devices.flat)
    if np.shape(array)[0] % devices:
        raise InputError(f"a batch of {np.shape(array)[0]} cannot be split evenly over {devices} devices; "
                         f"set batch_size to a multiple of {devices * jax.process_count()}")
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    if spans_processes(mesh):
        return jax.make_array_from_process_local_data(sharding, np.asarray(array))
    return jax.device_put(array, sharding)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """The same pytree on every device of the mesh (every process must pass the same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if spans_processes(mesh):
        # Each process places its own copy on its own devices. jax.device_put would first check that
        # the processes agree by gathering every leaf across them: a collective program per leaf
        # (MobileNetV2: 262 leaves) at every placement, in flight beside the pipeline's own programs.
        return jax.make_array_from_process_local_data(sharding, jax.tree.map(np.asarray, tree))
    return jax.device_put(tree, sharding)


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded array (all of it with one process), as numpy."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])


def gather(tree: Any) -> Any:
    """Every process gets the whole of each leaf: batch-sharded arrays are gathered whole, and
    host arrays are taken as this process's rows and concatenated in process order."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def gather_valid(valid: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Every process's rows of ``arrays`` (split order) without the padding rows ``valid`` marks.
    The padding travels along to the gather and is dropped after: process_allgather needs the same
    shapes on every process, and processes whose parts differ in size pad to the same batches."""
    valid, *arrays = gather([np.asarray(valid), *arrays])
    valid = valid.astype(bool)
    return [array[valid] for array in arrays]


def gather_rows(local: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows at ``indices`` of an array whose rows are split over the processes in order (this
    process holds ``local``); every process gets them all, but no process ever holds all rows."""
    indices = np.asarray(indices)
    offset = 0
    if jax.process_count() > 1:
        offset = int(gather(np.array([len(local)], np.int64))[: jax.process_index()].sum())
    mine = (indices >= offset) & (indices < offset + len(local))
    rows = np.zeros((len(indices), *local.shape[1:]), local.dtype)
    rows[mine] = local[indices[mine] - offset]
    return rows if jax.process_count() == 1 else gather(rows[None]).sum(axis=0)  # one owner per row: exact


def data_parallel(tree: Any) -> Any:
    """Inside jit: with several processes, split each leaf's first axis over the global mesh, so
    the work on a batch is spread over every device and XLA sums gradients across processes; with
    one process, unchanged."""
    if jax.process_count() == 1:
        return tree
    sharding = NamedSharding(data_mesh(), PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)
