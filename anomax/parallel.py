"""Data parallelism over the local devices with jax.sharding: one 1-D mesh named 'data'.

Batches are split along their first axis (NamedSharding(mesh, P('data'))) and parameters
are replicated; jit then compiles one SPMD program in which XLA inserts the cross-device
reductions itself (PaDiM's sums over the batch become all-reduces). Multi-host: call
``jax.distributed.initialize()`` first in every process; ``jax.devices()`` then lists the
devices of all hosts, and each process feeds only its own shard of a batch (see
benchmarks/README.md).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from anomax.errors import InputError

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (AXIS,))


def mesh_size(mesh: Mesh) -> int:
    return mesh.shape[AXIS]


def shard_batch(mesh: Mesh, array) -> jax.Array:
    """Place a batch (B, ...) with B split over the mesh; B must be a multiple of the device count."""
    devices = mesh_size(mesh)
    if np.shape(array)[0] % devices:
        raise InputError(f"a batch of {np.shape(array)[0]} cannot be split evenly over {devices} devices; "
                         f"set batch_size to a multiple of {devices}")
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(AXIS)))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """The same pytree on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
