"""Building blocks shared by the backbones, and the one way torch weights land in them."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from anomax.errors import ConfigError, WeightsError

Activation = Callable[[jax.Array], jax.Array]


def torch_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric ``padding=kernel // 2``."""
    return ((kernel // 2, kernel // 2),) * 2


def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), the same numbers as jax.nn.relu6, written as jnp.clip because that exports
    to ONNX as one Clip, which onnxruntime fuses into the convolution before it (jax.nn.relu6
    exports as Max + Min, each a pass over the map that also breaks its blocked layout)."""
    return jnp.clip(x, 0.0, 6.0)


def max_pool(x: jax.Array, size: int, stride: int, padding: int) -> jax.Array:
    """size x size maximum at ``stride``, ``padding`` rows and columns of -inf on each side (torch's
    MaxPool2d). The ONNX export traces it in another form (anomax.deploy.onnx_export)."""
    return nnx.max_pool(x, (size, size), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution (kernel (k, k, 1, C)) as k² shifted multiply-adds that XLA fuses into one
    pass. Why: XLA:CPU's grouped convolution is 5-50x slower on MobileNet/EfficientNet shapes
    (measured at batch 16, 16² to 128² maps); the result equals lax.conv to float rounding."""
    k = kernel.shape[0]
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (k, k), (stride, stride), padding) if isinstance(padding, str) \
        else padding
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    return sum(x[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride, :] * kernel[i, j, 0]
               for i in range(k) for j in range(k))


class ConvBN(nnx.Module):
    """Bias-free convolution, BatchNorm on its running statistics, then an optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
                 groups: int = 1, padding="SAME", epsilon: float = 1e-5,
                 activation: Activation | None = None, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride, padding=padding,
                             feature_group_count=groups, use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=epsilon, rngs=rngs)
        self.activation = activation
        self.stride = stride
        self.depthwise = groups > 1 and groups == in_channels == out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depthwise:
            x = depthwise_conv(x, self.conv.kernel[...], self.stride, self.conv.padding)
        else:
            x = self.conv(x)
        x = self.norm(x)
        return x if self.activation is None else self.activation(x)


def conv_bn_names(conv_name: str, norm_name: str, layer: ConvBN):
    """The torch names of a ConvBN's two halves (torch keeps them as siblings)."""
    yield conv_name, layer.conv
    yield norm_name, layer.norm


class FeatureNetwork(nnx.Module):
    """A network seen as a chain of named stages, so any subset of them can be tapped.

    Subclasses define ``stages()`` (tap name, callable) in order and ``classify(x)``
    on the last stage's output. Stages after the deepest requested tap are skipped.
    """

    def stages(self) -> list[tuple[str, Callable[[jax.Array], jax.Array]]]:
        raise NotImplementedError

    def classify(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array, taps: Iterable[str] = (), logits: bool = False) -> dict[str, jax.Array]:
        taps = set(taps)
        features = {}
        for name, stage in self.stages():
            if len(features) == len(taps) and not logits:
                break
            x = stage(x)
            if name in taps:
                features[name] = x
        if logits:
            features["logits"] = self.classify(x)
        return features


def global_average_pool(x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2))


# torch layer type -> (torch suffix, nnx attribute, kernel transpose or None)
_TORCH_FIELDS = {
    nnx.Conv: (("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", None)),  # OIHW -> HWIO
    nnx.Linear: (("weight", "kernel", (1, 0)), ("bias", "bias", None)),
    nnx.BatchNorm: (("weight", "scale", None), ("bias", "bias", None),
                    ("running_mean", "mean", None), ("running_var", "var", None)),
}


def assign_torch_weights(layers: Iterable[tuple[str, nnx.Module]], state_dict: Mapping[str, np.ndarray],
                         source: str) -> None:
    """Copy ``state_dict`` into ``layers`` (torch name, nnx layer), each tensor used exactly once.

    Raises WeightsError naming every missing, unused or misshapen tensor.
    """
    unused = set(state_dict)
    missing, misshapen, unusable = [], [], []
    for prefix, layer in layers:
        if isinstance(layer, nnx.BatchNorm):
            unused.discard(f"{prefix}.num_batches_tracked")  # training counter, meaningless here
        for suffix, attribute, transpose in _TORCH_FIELDS[type(layer)]:
            variable = getattr(layer, attribute, None)
            if variable is None:  # e.g. a conv without bias
                continue
            key = f"{prefix}.{suffix}"
            if key not in state_dict:
                missing.append(key)
                continue
            unused.discard(key)
            value = state_dict[key] if transpose is None else np.transpose(state_dict[key], transpose)
            if value.shape != variable.shape:
                misshapen.append(f"{key} {tuple(state_dict[key].shape)} (network expects "
                                 f"{tuple(variable.shape) if transpose is None else _untransposed(variable.shape, transpose)})")
                continue
            value, problem = weight_value(key, value)
            if problem:
                unusable.append(problem)
                continue
            variable.set_value(value)  # moved to the device in one go by the caller
    problems = [f"missing {_listing(missing)}" if missing else "",
                f"unused {_listing(sorted(unused))}" if unused else "",
                f"wrong shape {_listing(misshapen)}" if misshapen else "",
                f"unusable {_listing(unusable)}" if unusable else ""]
    if any(problems):
        raise WeightsError(f"{source}: the weights do not fit the network: "
                           + "; ".join(p for p in problems if p)
                           + ". Check that the file belongs to this backbone and width.")


def weight_value(key: str, value: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``value`` as the float32 weight ``key``, or why it cannot be one: an integer or bool tensor,
    a NaN, infinite or float32-overflowing value, a negative BatchNorm variance (a modified file
    would otherwise give a network whose features are NaN, or silently another network)."""
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16):
        return value, f"{key} ({value.dtype}, not floating point)"
    value = np.asarray(value, np.float32)
    if not np.isfinite(value).all():
        return value, f"{key} (NaN or infinite values)"
    if key.endswith("running_var") and (value < 0).any():
        return value, f"{key} (negative variances)"
    return value, None


def _untransposed(shape, transpose) -> tuple[int, ...]:
    return tuple(shape[transpose.index(i)] for i in range(len(shape)))


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_taps(taps: Iterable[str], available: Iterable[str], backbone: str) -> tuple[str, ...]:
    taps, available = tuple(taps), tuple(available)
    unknown = [t for t in taps if t not in available]
    if unknown or not taps:
        raise ConfigError(f"backbone '{backbone}': unknown or no taps {unknown or list(taps)}; "
                          f"choose from {', '.join(available)}")
    repeated = sorted({t for t in taps if taps.count(t) > 1})
    if repeated:
        raise ConfigError(f"backbone '{backbone}': taps {repeated} are listed more than once; a repeated tap only "
                          f"repeats its channels (PaDiM's covariance becomes singular)")
    return taps
