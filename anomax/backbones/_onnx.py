"""Read the weights of an ONNX file, and nothing else of it.

ONNX is protobuf, so parsing runs no code. Of the graph only the initializers are
taken (name -> float array). Exporters give the matrices of ``x @ W`` anonymous
names (``onnx::MatMul_1966``); such a tensor is named after the one node that
consumes it, in dotted form (``/backbone/encoder/layer.0/attention/attention/query/MatMul``
-> ``backbone.encoder.layer.0.attention.attention.query.MatMul``), which says which
layer it belongs to. Nothing else of the nodes is read, and nothing is executed.

Refused, with a WeightsError naming the file and the tensor: tensors stored outside
the file (external data names a path, which could point anywhere), tensors without
inline data, non-float dtypes, a file that does not parse (truncated or damaged).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from anomax.errors import WeightsError


def _onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise WeightsError(f"{path}: reading ONNX weights needs the 'onnx' package; run `pip install onnx`") from None
    return onnx


def _model(path: Path, onnx):
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:  # ModelProto.FromString parses bytes only; onnx.load would also follow external-data paths
        model = onnx.ModelProto.FromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{path}: not a readable ONNX file ({type(error).__name__}: {error}); the file is "
                           "truncated or damaged, fetch it again") from None
    if not model.graph.initializer:
        raise WeightsError(f"{path}: the ONNX graph holds no initializers, so no weights to read")
    return model


def _array(tensor, path: Path, onnx) -> np.ndarray:
    proto = onnx.TensorProto
    floats = {proto.FLOAT, proto.FLOAT16, proto.DOUBLE, proto.BFLOAT16}
    if tensor.data_location == proto.EXTERNAL or tensor.external_data:
        raise WeightsError(f"{path}: tensor '{tensor.name}' refers to data outside the file; refused (only "
                           "weights stored inside the ONNX file are read)")
    if tensor.data_type not in floats:
        dtype = proto.DataType.Name(tensor.data_type) if tensor.data_type in proto.DataType.values() \
            else tensor.data_type
        raise WeightsError(f"{path}: tensor '{tensor.name}' has dtype {dtype}; only float weights are read")
    halves = tensor.data_type in (proto.FLOAT16, proto.BFLOAT16) and not tensor.raw_data
    if any(d < 0 for d in tensor.dims) or (halves and any(not 0 <= v <= 0xFFFF for v in tensor.int32_data)):
        # numpy would take a -1 dim as "infer it", and wrap 16-bit values stored out of range
        raise WeightsError(f"{path}: tensor '{tensor.name}' {list(tensor.dims)} is damaged (negative dimensions or "
                           f"16-bit values out of range)")
    try:
        return np.asarray(onnx.numpy_helper.to_array(tensor), np.float32)
    except (ValueError, TypeError) as error:  # e.g. raw bytes that do not fill the declared shape
        raise WeightsError(f"{path}: tensor '{tensor.name}' {list(tensor.dims)} is damaged ({error})") from None


def read_onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The initializers of an ONNX file as float32 arrays; anonymous ones named by their consumer."""
    path = Path(path)
    onnx = _onnx(path)
    graph = _model(path, onnx).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node.name)
    weights: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        name = tensor.name
        users = consumers.get(name, [])
        if name.startswith("onnx::") and len(users) == 1 and users[0]:
            name = users[0].strip("/").replace("/", ".")
        if name in weights:
            raise WeightsError(f"{path}: two initializers are both named or consumed as '{name}'; the file is "
                               "not a plain exported network")
        weights[name] = _array(tensor, path, onnx)
    return weights
