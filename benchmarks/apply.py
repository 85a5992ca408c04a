"""Apply speed of a saved model artifact: images/s of ``load_model(path).apply`` at batch 1 and 16.

Times the whole public path (numpy preprocessing, the jitted network, thresholding). The first
call per batch size compiles and is reported apart (``first_call_s``); then one warm-up call,
then the median of ``repeats`` timed calls.

    python benchmarks/apply.py ARTIFACT_DIR [--repeats 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def measure_apply(path: str | Path, batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 10,
                  seed: int = 0) -> dict:
    """{'load_s', 'batches': {batch_size: {'first_call_s', 'median_s', 'images_per_s'}}} for the artifact
    at ``path``, fed random uint8 images of its preprocess size."""
    import anomax

    began = time.perf_counter()
    model = anomax.load_model(path)
    load_s = time.perf_counter() - began
    shape = (model.preprocess.height, model.preprocess.width, model.preprocess.num_channels)
    rng = np.random.default_rng(seed)
    batches = {}
    for batch_size in batch_sizes:
        model.set_params(batch_size=batch_size)
        images = list(rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8))
        began = time.perf_counter()
        model.apply(images)  # compiles this batch shape
        first_call_s = time.perf_counter() - began
        model.apply(images)  # warm-up: caches and allocations settle
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            model.apply(images)
            times.append(time.perf_counter() - began)
        median_s = statistics.median(times)
        batches[batch_size] = {"first_call_s": first_call_s, "median_s": median_s,
                               "images_per_s": batch_size / median_s}
    return {"load_s": load_s, "batches": batches}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--repeats", type=int, default=10)
    arguments = parser.parse_args()
    print(json.dumps(measure_apply(arguments.artifact, repeats=arguments.repeats), indent=2))
