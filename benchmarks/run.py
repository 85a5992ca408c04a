"""Run a named benchmark suite: ``python -m benchmarks.run {quick,cpu,levers,tiling} [--train] [--only NAME..] [--out DIR]``.

Every measurement runs in its own python process (benchmarks/measure.py), so peak RSS is
that measurement's alone and no compiled program or allocation carries over. Writes
``<out>/<suite>.json`` (machine, load, every number) and ``<out>/<suite>.md`` (the tables).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BANK = {"rows": 420_864, "dim": 128}  # ELPV mono's PatchCore bank: 411 images x 32 x 32 patches x 128
_BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
              "resnet50", "wide_resnet50_2")

# PatchCore + EfficientNet-Lite2: elpv_best until it became the Lite2 + MobileNetV2 score ensemble
# (results/levers.* ran as "+experiment=elpv_best", the same model then)
_LITE2 = "model/backbone=efficientnet_lite2"
_LEVERS = (  # experiments/levers.md, in its order: the default, then each lever
    (),  # PatchCore + MobileNetV2
    ("model/backbone=vit_small_patch14", "preprocess.width=224", "preprocess.height=224"),
    (_LITE2,),  # EfficientNet-Lite2
    ("model/backbone=efficientnet_lite1", "model.head.adaptor.pool_size=3", "model.head.num_neighbors=1"),
    ("model/backbone=concat_lite2_mobilenet_v2",),
    (_LITE2, "model.backbone.taps=[blocks.3,blocks.6,blocks.14]", "model.head.adaptor.grid_tap=blocks.6"),  # multi-scale
    (_LITE2, "augment=fit_flips", "model.head.max_patches_per_image=341"),
    (_LITE2, "augment=flips", "model.head.max_patches_per_image=341"),  # + TTA: 3 maps per image
    (_LITE2, "preprocess.normalization_type=all_channels"),  # Lever 6: per-image min/max stretch
    (_LITE2, "preprocess.normalization_type=all_channels", "preprocess.stretch_percentile=1"),  # Lever 7: 1-99 %
)

_FIVE_MPX = {"images": 50, "test_images": 20, "width": 2592, "height": 1944, "tile_size": 256, "stride": 224}

SUITES = {
    # CI-sized: proves every kind of measurement runs; the numbers mean nothing.
    "quick": [
        ("matmul", {"n": 256, "repeats": 3}),
        ("backbone", {"name": "mobilenet_v2", "size": 64, "batch": 4, "width_multiplier": 0.25, "repeats": 2}),
        ("head", {"head": "padim", "images": 8, "size": 64, "batch": 4, "width_multiplier": 0.25, "repeats": 1,
                  "adaptor.projection_dim": 8}),
        ("neighbors", {"queries": 512, "bank": 300, "dim": 32, "chunk_size": 128, "repeats": 2}),
        ("coreset", {"rows": 2000, "dim": 32, "ratio": 0.01}),
        ("padim_memory", {"images": 8, "grid": 8, "dim": 16, "batch": 4}),
        ("padim_memory", {"images": 32, "grid": 8, "dim": 16, "batch": 4}),
        ("deploy", {"head": "padim", "size": 64, "images": 8, "test_images": 4, "repeats": 1, "width_multiplier": 0.25,
                    "hyperparams": {"adaptor.projection_dim": 8}}),
        ("tiling", {"head": "padim", "images": 2, "test_images": 1, "width": 300, "height": 260, "tile_size": 128,
                    "stride": 96}),
        ("lever", {"dataset": "synthetic", "repeats": 1,
                   "overrides": ["dataset.size=64", "dataset.n_train=8", "preprocess.width=64", "preprocess.height=64",
                                 "model.backbone.pretrained=null", "model.backbone.width_multiplier=0.25",
                                 "augment=flips", "model.head.max_patches_per_image=16"]}),
    ],
    # The real one, 256 x 256 inputs and ELPV-sized kernels.
    "cpu": [
        ("matmul", {"n": 2048, "repeats": 5}),
        *[("backbone", {"name": name, "repeats": 3}) for name in _BACKBONES],
        *[("head", {"head": name, "images": 64, "repeats": 2}) for name in ("padim", "patchcore", "student")],
        ("neighbors", {"queries": 16 * 1024, "bank": 4208, "dim": 128, "repeats": 5}),
        ("padim_memory", {"images": 256}),
        ("padim_memory", {"images": 1024}),
        ("patchcore_scale", {"images": 5000, "coreset_size": 100}),
        ("patchcore_scale", {"images": 5000, "max_patches_per_image": 64}),
        ("apply", {"head": "padim"}),
        ("apply", {"head": "patchcore"}),
        # Issue 14: the trained head runs three small networks instead of the backbone: its
        # defaults (PDN width 16), two and four times as wide (the widths of the quality/time table)
        ("apply", {"head": "efficientad"}),
        ("apply", {"head": "efficientad", "hyperparams": {"width": 32, "ae_width": 32}}),
        ("apply", {"head": "efficientad", "hyperparams": {"width": 64, "ae_width": 64}}),
        # ... and its teacher at stride 4 (a stride-4 tap in the target: 4x the map cells)
        ("apply", {"head": "efficientad", "overrides": ["model.backbone.taps=[features.3,features.6,features.13]"]}),
        # PatchCore's bank as in the issue's comparison with anomalib: 3,788 x 128 (ELPV mono, 1 %)
        ("deploy", {"head": "patchcore", "hyperparams": {"coreset_size": 3788}, "repeats": 5}),
        ("deploy", {"head": "padim", "repeats": 5}),
        ("coreset", {**_BANK, "ratio": 0.01}),
        ("coreset", {**_BANK, "ratio": 0.1}),
    ],
    # Issue 15: the cost of each detection-quality lever on ELPV mono (real weights and cells),
    # fitted on the whole training split: the rows of experiments/levers.md.
    "levers": [("lever", {"overrides": list(overrides)}) for overrides in _LEVERS],
    # Issue 17: tiled fit and scoring of 5-megapixel images; peak RSS must stay under 8 GiB.
    "tiling": [
        ("tiling", {"head": "patchcore", **_FIVE_MPX, "max_patches_per_image": 64}),
        ("tiling", {"head": "padim", **_FIVE_MPX}),
    ],
}


def measure(name: str, kwargs: dict) -> dict:
    """One measurement in a fresh process, without the persistent compilation cache (compile time is measured)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "benchmarks.measure", name, json.dumps(kwargs)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode:  # a child killed by a signal (out of memory) leaves no message of its own
        lines = run.stderr.strip().splitlines()
        return {"measurement": name, "kwargs": kwargs, "error": lines[-1] if lines else f"exit status {run.returncode}"}
    return {"measurement": name, "kwargs": kwargs, **json.loads(run.stdout.strip().splitlines()[-1])}


