"""File helpers every writer and reader of the project shares: content hashes, atomic writes, locks.

An output is either complete or absent: each write goes to a temporary sibling that is
fsynced and renamed over the target, so a kill or a full disk never leaves half a file.
OS failures (disk full, read-only directory, permission) become an ``OutputError`` that
names the path. A run directory belongs to one run (``claim_run_dir``).

Locks are ``flock`` locks: the kernel drops them when their process dies, so a killed run
never leaves a stale lock behind (POSIX only).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from anomax.errors import OutputError

log = logging.getLogger("anomax")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """OS errors raised in the block (disk full, read-only directory, permission) become an
    OutputError that names ``path``, the output being written."""
    try:
        yield
    except OSError as error:
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        raise OutputError(f"cannot write {path}: {error.strerror or error}{where}; check free disk space and "
                          f"permissions of {Path(path).parent}") from error


def check_output_folder(path: str | os.PathLike) -> None:
    """The folder ``path`` goes into exists: checked before a long computation whose result would be lost."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {'no such folder' if not folder.exists() else 'not a folder'}: "
                          f"{folder}; create it first")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` atomically.
    On any failure the temporary file is removed and OS errors are re-raised as OutputError."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with output_errors(path):
            yield temporary
            fsync_path(temporary)
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):  # never there, or the directory itself is unusable
            temporary.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with writing(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """JSON (indent 1, no NaN) written atomically."""
    return write_text_atomic(path, json.dumps(value, indent=1, allow_nan=False, default=default) + "\n")


NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # e.g. Lustre or NFS mounted without locking


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (an existing file or directory) for the block.
    wait=False: raise BlockingIOError at once if another process, or another open of it, holds it.
    On a file system without locks the block runs unlocked, with a warning."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno not in NO_LOCKS:
                raise
            log.warning("%s: the file system does not support locks; nothing guards against a concurrent writer",
                        path)
        yield
    finally:
        os.close(descriptor)  # releases the lock


RUN_LOCK = ".anomax-run.lock"
_FOR_THE_TASK: set[Path] = set()  # run directories an app claimed for the task it runs next


def _before_the_run(entry: Path) -> bool:
    """What may be in a run directory before the run starts: Hydra writes .hydra/ and the
    job's log (train.log) before it calls the task, and a crashed run leaves its lock."""
    return entry.name in (".hydra", RUN_LOCK) or (entry.suffix == ".log" and entry.is_file())


@contextlib.contextmanager
def claim_run_dir(path: str | os.PathLike, *, for_the_task: bool = False) -> Iterator[Path]:
    """Create the run directory ``path`` and hold it for one run; yields its absolute path.
    ``for_the_task``: an app claims it before Hydra writes into it, and the next claim of it in
    this process (its task's) takes it over instead of being refused.

    A second run into the same directory fails at once while this one holds it, and a directory
    that already holds another run's outputs (or anything else of the user's) is refused, naming
    what is there: runs never overwrite or mix with each other's files.
    """
    run_dir = Path(os.path.abspath(path))  # as Hydra names a job's output_dir: '..' folded
    if run_dir in _FOR_THE_TASK:  # the app claimed it before Hydra wrote .hydra/: its task takes it over, once
        _FOR_THE_TASK.discard(run_dir)
        yield run_dir
        return
    lock = run_dir / RUN_LOCK
    with output_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.touch()
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked(lock, wait=False))
        except BlockingIOError:
            raise _in_use(run_dir) from None
        _refuse_outputs(run_dir)
        with output_errors(lock):
            lock.write_text(f"{os.getpid()}\n")  # who holds it, for a second run's message
        if for_the_task:
            _FOR_THE_TASK.add(run_dir)
        try:
            yield run_dir
        finally:
            _FOR_THE_TASK.discard(run_dir)


def check_run_dir_unused(path: str | os.PathLike, key: str = "hydra.run.dir") -> None:
    """Refuse ``path`` early (claim_run_dir checks again under its lock) when another run holds it or
    it holds a finished run's outputs: Hydra writes .hydra/ into the run directory before the task
    starts, which would overwrite the earlier run's record of its config. ``key``: the setting that
    chose the directory, named in the refusal (a sweep's jobs: hydra.sweep.dir)."""
    run_dir = Path(path).absolute()
    if not run_dir.is_dir():
        return
    lock = run_dir / RUN_LOCK
    if lock.is_file():
        try:
            with locked(lock, wait=False):
                pass
        except BlockingIOError:
            raise _in_use(run_dir, key) from None
    _refuse_outputs(run_dir, key)


def _in_use(run_dir: Path, key: str = "hydra.run.dir") -> OutputError:
    owner = (run_dir / RUN_LOCK).read_text().strip() or "unknown"
    return OutputError(f"{run_dir} is in use by another anomax run (pid {owner}); give this run its own "
                       f"directory ({key}=...) or wait for that one to finish")


def _refuse_outputs(run_dir: Path, key: str = "hydra.run.dir") -> None:
    found = sorted(entry.name for entry in run_dir.iterdir() if not _before_the_run(entry))
    if found:
        raise OutputError(f"{run_dir} already holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}: "
                          f"a run writes only into a new or empty directory; choose another {key} "
                          f"or move those files away")
