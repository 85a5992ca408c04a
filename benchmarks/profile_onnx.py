"""Where an exported model.onnx spends its time: per-op times in onnxruntime and OpenVINO f32.

    python -m benchmarks.profile_onnx MODEL.onnx [MORE.onnx ...] [--batch 1] [--rounds 5] [--top 12]

For each file: onnxruntime's profiler (SessionOptions.enable_profiling), summed per op type and
per node, and OpenVINO's per-layer counters (PERF_COUNT), summed per layer type and per layer,
in ms per run over ``rounds`` runs after two warm-ups. With several files, the last table times
the inference alone (no host pre- or post-processing) in both runtimes, rounds interleaved over
the files, so that a change of load hits them alike.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np


# Before each timed run: onnxruntime's threads spin for tens of ms after a run, and on a machine of
# few cores they would slow whatever runs next (OpenVINO took 14-16 ms for 10-12 ms there).
IDLE_S = 0.1


def _input(path: str, batch: int) -> np.ndarray:
    import onnx

    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
    return np.random.default_rng(0).normal(size=(batch, *[d.dim_value for d in dims])).astype(np.float32)


def onnxruntime_profile(path: str, batch: int, rounds: int) -> tuple[dict, dict]:
    """({op type: ms per run}, {(node, op type): ms per run})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = _input(path, batch)
    for _ in range(2 + rounds):
        session.run(None, {"images": x})
    events = json.load(open(session.end_profiling()))
    # the profile covers the warm-ups too: count the kernels that ran after the second run ended
    runs = sorted(event["ts"] + event["dur"] for event in events if event.get("name") == "model_run")
    after_warmups = runs[1]
    by_type, by_node = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= after_warmups:
            ms = event["dur"] / 1000 / rounds
            by_type[event["args"]["op_name"]] += ms
            by_node[(event["name"][:-len("_kernel_time")], event["args"]["op_name"])] += ms
    return by_type, by_node


def openvino_profile(path: str, batch: int, rounds: int) -> tuple[dict, dict]:
    """({layer type: ms per run}, {(layer, type / kernel): ms per run}), f32."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = _input(path, batch)
    for _ in range(2):
        request.infer({"images": x})
    by_type, by_node = collections.Counter(), collections.Counter()
    for _ in range(rounds):
        request.infer({"images": x})
        for layer in request.get_profiling_info():
            ms = layer.real_time.total_seconds() * 1000 / rounds
            by_type[layer.node_type] += ms
            by_node[(layer.node_name, f"{layer.node_type} / {layer.exec_type}")] += ms
    return by_type, by_node


def interleaved(paths: list[str], batch: int, rounds: int) -> dict:
    """{(runtime, path): images/s}, the median of `rounds` runs, each round timing every file in both runtimes."""
    import onnxruntime as ort
    import openvino as ov

    core, runs = ov.Core(), {}
    for path in paths:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        runs[("onnxruntime", path)] = lambda x, s=session: s.run(None, {"images": x})
        request = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        runs[("openvino f32", path)] = lambda x, r=request: r.infer({"images": x})
    x = _input(paths[0], batch)
    for run in runs.values():
        run(x), run(x)
    times = collections.defaultdict(list)
    for _ in range(rounds):
        for key, run in runs.items():
            time.sleep(IDLE_S)
            began = time.perf_counter()
            run(x)
            times[key].append(time.perf_counter() - began)
    return {key: batch / statistics.median(values) for key, values in times.items()}


def _table(title: str, counts: dict, top: int) -> str:
    total = sum(counts.values())
    lines = [f"**{title}**: {total:.1f} ms per run", "", "| ms | % | what |", "|---|---|---|"]
    for key, ms in counts.most_common(top):
        lines.append(f"| {ms:.2f} | {100 * ms / total:.1f} | {' '.join(key) if isinstance(key, tuple) else key} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    arguments = parser.parse_args(argv)
    print(f"batch {arguments.batch}; load average before {' / '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    for path in arguments.models:
        for runtime, profile in (("onnxruntime", onnxruntime_profile), ("OpenVINO f32", openvino_profile)):
            by_type, by_node = profile(path, arguments.batch, arguments.rounds)
            print(_table(f"{path}, {runtime}, by op type", by_type, arguments.top))
            print(_table(f"{path}, {runtime}, by node", by_node, arguments.top))
    if len(arguments.models) > 1:
        speeds = interleaved(arguments.models, arguments.batch, arguments.rounds)
        print("**Inference alone, rounds interleaved** (images/s)\n\n| runtime | model | images/s |\n|---|---|---|")
        for (runtime, path), speed in speeds.items():
            print(f"| {runtime} | {path} | {speed:.3g} |")
    print(f"\nload average after {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
