"""Pretrained feature extractors: a name in the registry -> a frozen network and its tapped feature maps.

Every backbone module registers a ``BackboneSpec``; ``build_backbone`` turns it into
a ``Backbone`` holding the network structure, its parameters (a pytree) and a pure,
jittable ``forward(params, images) -> {tap: (B, h, w, C)}``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anomax.backbones._checkpoint import load_state_dict
from anomax.backbones._layers import FeatureNetwork, assign_torch_weights, check_taps
from anomax.backbones._weights import WeightsSource, file_sha256, resolve_weights
from anomax.errors import ConfigError, InputError, WeightsError
from anomax.preprocess.params import IMAGENET_MEAN, IMAGENET_STD
from anomax.registry import BACKBONES

INPUT_MULTIPLE = 32


def requirements(**normalization) -> dict:
    """Input requirements: ``input_multiple`` for width/height, the rest are create_dl_preprocess_param kwargs."""
    return {"input_multiple": INPUT_MULTIPLE, "num_channels": 3, **normalization}


IMAGENET_REQUIREMENTS = requirements(normalization_type="constant_values", mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry holds for one backbone name."""

    network: Callable[..., FeatureNetwork]  # (*, width_multiplier, rngs) -> network
    torch_layers: Callable[[FeatureNetwork], Iterable[tuple[str, nnx.Module]]] | None  # torch name -> layer
    default_taps: tuple[str, ...]
    requirements: dict
    weights: WeightsSource | None
    load_weights: Callable[[FeatureNetwork, Path], None] | None = None  # instead of torch_layers, for other files


class Backbone:
    """A frozen network in inference mode, with the taps it reports."""

    def __init__(self, name: str, network: FeatureNetwork, taps: Iterable[str], requirements: dict,
                 weights_sha256: str | None = None, width_multiplier: float = 1.0):
        self.name = name
        self.width_multiplier = width_multiplier
        self.requirements = dict(requirements)
        self.weights_sha256 = weights_sha256
        self.available_taps = tuple(stage for stage, _ in network.stages())
        self.taps = check_taps(taps, self.available_taps, name)
        self.graphdef, self.params = nnx.split(network)
        multiple = self.requirements["input_multiple"]
        probe = jax.ShapeDtypeStruct((1, 2 * multiple, 2 * multiple, 3), jnp.float32)
        shapes = jax.eval_shape(lambda p, x: nnx.merge(self.graphdef, p)(x, self.taps), self.params, probe)
        self.strides = {tap: probe.shape[1] // shapes[tap].shape[1] for tap in self.taps}
        self.channels = {tap: shapes[tap].shape[-1] for tap in self.taps}
        self._forward = jax.jit(self.forward)
        self._logits = jax.jit(lambda p, x: nnx.merge(self.graphdef, p)(self._checked(x), logits=True)["logits"])

    def _checked(self, images):
        if images.ndim != 4 or images.shape[-1] != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
            raise InputError(f"backbone '{self.name}': expected float images (B, H, W, 3) normalised as "
                             f"{self.requirements}, got {images.dtype} {tuple(images.shape)}")
        multiple = self.requirements["input_multiple"]
        if images.shape[1] % multiple or images.shape[2] % multiple:
            raise InputError(f"backbone '{self.name}': image height and width must be multiples of "
                             f"{multiple}, got {tuple(images.shape[1:3])}; change the preprocess size")
        return images

    def forward(self, params, images: jax.Array) -> dict[str, jax.Array]:
        """Pure and jittable: the tapped feature maps (B, h, w, C) of ``images`` (B, H, W, 3)."""
        network = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))  # frozen
        return network(self._checked(images), self.taps)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self._forward(self.params, images)

    def logits(self, images: jax.Array) -> jax.Array:
        """ImageNet class scores (B, 1000), to check that converted weights classify correctly."""
        return self._logits(self.params, images)


def random_init(abstract_state, seed: int):
    """He-normal kernels, identity BatchNorm, zero biases, drawn with numpy: flax's initialisers
    compile one XLA program per shape, tens of seconds for a ResNet-50 on a CPU."""
    rng = np.random.default_rng(seed)

    def init(path, leaf: jax.ShapeDtypeStruct):
        kind = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)][-1]
        if kind == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2 / fan_in))
        return np.full(leaf.shape, 1.0 if kind in ("scale", "var") else 0.0, leaf.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(init, abstract_state))


def backbone_requirements(name: str) -> dict:
    """What a backbone needs from preprocessing (HALCON's get_dl_model_param)."""
    return dict(BACKBONES.get(name).requirements)


def build_backbone(name: str, *, taps: Iterable[str] | None = None,
                   pretrained: str | os.PathLike | None = "imagenet", seed: int = 0,
                   width_multiplier: float = 1.0) -> Backbone:
    """The registered backbone ``name``: ImageNet weights, a weights file, or random (``pretrained=None``)."""
    spec: BackboneSpec = BACKBONES.get(name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"model.backbone.seed must be an integer >= 0, got {seed!r}")
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or width_multiplier <= 0:
        raise ConfigError(f"model.backbone.width_multiplier must be a number > 0, got {width_multiplier!r}")

    def make() -> FeatureNetwork:
        return spec.network(width_multiplier=width_multiplier, rngs=nnx.Rngs(seed))

    taps = tuple(taps) if taps is not None else spec.default_taps  # [] is refused by check_taps, not the defaults
    network = nnx.eval_shape(make)  # shapes only: values come from the file or from random_init
    if pretrained is None:
        nnx.update(network, random_init(nnx.state(network), seed))
        return Backbone(name, network, taps, spec.requirements, width_multiplier=width_multiplier)
    path = resolve_weights(name, pretrained)
    if spec.load_weights is not None:
        spec.load_weights(network, path)
    else:
        assign_torch_weights(spec.torch_layers(network), load_state_dict(path), str(path))
    state = nnx.state(network)
    empty = [jax.tree_util.keystr(key) for key, value in jax.tree_util.tree_leaves_with_path(state)
             if isinstance(value, jax.ShapeDtypeStruct)]
    if empty:
        raise WeightsError(f"{path}: no weights reached {', '.join(empty[:5])}; the backbone's torch mapping is incomplete")
    nnx.update(network, jax.device_put(state))
    return Backbone(name, network, taps, spec.requirements, file_sha256(path), width_multiplier)


__all__ = ["Backbone", "BackboneSpec", "build_backbone", "backbone_requirements", "load_state_dict",
           "resolve_weights", "IMAGENET_REQUIREMENTS"]
