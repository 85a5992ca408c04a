"""Speed of each backbone's feature forward (images/s, GFLOP/s from XLA's cost analysis) beside a plain matmul."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from anomax.backbones import build_backbone
from anomax.registry import BACKBONES


def _seconds_per_call(function, *args, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(function(*args))
    return (time.perf_counter() - start) / repeats


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """What this machine reaches on a plain f32 matmul: the yardstick for the backbones' GFLOP/s."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    return 2 * n**3 / _seconds_per_call(matmul, a, a, repeats=repeats) / 1e9


def benchmark_backbones(names=None, *, size: int = 256, batch: int = 16, repeats: int = 5) -> list[dict]:
    """One row per backbone (default taps; random weights, speed does not depend on their values)."""
    rows = []
    for name in names or BACKBONES.names():
        backbone = build_backbone(name, pretrained=None)
        images = jnp.zeros((batch, size, size, 3), jnp.float32)
        forward = jax.jit(backbone.forward).lower(backbone.params, images).compile()
        seconds = _seconds_per_call(forward, backbone.params, images, repeats=repeats)
        flops = _flops(forward)
        rows.append({"backbone": name, "taps": list(backbone.taps), "size": size, "batch": batch,
                     "images_per_s": batch / seconds, "gflop_per_image": flops / batch / 1e9,
                     "gflop_per_s": flops / seconds / 1e9})
    matmul = matmul_gflops(repeats=repeats)
    for row in rows:
        row["matmul_gflop_per_s"] = matmul
    return rows


if __name__ == "__main__":
    for row in benchmark_backbones():
        print(row)
