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

A tiny hostile file must not cost much either. Every size a file declares is checked
against the bytes it has before anything is allocated; tensors are views into those
bytes; each pickle is walked once before it is loaded, to bound its nesting; and
nothing the pickle can reach can be modified by it. Every failure is a WeightsError
that names the file.
"""
from __future__ import annotations

import collections
import copy
import io
import math
import pickle
import pickletools
import warnings
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from anomax.errors import WeightsError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_DEPTH = 64  # torch's pickles nest about 6 levels (dict > tensor > arguments > size); checkpoints wrap a few more
_MAX_DIMS = 64  # numpy's limit
_MAX_INFLATION = 10  # torch stores zip entries uncompressed; re-zipped weights shrink < 2x, a zip bomb ~1000x

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
_SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


class _Refused(Exception):
    """The checkpoint is damaged or hostile; ``load_state_dict`` adds the file's name."""


class _Sealed:
    """Base of every object a pickle can reach other than plain data. BUILD (``__setstate__``) on one is
    refused, so a checkpoint cannot change how it, or any later checkpoint, is read."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"refused to load, the pickle tries to modify {self}, which a tensor checkpoint never "
                       "does; the file may be malicious, do not use it")


class _Function(_Sealed):
    """An allowlisted callable global."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name, self.function = name, function

    def __call__(self, *args):
        return self.function(*args)

    def __str__(self):
        return self.name


class _StorageType(_Sealed):
    """``torch.<X>Storage``: only ever named in a storage's persistent id."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __str__(self):
        return self.name


class _Storage(_Sealed):
    __slots__ = ("key", "dtype", "numel", "array")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None  # filled when the bytes are read

    def __str__(self):
        return f"storage {self.key}"


class _TensorRef(_Sealed):
    """A tensor waiting for its storage (legacy files store the bytes after the pickle)."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __str__(self):
        return "a tensor"


def _is_index(value) -> bool:
    return type(value) is int and value >= 0


def _is_shape(value) -> bool:
    return type(value) in (tuple, list) and len(value) <= _MAX_DIMS and all(map(_is_index, value))


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not (isinstance(storage, _Storage) and _is_index(storage_offset) and _is_shape(size) and _is_shape(stride)
            and len(size) == len(stride)):
        raise _Refused("a tensor is not described by a storage, an offset, a size and a stride; the file is damaged")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Function("collections.OrderedDict", collections.OrderedDict),
    ("torch._utils", "_rebuild_tensor"): _Function("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Function("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Function("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function("torch._utils._rebuild_parameter_with_state",
                                                                 _rebuild_parameter),
} | {("torch", name): _StorageType(f"torch.{name}", dtype) for name, dtype in _STORAGE_DTYPES.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load=None):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load, the pickle asks for '{module:.100}.{name:.100}', which a tensor "
                           "checkpoint never needs; the file may be malicious, do not use it") from None

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise _Refused("a storage outside the tensor pickle; not a PyTorch checkpoint")
        return self._persistent_load(pid)


_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below them


def _check_pickle(stream: io.BytesIO) -> None:
    """Walk one pickle's opcodes up to its STOP without building anything, refusing what would let a
    small file cost much memory or crash the C unpickler:

    - a length the file does not back (pickletools reads only the bytes that are there);
    - a memo index beyond the pickle's length (the unpickler allocates and clears a table that large);
    - nesting deeper than _MAX_DEPTH (the unpickler hashes nested tuples recursively, without a guard).
    """
    stack: list[int] = []  # nesting depth of each entry
    marks: list[int] = []
    memo: dict[int, int] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if index > count:  # picklers number their memo entries 0, 1, 2, ...
                raise _Refused(f"the pickle stores an object at memo index {index}, beyond its own length; "
                               "the file may be malicious, do not use it")
            memo[index] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
            stack.append(stack[-1] if name == "DUP" else memo[arg])
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:  # takes the entries above the last mark, and some below it
                taken = before.index(pickletools.markobject)
                bottom = marks.pop()
            else:
                taken, bottom = len(before), len(stack)
            if taken > bottom:
                raise _Refused("the pickle takes more objects than it made; the file is damaged")
            args = stack[bottom - taken:]
            del stack[bottom - taken:]
            if name in _MUTATORS:
                depth = max([args[0]] + [d + 1 for d in args[1:]])
            else:
                depth = 1 + max(args) if args else 0
            if depth > _MAX_DEPTH:
                raise _Refused(f"the pickle nests objects deeper than {_MAX_DEPTH} levels, which no tensor "
                               "checkpoint does; the file may be malicious, do not use it")
            stack.extend([depth] * len(opcode.stack_after))


