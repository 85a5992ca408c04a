"""The torch-free checkpoint reader: both torch serialisations, safetensors, refusal of code, damage."""
import collections
import io
import os
import pickle
import struct
import zipfile

import jax
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
    def __init__(self, key, array):
        self.key, self.array = key, np.asarray(array).ravel()


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
        pid = ("storage", Global("torch", STORAGE_NAMES[obj.array.dtype]), obj.key, "cpu", obj.array.size)
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


def write_legacy(path, tensors, payload=None):
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, file, protocol=2)
        TorchPickler(file, legacy=True).dump(tensors if payload is None else payload)
        storages = storages_of(tensors)
        pickle.dump([s.key for s in storages], file, protocol=2)
        for storage in storages:
            file.write(struct.pack("<q", storage.array.size) + storage.array.tobytes())


def write_zip(path, tensors, payload=None):
    pickled = io.BytesIO()
    TorchPickler(pickled, legacy=False).dump(tensors if payload is None else payload)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for storage in storages_of(tensors):
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())


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


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(WeightsError, match=str(path)):
        load_state_dict(path)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
