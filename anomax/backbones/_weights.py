"""Find a backbone's pretrained weights file: explicit path, local cache, weight package, upstream URL."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from anomax.errors import WeightsError
from anomax.files import sha256_file
from anomax.registry import BACKBONES

DOWNLOAD_TIMEOUT_S = 10


@dataclass(frozen=True)
class WeightsSource:
    """Where the ImageNet weights of one backbone live.

    ``file_name`` is the upstream name (torch hub style ``<name>-<sha256 prefix>.pth``),
    also used in the local cache; ``package`` is the importable package shipping the
    file at ``package_file``, installed with ``install``.
    """

    file_name: str
    url: str | None = None
    package: str | None = None
    package_file: str | None = None
    install: str | None = None

    @property
    def sha256_prefix(self) -> str | None:
        match = re.search(r"-([0-9a-f]{8,64})\.", self.file_name)
        return match.group(1) if match else None


def weights_cache_dir() -> Path:
    return Path(os.environ.get("ANOMAX_WEIGHTS_DIR", Path.home() / ".cache" / "anomax" / "weights"))


@functools.lru_cache(maxsize=32)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # size and mtime are only the cache key: a rewritten file is hashed again


def file_sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def _package_file(source: WeightsSource) -> Path | None:
    if source.package is None:
        return None
    try:
        spec = importlib.util.find_spec(source.package)  # locates without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / source.package_file
    return path if path.is_file() else None


def _download(source: WeightsSource, target: Path) -> Path | None:
    """Fetch the upstream file into the cache; None when the internet is out of reach."""
    # a name of its own: the processes of one run may all fetch the same file at once
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                for block in iter(lambda: response.read(1 << 20), b""):
                    file.write(block)
    except (urllib.error.URLError, OSError):
        partial.unlink(missing_ok=True)
        return None
    partial.replace(target)
    return target


def _checked(path: Path, source: WeightsSource) -> Path:
    prefix = source.sha256_prefix
    if prefix and not file_sha256(path).startswith(prefix):
        raise WeightsError(f"{path}: sha256 does not start with {prefix} as its name promises; the file is "
                           f"damaged or not {source.file_name}. Delete it and fetch it again.")
    return path


def resolve_weights(name: str, pretrained: str | os.PathLike) -> Path:
    """The weights file for backbone ``name``: ``pretrained`` is a file path or ``'imagenet'``."""
    if str(pretrained) != "imagenet":
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone '{name}': weights file {path} not found; give an existing "
                               "file or pretrained: imagenet")
        return path
    source: WeightsSource | None = BACKBONES.get(name).weights
    if source is None:
        raise WeightsError(f"backbone '{name}' has no published ImageNet weights; set pretrained to a "
                           "weights file or to null")
    cached = weights_cache_dir() / source.file_name
    if cached.is_file():
        return _checked(cached, source)
    packaged = _package_file(source)
    if packaged is not None:
        return _checked(packaged, source)
    if source.url and _download(source, cached):
        return _checked(cached, source)
    ways = [f"put {source.file_name}" + (f" (from {source.url})" if source.url else "")
            + f" into {weights_cache_dir()} (or the folder named by $ANOMAX_WEIGHTS_DIR)"]
    if source.install:
        ways.append(f"run `{source.install}`")
    ways.append("set pretrained to the path of the weights file")
    raise WeightsError(f"backbone '{name}': ImageNet weights {source.file_name} not found and not "
                       f"downloadable here; " + ", or ".join(ways))
