"""ResNet-18, ResNet-50 and Wide-ResNet-50-2 in torchvision's layout (v1.5: stride on the 3x3 conv).

Taps: ``stem`` (after the max-pool, stride 4), ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32).
Defaults ``layer2`` + ``layer3``, the pair PatchCore and PaDiM use. No weights ship
offline; users with torchvision files pass them as ``pretrained`` or let them download.
"""
from __future__ import annotations

import jax
from flax import nnx

from anomax.backbones import IMAGENET_REQUIREMENTS, BackboneSpec, _layers
from anomax.backbones._layers import ConvBN, FeatureNetwork, conv_bn_names, global_average_pool, torch_padding
from anomax.backbones._weights import WeightsSource
from anomax.registry import BACKBONES

PLANES = (64, 128, 256, 512)


def conv_bn(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, relu: bool = True, **kw) -> ConvBN:
    return ConvBN(cin, cout, kernel, padding=torch_padding(kernel), activation=jax.nn.relu if relu else None,
                  rngs=rngs, **kw)


class Block(nnx.Module):
    """BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3, 1x1), with torchvision's attribute names."""

    def __init__(self, cin: int, planes: int, stride: int, *, bottleneck: bool, width: int, rngs: nnx.Rngs):
        cout = planes * 4 if bottleneck else planes
        if bottleneck:
            self.convs = nnx.List([conv_bn(cin, width, 1, rngs=rngs),
                                   conv_bn(width, width, 3, stride=stride, rngs=rngs),
                                   conv_bn(width, cout, 1, relu=False, rngs=rngs)])
        else:
            self.convs = nnx.List([conv_bn(cin, planes, 3, stride=stride, rngs=rngs),
                                   conv_bn(planes, planes, 3, relu=False, rngs=rngs)])
        needs_projection = stride != 1 or cin != cout
        self.downsample = conv_bn(cin, cout, 1, stride=stride, relu=False, rngs=rngs) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for conv in self.convs:
            y = conv(y)
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(FeatureNetwork):
    def __init__(self, depths: tuple[int, ...], *, bottleneck: bool, width_factor: int = 1,
                 width_multiplier: float = 1.0, num_classes: int = 1000, rngs: nnx.Rngs):
        planes = [max(1, round(p * width_multiplier)) for p in PLANES]
        cin = planes[0]
        self.stem = conv_bn(3, cin, 7, stride=2, rngs=rngs)
        layers = []
        for index, (depth, plane) in enumerate(zip(depths, planes)):
            blocks = []
            for i in range(depth):
                stride = 2 if index > 0 and i == 0 else 1
                blocks.append(Block(cin, plane, stride, bottleneck=bottleneck, width=plane * width_factor, rngs=rngs))
                cin = plane * 4 if bottleneck else plane
            layers.append(nnx.Sequential(*blocks))
        self.layers = nnx.List(layers)
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def stages(self):
        stem = ("stem", lambda x: _layers.max_pool(self.stem(x), 3, 2, 1))
        return [stem, *((f"layer{i}", layer) for i, layer in enumerate(self.layers, 1))]

    def classify(self, x: jax.Array) -> jax.Array:
        return self.fc(global_average_pool(x))


def torch_layers(net: ResNet):
    """torchvision names: conv1/bn1, layerL.B.conv{1,2,3}/bn{1,2,3}, layerL.B.downsample.{0,1}, fc."""
    yield from conv_bn_names("conv1", "bn1", net.stem)
    for l, layer in enumerate(net.layers, 1):
        for b, block in enumerate(layer.layers):
            for c, conv in enumerate(block.convs, 1):
                yield from conv_bn_names(f"layer{l}.{b}.conv{c}", f"layer{l}.{b}.bn{c}", conv)
            if block.downsample is not None:
                yield from conv_bn_names(f"layer{l}.{b}.downsample.0", f"layer{l}.{b}.downsample.1", block.downsample)
    yield "fc", net.fc


# name, depths, bottleneck, width factor of the 3x3 convs, torchvision IMAGENET1K_V1 file
VARIANTS = (("resnet18", (2, 2, 2, 2), False, 1, "resnet18-f37072fd.pth"),
            ("resnet50", (3, 4, 6, 3), True, 1, "resnet50-0676ba61.pth"),
            ("wide_resnet50_2", (3, 4, 6, 3), True, 2, "wide_resnet50_2-95faca4d.pth"))

for name, depths, bottleneck, width_factor, file_name in VARIANTS:
    def network(*, depths=depths, bottleneck=bottleneck, width_factor=width_factor, **kw) -> ResNet:
        return ResNet(depths, bottleneck=bottleneck, width_factor=width_factor, **kw)

    BACKBONES.register(name)(BackboneSpec(
        network=network,
        torch_layers=torch_layers,
        default_taps=("layer2", "layer3"),
        requirements=IMAGENET_REQUIREMENTS,
        weights=WeightsSource(file_name=file_name, url=f"https://download.pytorch.org/models/{file_name}"),
    ))