def run_suite(suite: str, out: Path, train: bool = False, only: tuple[str, ...] = ()) -> dict:
    """Run a suite (or `only` its measurements of those names, written as <suite>-<names>.*)."""
    plan = [(name, kwargs) for name, kwargs in SUITES[suite] + ([("train", {})] if train else [])
            if not only or name in only]
    if not plan:
        sys.exit(f"benchmarks.run: suite '{suite}' has no {' or '.join(only)} measurement"
                 f"{' (train comes with --train)' if 'train' in only else ''}; its measurements: "
                 f"{', '.join(sorted({name for name, _ in SUITES[suite]}))}")
    stem = "-".join([suite, *only])
    report = {"suite": suite, "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "load_before": os.getloadavg(), "results": []}
    out.mkdir(parents=True, exist_ok=True)
    for number, (name, kwargs) in enumerate(plan, 1):
        print(f"[{number}/{len(plan)}] {name} {kwargs}", file=sys.stderr, flush=True)
        report["results"].append(measure(name, kwargs))
        report["load_after"] = os.getloadavg()
        # Rewritten after every measurement: a long suite shows what it has so far.
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        (out / f"{stem}.md").write_text(markdown(report))
    return report


def _machine() -> dict:
    import jax

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # POSIX: no psutil dependency for one number
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(memory / 2**30, 1), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}


