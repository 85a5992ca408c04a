"""The whole inference as one ONNX graph: preprocessed images -> anomaly maps and scores.

``export_onnx`` converts ``AnomalyModel.infer`` (backbone -> adaptor -> head -> upsampled,
smoothed ``anomaly_image`` -> ``anomaly_score``) with jax2onnx, so every head exports the
same way and nothing here knows a head's internals.

Graph interface::

    input   images          float32 (batch, height, width, channels), preprocessed
    outputs anomaly_image   float32 (batch, height, width)
            anomaly_score   float32 (batch,)
            ...             any further map the head returns, under its result key

``batch`` is a symbolic dimension unless ``batch_size`` is given. Preprocessing (domain,
channels, resize, normalisation) stays on the host, as in the JAX path: its parameters,
the thresholds and the output names are JSON in the file's metadata (``metadata_props``
'anomax.preprocess', 'anomax.thresholds', 'anomax.outputs'), so a program without anomax
can prepare images exactly as ``anomax.preprocess_image`` does.

Four pieces are traced in a form the converter and the runtimes handle well, with the same
numbers to float rounding (see ``_export_formulations``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from anomax._global_state import root_logger_kept
from anomax.deploy.runtimes import refuse_deployed
from anomax.errors import ConfigError
from anomax.files import check_output_folder, write_bytes_atomic
from anomax.settings import is_integer

DEFAULT_OPSET = 18  # onnxruntime >= 1.14, OpenVINO >= 2023.1
MIN_OPSET, MAX_OPSET = 17, 23  # the range jax2onnx and both runtimes are tested on here
INPUT_NAME = "images"
BATCH = "batch"
BYPASSED_SHIMS = ("jax.image.resize", "jax.numpy.full")  # jax2onnx shims that need constant shapes


def export_onnx(model, path: str | os.PathLike, *, batch_size: int | None = None, height: int | None = None,
                width: int | None = None, opset: int | None = None, domain_file: str | None = None) -> Path:
    """Write ``model``'s inference (an AnomalyModel with a fitted head) as an ONNX file at ``path``.

    batch_size: None gives a symbolic batch dimension (any batch at run time), an integer fixes it.
    height, width: the input size, default the model's preprocess size (the size it was fitted on).
    opset: the ONNX opset, default 18; an opset the converter cannot honour is an error, never
    silently another one. domain_file: the name of the domain mask file beside ``path``, for the
    metadata (save_model copies the mask in); None: the path the model's preprocess names. Needs
    ``pip install anomax[deploy]`` (jax2onnx). Returns ``path``.
    """
    refuse_deployed(model, "export_onnx")
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"export_onnx: opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}")
    for key, value in (("batch_size", batch_size), ("height", height), ("width", width)):
        if value is not None and (not is_integer(value) or value < 1):
            raise ConfigError(f"export_onnx: {key} must be null or an integer >= 1, got {value!r}")
    if getattr(getattr(model, "tiling", None), "enabled", False):
        raise ConfigError("export_onnx: tiled models are not exportable yet (the graph would score one tile, "
                          "not the whole image); export an untiled model")
    check_output_folder(path)  # before the conversion (about a minute at 256 x 256), not after it
    to_onnx = _converter()
    preprocess = model.preprocess
    height, width = int(height or preprocess.height), int(width or preprocess.width)
    params = jax.tree.map(jnp.asarray, model.params)
    shape = (BATCH if batch_size is None else int(batch_size), height, width, preprocess.num_channels)
    outputs = sorted(model.output_shapes(height, width))  # jax flattens a dict in key order

    # root_logger_kept: jax2onnx logs through the root logger (which would get a stderr handler for good)
    with _export_formulations(), warnings.catch_warnings(), root_logger_kept:
        warnings.simplefilter("ignore", DeprecationWarning)  # jax2onnx's use of older flax APIs
        proto = to_onnx(lambda images: model.infer(params, images), [shape], model_name="anomax", opset=opset,
                        input_names=[INPUT_NAME], output_names=outputs)
    # jax2onnx's transpose folding can leave stale NHWC shapes on NCHW values; the annotations are
    # optional and the runtimes infer their own, so drop them rather than let a runtime trust them.
    del proto.graph.value_info[:]
    _check_opset(proto, opset)
    _check_batch(proto, batch_size)
    metadata = {
        "anomax.version": _version(),
        "anomax.head": model.head.name,
        "anomax.backbone": model.backbone.name,
        "anomax.preprocess": json.dumps({**preprocess.to_dict(), "height": height, "width": width,
                                         **({"domain": domain_file} if domain_file is not None else {})}),
        "anomax.thresholds": json.dumps({key: float(value) for key, value in model.thresholds.items()}),
        "anomax.outputs": json.dumps(outputs),
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return write_bytes_atomic(path, proto.SerializeToString())


def _converter():
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ConfigError("export_onnx needs jax2onnx: pip install 'anomax[deploy]'") from None
    return to_onnx


def _version() -> str:
    from anomax import __version__

    return __version__


@contextlib.contextmanager
def _export_formulations():
    """Trace four pieces in the form the converter and the runtimes handle, same numbers:

    - depthwise convolutions as one grouped convolution (ONNX Conv group=C) instead of the k²
      shifted multiply-adds that are fast on XLA:CPU: a graph ~10x smaller, converted ~3x faster;
    - the average poolings of the adaptor and of efficientad's PDN (lax.reduce_window, which
      jax2onnx turns into a 6-D Conv that OpenVINO rejects) as grouped convolutions with a constant
      1/size² kernel, which the runtimes run in their own channel-blocked layout (shifted slices of
      the NHWC map cost them transposes). JAX keeps reduce_window: a reshape-and-mean would export
      too, but trains the PDN 7-13 % slower per epoch on XLA:CPU;
    - ResNet's stem max-pool (nnx.max_pool, whose jax2onnx shim takes string padding only) as the
      maximum of its size² strided slices of the -inf padded map: the same values;
    - jax.image.resize and jnp.full through JAX's own implementations (BYPASSED_SHIMS): jax2onnx's
      shims for them need a constant batch size.

    jax2onnx swaps in tracing shims (its own primitives) while it converts; functions jitted inside
    the model (the anomaly map, the neighbour search) would keep the shimmed trace in JAX's cache,
    so the caches are cleared before and after: the next JAX call compiles afresh.
    """
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY, import_all_plugins

    from anomax import features
    from anomax.backbones import _layers
    from anomax.heads import _pdn

    import_all_plugins()
    swaps = [(_layers, "depthwise_conv", _grouped_depthwise_conv), (features, "average_pool", _grouped_average_pool),
             (_pdn, "average_pool", _grouped_strided_average_pool), (_layers, "max_pool", _sliced_max_pool)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    bypassed = {name: PLUGIN_REGISTRY.pop(name) for name in BYPASSED_SHIMS if name in PLUGIN_REGISTRY}
    jax.clear_caches()
    try:
        for module, name, replacement in swaps:
            setattr(module, name, replacement)
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
        PLUGIN_REGISTRY.update(bypassed)
        jax.clear_caches()


def _grouped_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """anomax.backbones._layers.depthwise_conv as a grouped lax convolution (kernel (k, k, 1, C))."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, feature_group_count=x.shape[-1],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _grouped_average_pool(x: jax.Array, size: int) -> jax.Array:
    """anomax.features.average_pool (size x size mean, stride 1, zero padding counted) as a grouped
    convolution with weights 1/size²."""
    if size == 1:
        return x
    kernel = np.full((size, size, 1, x.shape[-1]), 1.0 / (size * size), np.float32)
    return _grouped_depthwise_conv(x, jnp.asarray(kernel), 1, [(size // 2, size // 2)] * 2)


def _grouped_strided_average_pool(x: jax.Array, factor: int) -> jax.Array:
    """anomax.heads._pdn.average_pool (factor x factor mean, stride factor, zeros padded at the end
    and counted) as a grouped convolution with weights 1/factor²."""
    if factor == 1:
        return x
    height, width, channels = x.shape[1:]
    kernel = np.full((factor, factor, 1, channels), 1.0 / (factor * factor), np.float32)
    return _grouped_depthwise_conv(x, jnp.asarray(kernel), factor, [(0, -height % factor), (0, -width % factor)])


def _sliced_max_pool(x: jax.Array, size: int, stride: int, padding: int) -> jax.Array:
    """anomax.backbones._layers.max_pool as the maximum of size² strided slices of the -inf padded map."""
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    rows, cols = (x.shape[1] - size) // stride + 1, (x.shape[2] - size) // stride + 1
    slices = [x[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride, :]
              for i in range(size) for j in range(size)]
    return functools.reduce(jnp.maximum, slices)


def _check_opset(proto, opset: int) -> None:
    written = {entry.domain: entry.version for entry in proto.opset_import}.get("", None)
    if written != opset:
        raise ConfigError(f"export_onnx: opset {opset} was requested but the converter wrote opset {written}; "
                          f"choose an opset from {MIN_OPSET} to {MAX_OPSET} that it honours")


def _check_batch(proto, batch_size: int | None) -> None:
    """The input's batch dimension is what was asked: symbolic for None, else that number."""
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    ok = dim.dim_param == BATCH if batch_size is None else dim.dim_value == batch_size
    if not ok:
        raise ConfigError(f"export_onnx: the converter wrote batch dimension {dim} instead of "
                          f"{'a symbolic one' if batch_size is None else batch_size}")
