"""Multi-process runs on JAX's distributed runtime: one process per host, one global mesh.

``initialize`` starts JAX's coordination service (``jax.distributed.initialize``) before any
other JAX use; afterwards ``jax.devices()`` lists the devices of every process and
``anomax.parallel.data_mesh()`` spans them all. Each process reads only its own contiguous
part of every split (``part``) and feeds it as its shard of each global batch
(``local_batches``); jit over the global mesh then reduces across processes by itself (PaDiM's
moments), PatchCore's coreset runs on the bank left where it was made, and scores are gathered
so that every process sees every result. Process 0 writes the outputs (``is_main``).

A dead process is noticed by the coordination service's heartbeats: the other processes stop
within ``heartbeat_timeout_s`` with JAX's message "... another task died", instead of waiting
forever in a collective.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

import jax
import numpy as np

from anomax.errors import ConfigError
from anomax.settings import Settings, setting

log = logging.getLogger("anomax")


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Settings):
    """mode: 'off' (one process), 'manual' (coordinator_address 'host:port' of process 0,
    num_processes and this process's process_id given), or 'auto' (JAX's cluster detection:
    SLURM, Open MPI, TPU pods; any value given here overrides what it detects).
    local_device_ids: the accelerators this process drives (null: JAX's default, which under
    SLURM or Open MPI with GPUs is one GPU per process; give all of a host's GPUs, e.g. [0,1,2,3],
    when srun starts one task per host).
    The timeouts (seconds) bound the start-up wait for all processes, how long a silent process
    counts as alive, and how long a finished process waits for the others at exit."""

    section: ClassVar[str] = "distributed"
    mode: Literal["off", "manual", "auto"] = "off"
    coordinator_address: str | None = None
    num_processes: int | None = setting(None, ge=1)
    process_id: int | None = setting(None, ge=0)
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout_s: int = setting(300, ge=1)
    heartbeat_timeout_s: int = setting(100, ge=1)
    shutdown_timeout_s: int = setting(300, ge=1)

    def check(self) -> None:
        if self.mode == "off":  # one process: where the others are would be ignored, each would run alone
            for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
                if getattr(self, key) is not None:
                    self.fail(key, "null with distributed.mode = 'off' (one process); to join other processes "
                                   "choose distributed=manual or distributed=auto")
        if self.mode == "manual":
            for key in ("coordinator_address", "num_processes", "process_id"):
                if getattr(self, key) is None:
                    self.fail(key, "set when distributed.mode = 'manual' (or choose distributed=auto)")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            self.fail("coordinator_address", "'host:port' of process 0 (e.g. 10.0.0.1:12345)")
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            self.fail("process_id", f"below num_processes = {self.num_processes}")


def initialize(config: DistributedConfig | dict | None) -> None:
    """Join the other processes (nothing for mode 'off'). Call before any other JAX use."""
    config = config if isinstance(config, DistributedConfig) else DistributedConfig.from_dict(config)
    if config.mode == "off":
        return
    # If the coordinator cannot be reached, JAX ends the process after initialization_timeout_s
    # with "Deadline Exceeded ... RegisterTask": this line says what it was waiting for.
    log.info("distributed: joining (mode %s, coordinator %s, process %s of %s), waiting up to %d s", config.mode,
             config.coordinator_address or "auto-detected", config.process_id if config.process_id is not None
             else "auto", config.num_processes or "auto", config.initialization_timeout_s)
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    try:
        jax.distributed.initialize(
            config.coordinator_address, config.num_processes, config.process_id,
            local_device_ids=None if config.local_device_ids is None else list(config.local_device_ids),
            initialization_timeout=config.initialization_timeout_s,
            heartbeat_timeout_seconds=config.heartbeat_timeout_s,
            shutdown_timeout_seconds=config.shutdown_timeout_s)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"distributed: could not join the other processes (mode {config.mode!r}, coordinator "
                          f"{config.coordinator_address or 'auto-detected'}): {error}") from None
    log.info("distributed: process %d of %d, %d local of %d devices; a process that dies stops the others "
             "within %d s", jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count(), config.heartbeat_timeout_s)


def is_multi_process() -> bool:
    return jax.process_count() > 1


def is_main() -> bool:
    """Whether this process writes the run's outputs (artifact, metrics, pictures, report)."""
    return jax.process_index() == 0


def check_model(model) -> None:
    """Refuse, before any work, what does not run across processes yet: a head whose ``multi_process``
    is False, tiling, and a score ensemble."""
    if not is_multi_process():
        return
    if hasattr(model, "members"):  # a ScoreEnsemble (anomax.ensemble sits above this module)
        raise ConfigError("a score ensemble (ensemble.members) does not run on several processes yet; "
                          "use ensemble=off or distributed=off")
    if not model.head.multi_process:
        raise ConfigError(f"model.head.name = {model.head.name!r} does not run on several processes yet; "
                          "use distributed=off")
    if getattr(getattr(model, "tiling", None), "enabled", False):
        raise ConfigError("tiling does not run on several processes yet; use tiling=off or distributed=off")


