"""An exported model.onnx run by onnxruntime or OpenVINO behind the AnomalyModel's ``apply``.

``anomax.load_model(dir, runtime='onnxruntime' | 'openvino')`` returns a ``DeployedModel``: the
same preprocessing (``preprocess_image`` on the host, from the artifact's preprocess params), the
same result dictionaries and the same thresholds as the JAX path; only the network runs elsewhere.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from anomax.errors import ArtifactError, ConfigError
from anomax.inference import apply_in_batches, checked_thresholds
from anomax.preprocess.params import PreprocessParams
from anomax.settings import is_integer

RUNTIMES = ("jax", "onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("f32", "default")  # 'default': the device's own choice (bf16 where the CPU has it)
INPUT_NAME = "images"


def refuse_deployed(model, action: str) -> None:
    """A model loaded with an ONNX runtime holds a graph, not the parameters ``action`` would write."""
    if isinstance(model, DeployedModel):
        raise ConfigError(f"{action}: a model loaded with runtime={model.runtime!r} runs its ONNX file and cannot be "
                          f"saved or exported; load the artifact with runtime='jax' for that (thresholds and "
                          f"batch size set with set_params are kept by save_model there)")


def _checked_threads(threads: Any) -> int | None:
    if threads is not None and (not is_integer(threads) or threads < 0):
        raise ConfigError(f"threads must be null (the runtime's default) or an integer >= 0, got {threads!r}")
    return None if threads is None else int(threads)


class DeployedModel:
    """preprocess params, thresholds and batch size as on AnomalyModel; ``apply`` and get/set_params alike."""

    runtime = ""

    def __init__(self, onnx_file: str | os.PathLike, preprocess: PreprocessParams,
                 thresholds: Mapping[str, float] | None = None, batch_size: int = 16):
        self.onnx_file = Path(onnx_file)
        self.preprocess = preprocess
        self.thresholds = dict(thresholds or {})
        self.batch_size = int(batch_size)
        self._fixed_batch: int | None = None  # the file's batch size when it was exported with one

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed float32 images (B, H, W, C) -> {'anomaly_image' (B, H, W), 'anomaly_score' (B,), ...}."""
        raise NotImplementedError

    def apply(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Raw images (H, W, C) uint8 -> one HALCON-style result dict per image, as AnomalyModel.apply."""
        return apply_in_batches(images, self.preprocess, self._fixed_batch or self.batch_size, self.run,
                                self.thresholds, pad="batch" if self._fixed_batch is not None else "none")

    def get_params(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "thresholds": dict(self.thresholds), "device": self.runtime}

    def set_params(self, *, batch_size: int | None = None, thresholds: Mapping[str, float] | None = None,
                   device: str | None = None) -> None:
        """As AnomalyModel.set_params; ``device`` is the runtime get_params names (it is chosen at load)."""
        if device is not None and device != self.runtime:
            raise ConfigError(f"model parameter 'device' of a model run by {self.runtime} is {self.runtime!r}, got {device!r}; "
                              f"choose the runtime when loading: anomax.load_model(path, runtime=...)")
        if batch_size is not None:
            if not is_integer(batch_size) or batch_size < 1:
                raise ConfigError(f"model parameter 'batch_size' must be an integer >= 1, got {batch_size!r}")
            self.batch_size = int(batch_size)
        if thresholds is not None:
            self.thresholds = checked_thresholds(thresholds)  # the same rule as AnomalyModel.set_params

    def _refused(self, error: Exception) -> ArtifactError:
        return ArtifactError(f"{self.onnx_file} is not a loadable ONNX model ({type(error).__name__}: "
                             f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                             f"export it again (anomax.save_model(..., onnx=True))")


class OnnxRuntimeModel(DeployedModel):
    """threads: onnxruntime's intra-op threads (None: its default, one per physical core)."""

    runtime = "onnxruntime"

    def __init__(self, onnx_file, preprocess, thresholds=None, batch_size=16, *, threads: int | None = None):
        super().__init__(onnx_file, preprocess, thresholds, batch_size)
        threads = _checked_threads(threads)
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the converter's unused initializers are not news
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.onnx_file), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
            raise self._refused(error) from None
        self.outputs = [output.name for output in self.session.get_outputs()]
        batch = self.session.get_inputs()[0].shape[0]
        self._fixed_batch = batch if isinstance(batch, int) else None

    def run(self, images):
        return dict(zip(self.outputs, self.session.run(self.outputs, {INPUT_NAME: np.asarray(images, np.float32)})))


class OpenVinoModel(DeployedModel):
    """precision: 'f32' (results match JAX to float rounding) or 'default', the device's default
    inference precision (bf16 on CPUs with AMX / AVX512-BF16: faster, scores move, see the README)."""

    runtime = "openvino"

    def __init__(self, onnx_file, preprocess, thresholds=None, batch_size=16, *, precision: str = "f32",
                 device: str = "CPU", threads: int | None = None):
        super().__init__(onnx_file, preprocess, thresholds, batch_size)
        if precision not in OPENVINO_PRECISIONS:
            raise ConfigError(f"openvino precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
        threads = _checked_threads(threads)
        ov = _import("openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        try:
            network = core.read_model(str(self.onnx_file))
        except Exception as error:  # OpenVINO raises RuntimeError for unreadable files and failed conversions
            raise self._refused(error) from None
        try:
            self.compiled = core.compile_model(network, device, config)
        except Exception as error:  # the file was read: the device or its plugin failed ('AUTO', 'MULTI:..' are devices too)
            reason = [line for line in str(error).splitlines() if line.strip()]
            raise ConfigError(f"openvino could not compile {self.onnx_file} for device {device!r} "
                              f"({reason[-1] if reason else type(error).__name__}); devices here: "
                              f"{core.available_devices}") from None
        self.precision = precision
        self.outputs = [output.get_any_name() for output in self.compiled.outputs]
        batch = self.compiled.inputs[0].get_partial_shape()[0]
        self._fixed_batch = batch.get_length() if batch.is_static else None
        self._request = self.compiled.create_infer_request()

    def run(self, images):
        out = self._request.infer({INPUT_NAME: np.ascontiguousarray(images, np.float32)})
        return {name: np.array(out[output]) for name, output in zip(self.outputs, self.compiled.outputs)}


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def load_runtime(onnx_file: str | os.PathLike, preprocess: PreprocessParams, thresholds: Mapping[str, float],
                 batch_size: int, runtime: str, **options) -> DeployedModel:
    """The model.onnx of an artifact in ``runtime`` ('onnxruntime' or 'openvino'); options go to
    its class (threads; precision and device for OpenVINO)."""
    check_runtime(runtime)
    classes = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}
    if runtime not in classes:
        raise ConfigError(f"runtime {runtime!r} runs the JAX model itself, not its model.onnx; load it with "
                          "anomax.load_model(path)")
    if not Path(onnx_file).is_file():
        raise ArtifactError(f"{onnx_file} is missing: runtime '{runtime}' needs the exported model; save the model "
                            f"with anomax.save_model(..., onnx=True) (anomax-train ... export.onnx=true)")
    cls = classes[runtime]
    known = [name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"runtime '{runtime}' has no option(s) {unknown}; it has {known}")
    return cls(onnx_file, preprocess, thresholds, batch_size, **options)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"runtime '{name}' is not installed: pip install 'anomax[deploy]'") from None