# ---- markdown ----------------------------------------------------------------------------------------
def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _timing(t: dict) -> str:
    return f"{t['median_s']:.3g} ± {t['spread_s']:.2g}"


TABLES = {  # measurement -> (title, header, row of a result)
    "matmul": ("Plain f32 matmul (the practical peak)", ["n", "GFLOP/s", "median s ± spread", "compile s"],
               lambda r, peak: [r["n"], _f(r["gflop_per_s"]), _timing(r), _f(r["compile_s"])]),
    "backbone": ("Backbone feature forward (random init, default taps)",
                 ["backbone", "size", "batch", "images/s", "GFLOP/image", "GFLOP/s", "% of matmul", "compile s", "peak RSS MiB"],
                 lambda r, peak: [r["backbone"], r["size"], r["batch"], _f(r["images_per_s"]), _f(r["flops"] / r["batch"] / 1e9),
                                  _f(r["gflop_per_s"]), _f(100 * r["gflop_per_s"] / peak, 2), _f(r["compile_s"]),
                                  _f(r["peak_rss_mib"], 4)]),
    "head": ("Heads: the full pipeline on synthetic textures (MobileNetV2 random init, read + preprocess included)",
             ["head", "train images", "fit s (median ± spread)", "first fit s", "coreset s", "fit images/s",
              "score images/s", "peak RSS MiB"],
             lambda r, peak: [r["head"], r["train_images"], _timing(r["fit"]), _f(r["fit"]["first_s"]),
                              _f(r["coreset_s"]), _f(r["fit_images_per_s"]), _f(r["score_images_per_s"]),
                              _f(r["peak_rss_mib"], 4)]),
    "neighbors": ("Exact 1-NN (PatchCore scoring kernel)",
                  ["queries × bank × dim", "queries/s", "GFLOP/s", "% of matmul", "median s ± spread", "compile s"],
                  lambda r, peak: [f"{r['queries']} × {r['bank']} × {r['dim']}", _f(r["queries_per_s"]),
                                   _f(r["matmul_gflop_per_s"]), _f(100 * r["matmul_gflop_per_s"] / peak, 2),
                                   _timing(r), _f(r["compile_s"])]),
    "coreset": ("Greedy k-center coreset (random bank)",
                ["bank", "ratio", "size", "seconds", "ms/step", "compile s", "peak RSS MiB"],
                lambda r, peak: [f"{r['rows']} × {r['dim']}", r["ratio"], r["size"], _f(r["median_s"], 4),
                                 _f(r["ms_per_step"]), _f(r["compile_s"]), _f(r["peak_rss_mib"], 4)]),
    "padim_memory": ("PaDiM fit memory (synthetic feature batches streamed into Padim.fit)",
                     ["images", "batch × grid² × dim", "fit s", "peak RSS MiB"],
                     lambda r, peak: [r["images"], f"{r['batch']} × {r['grid']}² × {r['dim']}", _f(r["fit_s"]),
                                      _f(r["peak_rss_mib"], 4)]),
    "patchcore_scale": ("PatchCore at scale (synthetic feature batches of 32 × 32 × 128 per image into PatchCore.fit)",
                        ["images", "max patches/image", "bank rows", "bank MiB", "coreset size", "coreset s",
                         "fit s", "peak RSS MiB"],
                        lambda r, peak: [r["images"], _f(r["max_patches_per_image"]), r["num_patches"],
                                         _f(r["bank_mib"], 4), r["coreset_size"], _f(r["coreset_seconds"]),
                                         _f(r["fit_s"]), _f(r["peak_rss_mib"], 4)]),
    "apply": ("Apply a saved artifact (`load_model(path).apply`, MobileNetV2 256 × 256, preprocessing included)",
              ["head", "batch", "images/s", "first call s", "load s"],
              None),  # one row per batch size, below
    "deploy": ("Apply in each runtime, side by side (artifact saved with onnx=True, MobileNetV2 256 × 256, "
               "preprocessing included; rounds interleaved)",
               ["head", "runtime", "batch", "images/s", "× jax", "first call s", "load s", "max score diff (rel)",
                "class changes"],
               None),  # one row per runtime and batch size, below
    "tiling": ("Tiled fit and scoring of large images (PNG files -> tiles -> MobileNetV2 random init -> head -> "
               "stitched maps; anomax.tiling)",
               ["head", "mode", "image", "tile / stride", "train images (tiles)", "fit s", "peak RSS after fit MiB",
                "test images", "score s", "images/s", "peak RSS MiB", "head settings"],
               lambda r, peak: [r["head"], r["mode"], f"{r['width']} × {r['height']}", f"{r['tile_size']} / {r['stride']}",
                                f"{r['train_images']} ({r['train_tiles']})", _f(r["fit_s"]), _f(r["fit_peak_rss_mib"], 4),
                                r["test_images"], _f(r["score_s"]), _f(r["score_images_per_s"]),
                                _f(r["peak_rss_mib"], 4), json.dumps(r["hyperparams"])]),
    "lever": ("Levers (issue 15): anomax-train configs on ELPV mono, real weights; fit = the whole training split "
              "once (read + preprocess without the cache, features, coreset); apply = `load_model(path).apply`",
              ["overrides", "train images", "fit s", "coreset s", "bank rows → coreset", "apply images/s batch 1",
               "batch 16", "peak RSS MiB"],
              lambda r, peak: [" ".join(r["overrides"]) or "(default)", r["train_images"], _f(r["fit_s"], 4),
                               _f(r["coreset_s"], 4), f"{_f(r['bank_rows'])} → {_f(r['coreset_size'])}",
                               _f(r["apply_images_per_s"]["1"]), _f(r["apply_images_per_s"]["16"]),
                               _f(r["peak_rss_mib"], 4)]),
    "train": ("End to end: `anomax-train` default run", ["command", "wall s", "fit s", "evaluate s", "image AUROC"],
              lambda r, peak: [r["command"], _f(r["wall_s"]), _f(r["fit_s"]), _f(r["evaluate_s"]),
                               _f(r["summary"]["image_auroc"], 4)]),
}


