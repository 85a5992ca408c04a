"""Read PyTorch and safetensors checkpoints into numpy arrays, without torch.

A ``.pth`` file is a pickle, and unpickling can run arbitrary code. The reader
admits only the handful of globals a tensor checkpoint needs and refuses the
rest, so a crafted file fails before anything of it runs.

Two PyTorch serialisations exist:
- legacy (torch < 1.6, still what the offline weight packages ship): five pickles
  back to back (magic, protocol, sys info, the object, the storage keys), then for
  every storage an int64 element count and its raw bytes;
- zip (torch >= 1.6): ``<prefix>/data.pkl`` plus one raw file ``<prefix>/data/<key>``
  per storage.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from anomax.errors import WeightsError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    array: np.ndarray | None = None  # filled when the bytes are read


@dataclass(frozen=True)
class _TensorRef:
    """A tensor waiting for its storage (legacy files store the bytes after the pickle)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
} | {("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, persistent_load):
        super().__init__(file)
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self._path}: refused to load, the pickle asks for '{module}.{name}', which a "
                "tensor checkpoint never needs; the file may be malicious, do not use it"
            ) from None

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _storage_from_pid(pid, path: Path, storages: dict[str, _Storage]) -> _Storage:
    if not (isinstance(pid, tuple) and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise WeightsError(f"{path}: unexpected persistent id {pid!r}; not a tensor checkpoint")
    storage_type, key, _location, numel = pid[1:5]
    root = storages.setdefault(str(key), _Storage(storage_type.dtype, int(numel)))
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # legacy storage views: (view key, element offset, size) into the root
        raise WeightsError(f"{path}: storage views are not supported; re-save the weights with torch.save")
    return root


def _materialize(obj, path: Path):
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, path)
    if isinstance(obj, dict):
        return {key: _materialize(value, path) for key, value in obj.items()}
    return obj


def _tensor_array(ref: _TensorRef, path: Path) -> np.ndarray:
    data = ref.storage.array
    if len(ref.shape) != len(ref.stride) or any(n < 0 for n in ref.shape) or ref.offset < 0:
        raise WeightsError(f"{path}: a tensor has a negative size or offset; the file is damaged")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else -1
    if data is None or last >= data.size or any(s < 0 for s in ref.stride):
        raise WeightsError(f"{path}: a tensor points outside its storage; the file is truncated or damaged")
    size = int(np.prod(ref.shape))
    if ref.stride == tuple(np.cumprod((1,) + ref.shape[:0:-1])[::-1]):  # C-contiguous: a view, no copy
        return data[ref.offset:ref.offset + size].reshape(ref.shape)
    strides = tuple(s * data.itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(data[ref.offset:], ref.shape, strides).copy()


def _load_legacy(path: Path, file) -> object:
    storages: dict[str, _Storage] = {}

    def load(persistent=None):
        return _RestrictedUnpickler(file, path, persistent or (lambda pid: None)).load()

    if load() != _LEGACY_MAGIC:
        raise WeightsError(f"{path}: not a PyTorch checkpoint (no magic number at the start)")
    load(), load()  # protocol version and sys info
    result = load(lambda pid: _storage_from_pid(pid, path, storages))
    for key in load():
        storage = storages[str(key)]
        numel = int.from_bytes(file.read(8), "little")
        raw = file.read(numel * storage.dtype.itemsize)
        if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
            raise WeightsError(f"{path}: storage {key} is truncated; download the file again")
        storage.array = np.frombuffer(raw, storage.dtype)
    return result


def _load_zip(path: Path) -> object:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pickle_name is None:
            raise WeightsError(f"{path}: zip archive without data.pkl; not a PyTorch checkpoint")
        prefix = pickle_name[: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() else "little"

        def storage(pid):
            root = _storage_from_pid(pid, path, storages)
            if root.array is None:
                raw = archive.read(f"{prefix}data/{pid[2]}")
                dtype = root.dtype.newbyteorder("<" if byteorder == "little" else ">")
                root.array = np.frombuffer(raw, dtype).astype(root.dtype, copy=False)
            return root

        with archive.open(pickle_name) as file:
            return _RestrictedUnpickler(io.BytesIO(file.read()), path, storage).load()


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: cannot read safetensors file ({error}); download it again") from error


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a ``.pth`` (legacy or zip) or ``.safetensors`` checkpoint, by name."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        else:
            with open(path, "rb") as file:
                result = _load_legacy(path, file)
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(result, dict) and isinstance(result.get(wrapper), dict):
                result = result[wrapper]
        state = _materialize(result, path) if isinstance(result, dict) else None
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError,
            IndexError, AttributeError) as error:
        raise WeightsError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error}); "
                           "the file is damaged or not a PyTorch state dict") from error
    if not state or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a flat state dict of tensors (name -> tensor)")
    return state