def check_same_job(cfg: Mapping[str, Any], dataset, sections: Sequence[str]) -> None:
    """Every process must run the same job: one mistyped override on one host, or a host whose copy of
    the data lacks an image, would otherwise train a model that none of the configs describes, without
    an error. Compared across processes by digest: the top-level ``sections`` of the config (bar
    ``distributed``, where the processes differ, and ``dataset``, whose paths may differ by host) and
    each split's images (their paths below the dataset folder, labels and defect types)."""
    if not is_multi_process():
        return
    from jax.experimental import multihost_utils

    parts = {key: cfg.get(key) for key in sections if key not in ("dataset", "distributed")}
    # below the dataset folder, or (image lists) below the images' common folder: hosts may mount it elsewhere
    root = dataset.image_dir or os.path.commonpath([os.path.dirname(s.image_file_name) for s in dataset.samples])
    for split in ("train", "validation", "test"):
        parts[f"the {split} split's images"] = [
            (os.path.relpath(s.image_file_name, root), s.anomaly_label, s.defect_type, s.anomaly_file_name is not None)
            for s in dataset.samples if s.split == split]
    names = sorted(parts)
    digests = np.array([int.from_bytes(hashlib.sha256(json.dumps(parts[name], sort_keys=True, default=str)
                                                      .encode()).digest()[:4], "little", signed=True)
                        for name in names], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(digests))  # (processes, len(names))
    mismatch = everyone != everyone[0]
    differ = mismatch.any(axis=0)
    if differ.any():
        others = np.flatnonzero(mismatch.any(axis=1)).tolist()
        raise ConfigError(f"the processes do not run the same job: process{'es' * (len(others) > 1)} "
                          f"{', '.join(map(str, others))} differ{'s' * (len(others) == 1)} from process 0 in "
                          f"{', '.join(name for name, d in zip(names, differ) if d)}; give every process the same "
                          f"overrides (distributed.* apart) and the same dataset")


def part(count: int, process: int | None = None, processes: int | None = None) -> slice:
    """This process's contiguous share of ``count`` items: shares differ by at most one, and
    the parts of processes 0, 1, ... follow each other in order (so global order is kept)."""
    process = jax.process_index() if process is None else process
    processes = jax.process_count() if processes is None else processes
    size, extra = divmod(count, processes)
    start = process * size + min(process, extra)
    return slice(start, start + size + (process < extra))


def local_count(count: int) -> int:
    """How many of ``count`` items this process reads."""
    share = part(count)
    return share.stop - share.start


def local_batches(dataset, split: str, params, batch_size: int, **options: Any):
    """Fixed-shape batches of this process's part of ``split``, ``batch_size // process_count``
    images each, 'index' counted in the whole split; every process yields the same number of
    batches (the processes with fewer images add all-padding ones), as each global batch is one
    collective step. One process: exactly ``iterate_batches``."""
    from anomax.preprocess.cache import iterate_batches

    processes = jax.process_count()
    if processes == 1:
        return iterate_batches(dataset, split, params, batch_size, **options)
    if batch_size % processes:
        raise ConfigError(f"batch_size = {batch_size} must be a multiple of the {processes} processes")
    samples = dataset.samples_of(split)
    mine, local_size = part(len(samples)), batch_size // processes
    count = -(-(-(-len(samples) // processes)) // local_size)  # batches of the largest part
    local = dataclasses.replace(dataset, samples=samples[mine])
    return _PaddedBatches(iterate_batches(local, split, params, local_size, **options) if local.samples else [],
                          count, mine.start, (local_size, params.height, params.width, params.num_channels))


class _PaddedBatches:
    """A process's batches with split-wide indices, topped up to ``count`` with padding."""

    def __init__(self, batches, count: int, offset: int, image_shape: tuple[int, ...]):
        self.batches, self.count, self.offset, self.image_shape = batches, count, offset, image_shape

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        last = None
        for last in self.batches:
            yield {**last, "index": last["index"] + np.int32(self.offset)}
        if last is None:  # no images here at all: padding of the right shapes
            size = self.image_shape[0]
            last = {"image": np.zeros(self.image_shape, np.float32),
                    "mask": np.zeros(self.image_shape[:3], np.uint8), "label": np.zeros(size, np.int32),
                    "index": np.zeros(size, np.int32)}
        for _ in range(self.count - len(self.batches)):
            yield {**last, "index": last["index"] + np.int32(self.offset), "valid": np.zeros(len(last["index"]), bool)}