def markdown(report: dict) -> str:
    results = report["results"]
    peak = next((r["gflop_per_s"] for r in results if r["measurement"] == "matmul" and "error" not in r), float("nan"))
    machine = report["machine"]
    lines = [f"Suite `{report['suite']}`, {report['date']}: `{report['command']}`  ",
             f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, jax {machine['jax']}, "
             f"devices {machine['devices']}; load average (1/5/15 min) before {_load(report['load_before'])}, "
             f"after {_load(report['load_after'])}.", ""]
    for name, (title, header, row) in TABLES.items():
        mine = [r for r in results if r["measurement"] == name and "error" not in r]
        if not mine:
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in mine:
            rows = ([[r["head"], b, _f(t["images_per_s"]), _f(t["first_call_s"]), _f(r["load_s"])]
                     for b, t in r["batches"].items()] if name == "apply" else
                    _deploy_rows(r) if name == "deploy" else [row(r, peak)])
            lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
        lines.append("")
    failed = [r for r in results if "error" in r]
    lines += [f"- FAILED {r['measurement']} {r['kwargs']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _deploy_rows(r: dict) -> list[list]:
    rows = []
    for runtime, m in r["runtimes"].items():
        parity = r["parity"][runtime]
        for batch, t in m["batches"].items():
            speedup = t["images_per_s"] / r["runtimes"]["jax"]["batches"][batch]["images_per_s"]
            rows.append([r["head"], runtime, batch, _f(t["images_per_s"]), _f(speedup, 2), _f(t["first_call_s"]),
                         _f(m["load_s"]), f"{parity['max_score_diff']:.2g} ({parity['max_score_diff_rel']:.1g})",
                         f"{parity['class_changes']} of {parity['images']}"])
    return rows


def _load(load) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--train", action="store_true", help="add the anomax-train default run (minutes)")
    parser.add_argument("--only", nargs="+", default=(), choices=sorted(TABLES), help="only these measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    arguments = parser.parse_args(argv)
    report = run_suite(arguments.suite, arguments.out, arguments.train, tuple(arguments.only))
    print(markdown(report))
    if any("error" in r for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
