"""Student-teacher feature regression, HALCON's trained anomaly model in spirit.

The frozen backbone's adapted features are the teacher. A small strided CNN, the
student, learns to reproduce them from the image on good samples only; where it
fails (a large per-position regression error) the image is unlike the training
set. Teacher channels are standardised with training-set statistics so that no
channel dominates the error.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anomax import training
from anomax.errors import ArtifactError, ConfigError, InputError
from anomax.heads._base import Head, HeadConfig, stored_state
from anomax.parallel import data_mesh, data_parallel, replicate
from anomax.registry import HEADS
from anomax.settings import setting
from anomax.training import TrainConfig

STRIDES = (8, 16)


class PatchConv(nnx.Module):
    """3x3 'SAME' convolution as image patches @ kernel. Why not nnx.Conv: inside lax.scan,
    XLA:CPU computes a convolution's kernel gradient ~30x slower than outside a loop
    (jax-ml/jax#12868); as a matmul the gradient is fast on every backend."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 3, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros(out_channels))

    def __call__(self, x: jax.Array) -> jax.Array:
        patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (self.stride, self.stride), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
        kernel = self.kernel[...]
        # Patch features are ordered (channel, row, column).
        return patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1]) + self.bias[...]


class StudentNet(nnx.Module):
    """Per halving of the resolution a 3x3 stride-2 conv then a 3x3 conv, widths
    complexity * 2**stage; a 1x1 conv (dense over channels) maps to the teacher's channels."""

    def __init__(self, in_channels: int, out_channels: int, complexity: int, stride: int, *, rngs: nnx.Rngs):
        layers, channels = [], in_channels
        for stage in range(stride.bit_length() - 1):
            width = complexity * 2**stage
            layers += [PatchConv(channels, width, 2, rngs=rngs), PatchConv(width, width, 1, rngs=rngs)]
            channels = width
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(channels, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


def regression_error(student: jax.Array, target: jax.Array) -> jax.Array:
    """Per-position mean squared error over channels: (B, h, w, D) x2 -> (B, h, w)."""
    return jnp.mean(jnp.square(student - target), axis=-1)


@dataclasses.dataclass(frozen=True)
class StudentConfig(HeadConfig):
    """complexity: channels of the student's first stage (doubling per stage).
    stride: image pixels per feature position (8 or 16); null derives it at fit."""

    complexity: int = setting(8, ge=1)
    stride: Literal[8, 16] | None = None


@HEADS.register("student")
class StudentHead(Head):
    """Trained by fit(..., train=TrainConfig) with HALCON's training parameters (conf/train/)."""

    name = "student"
    trained = True
    Config = StudentConfig

    def fit(self, batches: Iterable[Mapping[str, Any]], *, train: TrainConfig | None = None, validation=None,
            progress: bool = False) -> dict[str, Any]:
        train = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(train)
        images, features = self.in_memory(batches, "the training split", progress)  # every process's part
        self.config = self.config.replace(stride=self._stride_of(images.shape, features.shape))
        mean = features.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        # The floor keeps constant channels finite.
        std = np.maximum(features.std(axis=(0, 1, 2), dtype=np.float64), 1e-6).astype(np.float32)
        targets = (features - mean) / std
        self._build(images.shape[-1], features.shape[-1])
        _, params = nnx.split(StudentNet(images.shape[-1], features.shape[-1], self.config.complexity,
                                         self.config.stride, rngs=nnx.Rngs(train.seed)))

        def error_fn(params, images, targets, key):
            images, targets = data_parallel((images, targets))  # several processes: split each batch
            return regression_error(nnx.merge(self._graphdef, params)(images), targets)

        if jax.process_count() > 1:  # one copy per process of everything the loop reads
            params, images, targets = replicate(data_mesh(), (params, images, targets))
        params, info = training.train(error_fn, params, images, targets, train, desc="train student",
                                      progress=progress)
        weights = {f"student/{key}": np.asarray(value) for key, value in zip(self._keys, jax.tree.leaves(params))}
        self._state = {**weights, "teacher_mean": mean, "teacher_std": std}
        return info

    @classmethod
    def from_state(cls, hyperparams: Mapping[str, Any], state: Mapping[str, Any]) -> StudentHead:
        head = cls(cls.Config.from_dict(hyperparams))
        if head.config.stride is None or "teacher_mean" not in state or "student/layers/0/kernel" not in state:
            raise ArtifactError("the student head state lacks its stride, teacher statistics or student weights; "
                                "re-train the model")
        head._build(state["student/layers/0/kernel"].shape[2], state["teacher_mean"].shape[0])
        keys = [f"student/{key}" for key in head._keys] + ["teacher_mean", "teacher_std"]
        head._state = stored_state(cls.name, state, keys)
        return head

    def score(self, state: Mapping[str, jax.Array], images: jax.Array, features: jax.Array, mesh=None):
        """Pure: patch scores = per-position regression error against the standardised
        teacher; image score = maximum of the smoothed, upsampled map."""
        params = jax.tree.unflatten(self._treedef, [state[f"student/{key}"] for key in self._keys])
        target = (features - state["teacher_mean"]) / state["teacher_std"]
        return self.outputs(regression_error(nnx.merge(self._graphdef, params)(images), target), images)

    def _build(self, in_channels: int, out_channels: int) -> None:
        """The student's structure (no weights): graphdef, pytree layout and '/'-joined keys."""
        abstract = nnx.eval_shape(lambda: StudentNet(in_channels, out_channels, self.config.complexity,
                                                     self.config.stride, rngs=nnx.Rngs(0)))
        self._graphdef, params = nnx.split(abstract)
        self._treedef = jax.tree.structure(params)
        # to_flat_state walks the state in the same sorted order as jax.tree.leaves.
        self._keys = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)]

    def _stride_of(self, image_shape: tuple[int, ...], feature_shape: tuple[int, ...]) -> int:
        if len(image_shape) != 4 or len(feature_shape) != 4:
            raise InputError(f"the student head needs images (B,H,W,C) and features (B,h,w,D), "
                             f"got {image_shape} and {feature_shape}")
        (height, width), (rows, cols) = image_shape[1:3], feature_shape[1:3]
        stride = height // rows
        if stride not in STRIDES or (rows * stride, cols * stride) != (height, width):
            raise InputError(f"the student head needs features {STRIDES} times smaller than the image, got image "
                             f"{height}x{width} and features {rows}x{cols}; choose adaptor taps of stride 8 or 16 "
                             "and an image size that is a multiple of it")
        if self.config.stride is not None and stride != self.config.stride:
            raise ConfigError(f"model.head.stride={self.config.stride} but the features are {stride} times smaller "
                              "than the image; set model.head.stride to null or to the taps' stride")
        return stride
