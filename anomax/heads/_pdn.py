"""EfficientAD's networks: the patch description network (PDN) and the global autoencoder.

The PDN (Batzner et al., WACV 2024, sec. 3.1) is a few convolutions and two 2x2 average
poolings, so every output describes one bounded image patch (33 px in the paper). Here it
outputs on the backbone's feature grid: for a stride-s grid the image is first averaged
down by s/4 and the paper's stride-4 PDN runs on that (SAME padding keeps the grids aligned).
``width`` is the first layer's channels (the paper's 128); widths scale with it.

The autoencoder (sec. 3.3) squeezes the whole image through a small latent vector and
decodes it back to the PDN's output grid, so it can only reproduce what is globally
typical: a part missing, extra or swapped shows up as a reconstruction error.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx


class Conv(nnx.Module):
    """k x k convolution (stride s, SAME padding) as image patches @ kernel. Why not nnx.Conv:
    inside lax.scan, XLA:CPU computes a convolution's kernel gradient ~10-30x slower than outside
    a loop (jax-ml/jax#12868); as a matmul the gradient is fast on every backend. The patches
    are k² shifted slices, not lax.conv_general_dilated_patches: that one is itself a
    convolution with a one-hot kernel of k²·C outputs, k²·C times the work of the slices, and
    its gradient made a training step 2.5x slower (experiments/efficientad.md)."""

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.size, self.stride = size, stride
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (size, size, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros(out_channels))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        return patches(x, self.size, self.stride) @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]


def patches(x: jax.Array, size: int, stride: int) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H/s), ceil(W/s), size·size·C): each output position's size x size
    input window (SAME zero padding, the extra row/column after), features ordered (row, column,
    channel) like a flattened HWIO kernel."""
    if size == 1 and stride == 1:
        return x
    pads, outs = [], []
    for n in x.shape[1:3]:
        out = -(-n // stride)
        total = max((out - 1) * stride + size - n, 0)
        pads.append((total // 2, total - total // 2))
        outs.append(out)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    span_h, span_w = ((n - 1) * stride + 1 for n in outs)
    return jnp.concatenate([x[:, i:i + span_h:stride, j:j + span_w:stride] for i in range(size) for j in range(size)],
                           axis=-1)


def average_pool(x: jax.Array, factor: int) -> jax.Array:
    """factor x factor mean, stride factor (torch AvgPool2d(factor)); a size not divisible by
    factor is padded at the end (SAME), as the grids of the backbone's strided convs are."""
    if factor == 1:
        return x
    height, width = x.shape[1:3]
    pad = ((0, 0), (0, -height % factor), (0, -width % factor), (0, 0))
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, factor, factor, 1), (1, factor, factor, 1), pad)
    return summed / (factor * factor)


class PDN(nnx.Module):
    """small: conv4 w, pool, conv4 2w, pool, conv3 2w, conv4 out (the paper's PDN_S with w=128);
    medium: conv4 2w, pool, conv4 4w, pool, conv1 4w, conv3 4w, conv4 out, conv1 out (PDN_M).
    ReLU after every convolution but the last. Input (B, H, W, C) -> (B, H/stride, W/stride, out)."""

    def __init__(self, in_channels: int, out_channels: int, *, size: Literal["small", "medium"], width: int,
                 stride: int, rngs: nnx.Rngs):
        self.pre_pool = stride // 4
        if size == "small":
            spec = [(4, width, True), (4, 2 * width, True), (3, 2 * width, False), (4, out_channels, False)]
        else:
            spec = [(4, 2 * width, True), (4, 4 * width, True), (1, 4 * width, False), (3, 4 * width, False),
                    (4, out_channels, False), (1, out_channels, False)]
        layers, pools, channels = [], [], in_channels
        for kernel, out, pool in spec:
            layers.append(Conv(channels, out, kernel, rngs=rngs))
            pools.append(pool)
            channels = out
        self.layers = nnx.List(layers)
        self.pools = tuple(pools)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = average_pool(x, self.pre_pool)
        for index, (layer, pool) in enumerate(zip(self.layers, self.pools)):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = jax.nn.relu(x)
            if pool:
                x = average_pool(x, 2)
        return x


class AutoEncoder(nnx.Module):
    """Encoder: five 4x4 stride-2 convolutions (widths w, w, 2w, 2w, 2w), then a dense layer to
    a ``latent``-long vector: the only path from image to output, so it holds the layout, not
    the detail. Decoder: dense to a grid/8 map, three (bilinear x2, 3x3 conv) stages to the
    output grid, a 3x3 conv to the teacher's channels."""

    def __init__(self, in_channels: int, out_channels: int, *, image_hw: tuple[int, int],
                 grid_hw: tuple[int, int], width: int, latent: int, rngs: nnx.Rngs):
        widths = (width, width, 2 * width, 2 * width, 2 * width)
        encoder, channels, hw = [], in_channels, tuple(image_hw)
        for out in widths:
            encoder.append(Conv(channels, out, 4, 2, rngs=rngs))
            channels, hw = out, tuple(-(-n // 2) for n in hw)
        self.encoder = nnx.List(encoder)
        self.to_latent = nnx.Linear(hw[0] * hw[1] * channels, latent, rngs=rngs)
        self.sizes = tuple(tuple(max(1, -(-n // 2**k)) for n in grid_hw) for k in (3, 2, 1, 0))
        self.start_channels = 2 * width
        start = self.sizes[0]
        self.from_latent = nnx.Linear(latent, start[0] * start[1] * self.start_channels, rngs=rngs)
        self.decoder = nnx.List([Conv(self.start_channels, self.start_channels, 3, rngs=rngs) for _ in range(3)])
        self.out = Conv(self.start_channels, out_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.encoder:
            x = jax.nn.relu(layer(x))
        z = self.to_latent(x.reshape(x.shape[0], -1))
        x = jax.nn.relu(self.from_latent(z)).reshape(x.shape[0], *self.sizes[0], self.start_channels)
        for layer, size in zip(self.decoder, self.sizes[1:]):
            x = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)
            x = jax.nn.relu(layer(x))
        return self.out(x)
