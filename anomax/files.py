"""File helpers every writer and reader of the project shares: content hashes and atomic writes.

An output is either complete or absent: each write goes to a temporary sibling that is
fsynced and renamed over the target, so a kill or a full disk never leaves half a file.
OS failures (disk full, read-only directory, permission) become an ``OutputError`` that
names the path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from anomax.errors import OutputError


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
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` atomically.
    On any failure the temporary file is removed and OS errors are re-raised as OutputError."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}; check free disk space and "
                          f"permissions of {path.parent}") from error
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with writing(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """JSON (indent 1, no NaN) written atomically."""
    return write_text_atomic(path, json.dumps(value, indent=1, allow_nan=False, default=default) + "\n")