def _unpickle(stream: io.BytesIO, persistent_load=None):
    """The next pickle in ``stream``, checked, then loaded with only the allowlisted globals."""
    start = stream.tell()
    with warnings.catch_warnings():  # bad escapes in a damaged string are the file's fault, not a note for the user
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            _check_pickle(stream)
        except (IndexError, KeyError):
            raise _Refused("the pickle uses objects it never made; the file is damaged") from None
        end = stream.tell()
        stream.seek(start)
        result = _RestrictedUnpickler(stream, persistent_load).load()
    stream.seek(end)
    return result


def _storage_from_pid(pid, storages: dict[str, _Storage]) -> _Storage:
    if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and type(pid[2]) in (str, int) and _is_index(pid[4])):
        raise _Refused("a persistent id that is not a tensor storage; not a PyTorch checkpoint")
    if len(pid) > 5 and pid[5] is not None:  # legacy storage views: (view key, element offset, size) into a root
        raise _Refused("storage views are not supported; re-save the weights with torch.save")
    key = str(pid[2])
    return storages.setdefault(key, _Storage(key, pid[1].dtype, pid[4]))


def _tensor_array(ref: _TensorRef) -> np.ndarray:
    """The tensor as a read-only view of its storage's bytes: no tensor costs more memory than the file."""
    data = ref.storage.array
    if data is None:
        raise _Refused(f"a tensor's {ref.storage} is missing; the file is truncated or damaged")
    count = math.prod(ref.shape)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if count * data.itemsize > data.nbytes or (count and last >= data.size):
        raise _Refused(f"a tensor of shape {ref.shape} and stride {ref.stride} at offset {ref.offset} "
                       f"reaches beyond its {ref.storage} of {data.size} elements; the file is damaged")
    if not count:
        return np.zeros(ref.shape, data.dtype)
    if ref.stride == tuple(math.prod(ref.shape[i + 1:]) for i in range(len(ref.shape))):  # C-contiguous
        return data[ref.offset:ref.offset + count].reshape(ref.shape)
    strides = tuple(s * data.itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(data[ref.offset:], ref.shape, strides, writeable=False)


def _state_dict(result) -> dict[str, np.ndarray]:
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(result, dict) and isinstance(result.get(wrapper), dict):
            result = result[wrapper]
    if not (isinstance(result, dict) and result
            and all(type(name) is str and isinstance(ref, _TensorRef) for name, ref in result.items())):
        raise _Refused("does not hold a flat state dict of tensors (name -> tensor)")
    arrays: dict[int, np.ndarray] = {}  # by tensor: one the pickle shares under several names becomes one array
    for ref in result.values():
        if id(ref) not in arrays:
            arrays[id(ref)] = _tensor_array(ref)
    return {name: arrays[id(ref)] for name, ref in result.items()}


def _load_legacy(data: bytes) -> object:
    stream = io.BytesIO(data)
    storages: dict[str, _Storage] = {}
    if _unpickle(stream) != _LEGACY_MAGIC:
        raise _Refused("not a PyTorch checkpoint (no magic number at the start)")
    _unpickle(stream), _unpickle(stream)  # protocol version and sys info
    result = _unpickle(stream, lambda pid: _storage_from_pid(pid, storages))
    keys = _unpickle(stream)
    if type(keys) is not list or not all(type(key) in (str, int) and str(key) in storages for key in keys):
        raise _Refused("the storage list does not match the tensors; the file is damaged")
    offset = stream.tell()
    for key in keys:
        storage = storages[str(key)]
        numel = int.from_bytes(data[offset:offset + 8], "little")
        offset += 8
        if numel != storage.numel or offset + numel * storage.dtype.itemsize > len(data):
            raise _Refused(f"{storage} declares {storage.numel} elements ({numel} in its header) of "
                           f"{storage.dtype.itemsize} bytes, but the file has {len(data) - offset} bytes left; "
                           "it is truncated or damaged, download it again")
        storage.array = np.frombuffer(data, storage.dtype, numel, offset)
        offset += numel * storage.dtype.itemsize
    return result


class _ZipEntries:
    """The entries of a torch zip archive, each read up to what it declares, all together up to a multiple
    of the archive's own size."""

    def __init__(self, archive: zipfile.ZipFile, archive_size: int):
        self.archive, self.allowance = archive, _MAX_INFLATION * archive_size

    def read(self, name: str, size: int | None = None) -> bytes:
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise _Refused(f"the archive lacks {name}; it is damaged") from None
        if info.flag_bits & 1:
            raise _Refused(f"{name} is encrypted, which torch never writes")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(f"{name} uses compression method {info.compress_type}, which torch never writes")
        if size is not None and info.file_size != size:
            raise _Refused(f"{name} holds {info.file_size} bytes, but its storage declares {size}; the file is damaged")
        if info.file_size > self.allowance:
            raise _Refused(f"{name} declares {info.file_size} bytes, more than {_MAX_INFLATION}x the archive's size "
                           "allows; the file may be a zip bomb, do not use it")
        self.allowance -= info.file_size
        larger = copy.copy(info)
        larger.file_size += 1  # read one byte past the declared size: getting it means the entry holds more
        try:
            with self.archive.open(larger) as entry:
                raw = entry.read(larger.file_size)  # zipfile inflates in bounded pieces up to this size
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
            raise _Refused(f"{name} is damaged ({error}); download the file again") from None
        if len(raw) != info.file_size:
            raise _Refused(f"{name} inflates to {'more' if len(raw) > info.file_size else 'less'} than the "
                           f"{info.file_size} bytes it declares; the file is damaged")
        return raw


def _load_zip(path: Path) -> object:
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pickle_name is None:
            raise _Refused("zip archive without data.pkl; not a PyTorch checkpoint")
        prefix = pickle_name[: -len("data.pkl")]
        entries = _ZipEntries(archive, path.stat().st_size)
        byteorder = entries.read(prefix + "byteorder") if prefix + "byteorder" in archive.namelist() else b"little"
        if byteorder not in (b"little", b"big"):
            raise _Refused(f"{prefix}byteorder says neither little nor big; the file is damaged")

        def storage(pid):
            root = _storage_from_pid(pid, storages)
            if root.array is None:
                raw = entries.read(f"{prefix}data/{root.key}", root.numel * root.dtype.itemsize)
                dtype = root.dtype.newbyteorder("<" if byteorder == b"little" else ">")
                root.array = np.frombuffer(raw, dtype).astype(root.dtype, copy=False)
            return root

        return _unpickle(io.BytesIO(entries.read(pickle_name)), storage)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as file:
            for name in file.keys():
                dtype = file.get_slice(name).get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise _Refused(f"tensor {name!r:.100} has dtype {dtype:.20}, which anomax does not read "
                                   f"({', '.join(_SAFETENSORS_DTYPES)}); convert the weights to float32")
            return {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise _Refused(f"cannot read safetensors file ({error}); download it again") from None


_DAMAGE = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, ValueError, TypeError,
           IndexError, AttributeError, OverflowError, OSError)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a ``.pth`` (legacy or zip) or ``.safetensors`` checkpoint, by name (read-only arrays)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        return _state_dict(_load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path.read_bytes()))
    except _Refused as error:
        raise WeightsError(f"{path}: {error}") from None
    except _DAMAGE as error:
        raise WeightsError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error}); "
                           "the file is damaged or not a PyTorch state dict") from error
