"""Apply speed of a saved model artifact: images/s of ``load_model(path).apply`` at batch 1 and 16
(``measure_apply``), and side by side in every runtime for an artifact saved with onnx=True
(``measure_runtimes``, ``compare_runtimes``); and a program's cold start in each runtime
(``measure_cold_start``).

Times the whole public path (numpy preprocessing, the jitted network, thresholding). The first
call per batch size compiles and is reported apart (``first_call_s``); then one warm-up call,
then the median of ``repeats`` timed calls.

    python -m benchmarks.apply ARTIFACT_DIR [--repeats 10] [--cold]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.profile_onnx import IDLE_S


def measure_apply(path: str | Path, batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 10,
                  seed: int = 0, short_calls: tuple[int, ...] = (1,)) -> dict:
    """{'load_s', 'batches': {batch_size: {'first_call_s', 'median_s', 'images_per_s'}}} for the artifact
    at ``path``, fed random uint8 images of its preprocess size; plus, for each n of ``short_calls``, a
    call of n images at the largest batch size (a saved model keeps its training batch size, 16, and
    is often applied to one image at a time), keyed '<batch size>, <n>/call'."""
    import anomax

    began = time.perf_counter()
    model = anomax.load_model(path)
    load_s = time.perf_counter() - began
    shape = (model.preprocess.height, model.preprocess.width, model.preprocess.num_channels)
    rng = np.random.default_rng(seed)
    batches = {}
    calls = [(batch_size, batch_size, batch_size) for batch_size in batch_sizes]
    calls += [(f"{max(batch_sizes)}, {count}/call", max(batch_sizes), count) for count in short_calls]
    for key, batch_size, count in calls:
        model.set_params(batch_size=batch_size)
        images = list(rng.integers(0, 256, (count, *shape), dtype=np.uint8))
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
        batches[key] = {"first_call_s": first_call_s, "median_s": median_s, "images_per_s": count / median_s}
    return {"load_s": load_s, "batches": batches}


# name -> load_model(path, runtime=..., **options)
RUNTIMES = {"jax": ("jax", {}), "onnxruntime": ("onnxruntime", {}),
            "openvino f32": ("openvino", {"precision": "f32"}),
            "openvino default": ("openvino", {"precision": "default"})}


def measure_runtimes(path: str | Path, runtimes: tuple[str, ...] = tuple(RUNTIMES),
                     batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 10, seed: int = 0) -> dict:
    """Apply images/s of the artifact at ``path`` (saved with onnx=True) in each runtime, side by side.

    Rounds are interleaved (each round times every runtime once), so a change of load on a shared
    machine hits all runtimes alike. {'runtimes': {name: {'load_s', 'batches': {batch_size:
    {'first_call_s', 'median_s', 'images_per_s'}}}}, 'load_average': [before, after]}."""
    import os

    import anomax

    load_before = os.getloadavg()
    models, results = {}, {}
    for name in runtimes:
        runtime, options = RUNTIMES[name]
        began = time.perf_counter()
        models[name] = anomax.load_model(path, runtime=runtime, **options)
        results[name] = {"load_s": time.perf_counter() - began, "batches": {}}
    preprocess = next(iter(models.values())).preprocess
    shape = (preprocess.height, preprocess.width, preprocess.num_channels)
    rng = np.random.default_rng(seed)
    for batch_size in batch_sizes:
        images = list(rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8))
        times = {name: [] for name in models}
        for name, model in models.items():
            model.set_params(batch_size=batch_size)
            began = time.perf_counter()
            model.apply(images)  # JAX compiles this batch shape; the runtimes plan their memory
            results[name]["batches"][batch_size] = {"first_call_s": time.perf_counter() - began}
            model.apply(images)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                time.sleep(IDLE_S)  # the previous runtime's threads go idle first (onnxruntime's spin)
                began = time.perf_counter()
                model.apply(images)
                times[name].append(time.perf_counter() - began)
        for name in models:
            median_s = statistics.median(times[name])
            results[name]["batches"][batch_size].update(median_s=median_s, images_per_s=batch_size / median_s)
    return {"runtimes": results, "load_average": [load_before, os.getloadavg()]}


def compare_runtimes(path: str | Path, images: list[np.ndarray], runtimes: tuple[str, ...] = tuple(RUNTIMES)) -> dict:
    """Per runtime against JAX on ``images``: the largest score and map differences (absolute, and
    relative to JAX's largest score / map value) and how many images change class at the model's thresholds."""
    import anomax

    reference = anomax.load_model(path).apply(images)
    scores = np.array([r["anomaly_score"] for r in reference])
    maps = np.stack([r["anomaly_image"] for r in reference])
    out = {}
    for name in runtimes:
        runtime, options = RUNTIMES[name]
        results = anomax.load_model(path, runtime=runtime, **options).apply(images)
        score_diff = float(np.abs(np.array([r["anomaly_score"] for r in results]) - scores).max())
        map_diff = float(np.abs(np.stack([r["anomaly_image"] for r in results]) - maps).max())
        flips = sum(r.get("anomaly_class_id") != want.get("anomaly_class_id") for r, want in zip(results, reference))
        out[name] = {"max_score_diff": score_diff, "max_score_diff_rel": score_diff / float(np.abs(scores).max()),
                     "max_map_diff": map_diff, "max_map_diff_rel": map_diff / float(np.abs(maps).max()),
                     "class_changes": int(flips), "images": len(images)}
    return out


_COLD = """import json, sys, time
began = time.perf_counter()
import numpy as np, anomax
model = anomax.load_model(sys.argv[1], runtime=sys.argv[2], **json.loads(sys.argv[3]))
loaded = time.perf_counter()
preprocess = model.preprocess
model.apply([np.zeros((preprocess.height, preprocess.width, preprocess.num_channels), np.uint8)])
print(json.dumps({"load_s": loaded - began, "first_apply_s": time.perf_counter() - loaded,
                  "jax_imported": "jax" in sys.modules}))
"""


def measure_cold_start(path: str | Path, runtimes: tuple[str, ...] = tuple(RUNTIMES), repeats: int = 5) -> dict:
    """A fresh Python process per sample, as an inspection program starts: ``import anomax`` +
    ``load_model`` (``load_s``) and the first one-image ``apply`` (``first_apply_s``: JAX compiles
    here, with the persistent compilation cache if the environment sets one), medians of ``repeats``
    rounds, each round every runtime once. The interpreter's own start is not counted."""
    import os
    import subprocess
    import sys

    load_before = os.getloadavg()
    samples = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name in runtimes:
            runtime, options = RUNTIMES[name]
            out = subprocess.run([sys.executable, "-c", _COLD, str(path), runtime, json.dumps(options)],
                                 capture_output=True, text=True, check=True).stdout
            samples[name].append(json.loads(out.splitlines()[-1]))
    results = {name: {key: statistics.median(sample[key] for sample in runs) for key in ("load_s", "first_apply_s")}
               | {"jax_imported": runs[-1]["jax_imported"]} for name, runs in samples.items()}
    return {"runtimes": results, "repeats": repeats, "load_average": [load_before, os.getloadavg()]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cold", action="store_true", help="cold start per runtime (measure_cold_start; "
                        "the artifact needs model.onnx), --repeats fresh processes each")
    arguments = parser.parse_args()
    if arguments.cold:
        print(json.dumps(measure_cold_start(arguments.artifact, repeats=arguments.repeats), indent=2))
    else:
        print(json.dumps(measure_apply(arguments.artifact, repeats=arguments.repeats), indent=2))
