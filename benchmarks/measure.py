"""One benchmark measurement per process: ``python -m benchmarks.measure NAME '{"kwarg": ...}'``.

Prints one JSON line: the measurement's numbers plus ``peak_rss_mib``, this process's peak
resident memory (getrusage), which is why each measurement gets a fresh process. Timings:
the first call (compile + run) is reported as ``compile_s`` (or ``first_s``), one more call
warms up, then ``repeats`` timed calls give ``median_s`` and ``spread_s`` (max - min).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from anomax.apps.config import compose_train_config
from anomax.training import TrainConfig


def timed(call: Callable[[], object], repeats: int, warmups: int = 2) -> dict[str, float]:
    """{'first_s', 'median_s', 'spread_s'} of a call that blocks until its result is ready; the
    first of `warmups` untimed calls (compile + run where nothing was compiled before) is first_s."""
    first_s = None
    for number in range(warmups):
        began = time.perf_counter()
        call()
        first_s = time.perf_counter() - began if number == 0 else first_s
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return {"first_s": first_s, "median_s": statistics.median(times), "spread_s": max(times) - min(times),
            "repeats": repeats}


def compiled(function, *args):
    """(compiled function, compile seconds, flops from XLA's cost analysis)."""
    began = time.perf_counter()
    executable = jax.jit(function).lower(*args).compile()
    seconds = time.perf_counter() - began
    analysis = executable.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return executable, seconds, float(analysis.get("flops", 0.0))


def run_compiled(function, *args, repeats: int, warmups: int = 1) -> dict[str, float]:
    executable, compile_s, flops = compiled(function, *args)
    timing = timed(lambda: jax.block_until_ready(executable(*args)), repeats, warmups)
    return {"compile_s": compile_s, "flops": flops, "gflop_per_s": flops / timing["median_s"] / 1e9, **timing}


# ---- measurements -------------------------------------------------------------------------------
def matmul(n: int = 2048, repeats: int = 5) -> dict:
    """The machine's practical f32 peak: a plain n x n matmul."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    return {"n": n, **run_compiled(jnp.matmul, a, a, repeats=repeats)}


def backbone(name: str, size: int = 256, batch: int = 16, width_multiplier: float = 1.0, repeats: int = 5) -> dict:
    """Feature forward (default taps, random weights: speed does not depend on their values)."""
    from anomax.backbones import build_backbone

    kwargs = {} if width_multiplier == 1.0 else {"width_multiplier": width_multiplier}
    net = build_backbone(name, pretrained=None, **kwargs)
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    result = run_compiled(net.forward, net.params, images, repeats=repeats)
    return {"backbone": name, "taps": list(net.taps), "size": size, "batch": batch,
            "width_multiplier": width_multiplier, "images_per_s": batch / result["median_s"], **result}


def head(head: str, images: int = 64, size: int = 256, batch: int = 16, width_multiplier: float = 1.0,
         repeats: int = 3, **hyperparams) -> dict:
    """The real pipeline on a synthetic texture dataset: fit (read, preprocess, MobileNetV2
    random init, adaptor, head) and scoring of the test split (images/s). hyperparams are
    overrides of model.head (e.g. 'adaptor.projection_dim')."""
    from anomax.pipeline import build_model, read_configured_dataset

    cfg = _config(head, size, batch, width_multiplier, hyperparams)
    dataset = read_configured_dataset({"format": "synthetic", "size": size, "n_train": images, "n_test_good": batch,
                                       "n_test_defect": batch, "validation_from_train": 0.0}, {}, seed=0)
    model = build_model(cfg)
    infos = []
    train = TrainConfig.from_dict(cfg["train"])  # what the config says: HALCON's 30 epochs for the student
    fit = timed(lambda: infos.append(model.fit(dataset, train=train, progress=False)), repeats, warmups=1)
    score = timed(lambda: list(model.score_split(dataset, "test", progress=False)), repeats, warmups=1)
    test_images = len(dataset.samples_of("test"))
    return {"head": head, "train_images": images, "size": size, "batch": batch, "fit": fit,
            "fit_images_per_s": images / fit["median_s"], "coreset_s": infos[-1].get("coreset_seconds"),
            "score": score, "score_images_per_s": test_images / score["median_s"]}


def neighbors(queries: int = 16384, bank: int = 4208, dim: int = 128, chunk_size: int = 4096, repeats: int = 5):
    """Chunked exact 1-NN: PatchCore's scoring kernel (ELPV-mono-sized 1 % bank by default)."""
    from anomax.kernels.neighbors import nearest_neighbors

    rng = np.random.default_rng(0)
    q, b = (jnp.asarray(rng.normal(size=(n, dim)), jnp.float32) for n in (queries, bank))
    result = run_compiled(lambda q, b: nearest_neighbors(q, b, k=1, chunk_size=chunk_size), q, b, repeats=repeats)
    useful = 2.0 * queries * bank * dim  # the distance matmul; XLA's count adds the small extras
    return {"queries": queries, "bank": bank, "dim": dim, "chunk_size": chunk_size,
            "queries_per_s": queries / result["median_s"], "matmul_gflop_per_s": useful / result["median_s"] / 1e9,
            **result}


def coreset(rows: int = 420_864, dim: int = 128, ratio: float = 0.01, repeats: int = 1, chunks: int = 50,
            progress: bool = True) -> dict:
    """Greedy k-center selection on a random bank of ELPV mono's size (420,864 x 128), in ``chunks``
    compiled calls with a progress bar (1 and no bar: the selection as one compiled loop)."""
    from anomax.kernels.coreset import _steps, greedy_coreset

    size = max(1, int(rows * ratio))
    features = jnp.asarray(np.random.default_rng(0).normal(size=(rows, dim)), jnp.float32)
    began = time.perf_counter()  # compiles the chunk loop for this selection size: a chunk of no steps
    empty = (jnp.sum(jnp.square(features), axis=1), jnp.full((rows,), jnp.inf, features.dtype),
             jnp.zeros((size,), jnp.int32))
    _steps(features, *empty, jnp.int32(1), jnp.int32(1))[1].block_until_ready()
    compile_s = time.perf_counter() - began
    # Long-running: no warm-up selection (a 10 % coreset runs for many minutes).
    result = timed(lambda: greedy_coreset(features, size, 0, chunks=chunks, progress=progress).block_until_ready(),
                   repeats, 0)
    return {"rows": rows, "dim": dim, "ratio": ratio, "size": size, "chunks": chunks, "progress": progress,
            "ms_per_step": 1e3 * result["median_s"] / size, "compile_s": compile_s, **result}


def padim_memory(images: int, grid: int = 32, dim: int = 100, batch: int = 16) -> dict:
    """PaDiM fit fed synthetic FEATURE batches (batch, grid, grid, dim), as the adaptor would stream
    them; peak RSS must not grow with `images`."""
    from anomax.heads.padim import Padim

    began = time.perf_counter()
    info = Padim().fit(_feature_batches(images, grid, dim, batch))
    return {"images": images, "grid": grid, "dim": dim, "batch": batch, "fit_s": time.perf_counter() - began, **info}


def patchcore_scale(images: int = 5000, grid: int = 32, dim: int = 128, batch: int = 16,
                    max_patches_per_image: int | None = None, coreset_ratio: float = 0.01,
                    coreset_size: int | None = None) -> dict:
    """PatchCore fit on synthetic FEATURE batches of a 256x256 MobileNetV2 run (32 x 32 x 128 per
    image); bank size and peak RSS with or without per-image subsampling."""
    from anomax.heads.patchcore import PatchCore

    began = time.perf_counter()
    head = PatchCore(coreset_ratio=coreset_ratio, coreset_size=coreset_size,
                     max_patches_per_image=max_patches_per_image)
    info = head.fit(_feature_batches(images, grid, dim, batch))  # the image count known up front, as in a run
    return {"images": images, "grid": grid, "dim": dim, "max_patches_per_image": max_patches_per_image,
            "bank_mib": info["num_patches"] * dim * 4 / 2**20, "fit_s": time.perf_counter() - began, **info}


def apply(head: str = "patchcore", size: int = 256, images: int = 32, repeats: int = 10,
          hyperparams: dict | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """images/s of load_model(path).apply at batch 1 and 16, on an artifact fitted and saved here
    (the head's default settings updated by ``hyperparams``; other config keys by ``overrides``,
    e.g. the backbone taps that set an efficientad teacher's stride)."""
    from anomax.artifact import save_model
    from anomax.pipeline import build_model, read_configured_dataset
    from benchmarks.apply import measure_apply

    dataset = read_configured_dataset({"format": "synthetic", "size": size, "n_train": images, "n_test_good": 1,
                                       "n_test_defect": 1, "validation_from_train": 0.0}, {}, seed=0)
    model = build_model(_config(head, size, 16, 1.0, hyperparams or {}, overrides))
    model.fit(dataset, progress=False)
    label = " ".join([head, *(f"{k}={v}" for k, v in (hyperparams or {}).items()), *overrides])
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(model, Path(folder) / "model")
        return {"head": label, "size": size, **measure_apply(path, (1, 16), repeats=repeats)}


def deploy(head: str = "patchcore", size: int = 256, images: int = 32, test_images: int = 16, repeats: int = 10,
           hyperparams: dict | None = None, width_multiplier: float = 1.0) -> dict:
    """Apply images/s in jax / onnxruntime / OpenVINO (f32 and the CPU's default precision), side by side,
    at batch 1 and 16, plus each runtime's score and class differences from JAX on the test images
    (thresholds: the median JAX test score, the 99th percentile of JAX map pixels: the tightest place)."""
    from anomax.artifact import save_model
    from anomax.data.images import read_image
    from anomax.pipeline import build_model, read_configured_dataset
    from benchmarks.apply import compare_runtimes, measure_runtimes

    dataset = read_configured_dataset({"format": "synthetic", "size": size, "n_train": images,
                                       "n_test_good": test_images // 2, "n_test_defect": test_images - test_images // 2,
                                       "validation_from_train": 0.0}, {}, seed=0)
    model = build_model(_config(head, size, 16, width_multiplier, hyperparams or {}))
    model.fit(dataset, progress=False)
    tests = [read_image(sample.image_file_name) for sample in dataset.samples_of("test")]
    results = model.apply(tests)
    model.set_params(thresholds={"segmentation": float(np.quantile([r["anomaly_image"] for r in results], 0.99)),
                                 "classification": float(np.median([r["anomaly_score"] for r in results]))})
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        path = save_model(model, Path(folder) / "model", onnx=True)
        save_s = time.perf_counter() - began
        return {"head": head, "size": size, "save_with_onnx_s": save_s,
                "onnx_mib": (path / "model.onnx").stat().st_size / 2**20,
                **measure_runtimes(path, repeats=repeats), "parity": compare_runtimes(path, tests)}


def train(overrides: tuple[str, ...] = ()) -> dict:
    """Wall time of `anomax-train` (default: PatchCore + MobileNetV2 ImageNet on ELPV mono)."""
    import subprocess

    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "anomax.apps.train", f"hydra.run.dir={folder}", *overrides]
        began = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        wall_s = time.perf_counter() - began
        if run.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-2000:]}")
        record = json.loads((Path(folder) / "metrics.json").read_text())
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"command": " ".join(["anomax-train", *overrides]), "wall_s": wall_s, **record["timings"],
            "summary": record["summary"], "child_peak_rss_mib": children}


def lever(overrides: tuple[str, ...] = (), dataset: str = "elpv_mono", repeats: int = 5) -> dict:
    """The cost of a detection-quality lever (issue 15): the anomax-train config ``dataset=... overrides``
    (real pretrained weights, real images), fitted on the whole training split once (read and
    preprocess without the cache, features, coreset), saved, and applied at batch 1 and 16."""
    from anomax.artifact import save_model
    from anomax.pipeline import build_model, read_configured_dataset, validate_config
    from benchmarks.apply import measure_apply

    cfg = compose_train_config([f"dataset={dataset}", "cache_dir=null", *overrides])
    settings = validate_config(cfg)
    model = build_model(cfg)
    data = read_configured_dataset(cfg["dataset"], settings.split, settings.run.seed)
    began = time.perf_counter()
    info = model.fit(data, "train", train=settings.train, progress=False)
    fit_s = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(model, Path(folder) / "model")
        applied = measure_apply(path, (1, 16), repeats=repeats)
    return {"overrides": list(overrides), "dataset": dataset, "train_images": len(data.samples_of("train")),
            "fit_s": fit_s, "coreset_s": info.get("coreset_seconds"), "bank_rows": info.get("num_patches"),
            "coreset_size": info.get("coreset_size"),
            "apply_images_per_s": {str(b): r["images_per_s"] for b, r in applied["batches"].items()}}


# ---- helpers --------------------------------------------------------------------------------------
def tiling(head: str = "patchcore", images: int = 50, test_images: int = 20, width: int = 2592, height: int = 1944,
           tile_size: int = 256, stride: int = 224, batch: int = 16, mode: str = "shared", **hyperparams) -> dict:
    """Tiled fit and scoring of multi-megapixel images (issue 17): the real pipeline (PNG files ->
    preprocess at full resolution -> tiles -> MobileNetV2 random init -> adaptor -> head -> stitched
    maps), ``images`` training and ``test_images`` test images of width x height. Reports the fit
    and scoring times and the process's peak RSS after each (the images are written first, untimed)."""
    from anomax.data.formats.mvtec_ad import read_mvtec_ad
    from anomax.pipeline import build_model

    root = Path(tempfile.gettempdir()) / f"anomax-bench-tiling-{width}x{height}-{images}-{test_images}"
    if not (root / "done").exists():
        _write_large_images(root, images, test_images, width, height)
    dataset = read_mvtec_ad(root, "part")
    overrides = [f"model/head={head}", "model.backbone.pretrained=null", "tiling=default",
                 f"tiling.tile_size={tile_size}", f"tiling.stride={stride}", f"tiling.mode={mode}",
                 f"batch_size={batch}", "cache_dir=null", *(f"model.head.{k}={v}" for k, v in hyperparams.items())]
    model = build_model(compose_train_config(overrides))
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    began = time.perf_counter()
    info = model.fit(dataset, "train", progress=False)
    fit_s, fit_rss = time.perf_counter() - began, rss()
    began = time.perf_counter()
    scored = sum(int(batch["valid"].sum()) for batch in model.score_split(dataset, "test", progress=False))
    score_s = time.perf_counter() - began
    tiles = info.get("tiling", {}).get("num_tiles") or len(info.get("cells", ())) * images
    return {"head": head, "mode": mode, "width": width, "height": height, "tile_size": tile_size, "stride": stride,
            "batch": batch, "train_images": images, "test_images": scored, "train_tiles": tiles,
            "hyperparams": hyperparams, "fit_s": fit_s, "fit_peak_rss_mib": fit_rss, "score_s": score_s,
            "score_images_per_s": scored / score_s, "num_patches": info.get("num_patches")}


def _write_large_images(root: Path, images: int, test_images: int, width: int, height: int) -> None:
    """MVTec-layout good images: scikit-image's brick texture tiled to width x height, seeded noise added."""
    import shutil

    import skimage.data
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    texture = skimage.data.brick()
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("test", test_images)):
        folder = root / "part" / split / "good"
        folder.mkdir(parents=True)
        for i in range(count):
            shift = rng.integers(0, texture.shape[0], 2)
            tiled = np.roll(texture, tuple(shift), (0, 1))
            tiled = np.tile(tiled, (-(-height // texture.shape[0]), -(-width // texture.shape[1])))[:height, :width]
            noisy = np.clip(tiled + rng.normal(0, 4, tiled.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{i:03d}.png", compress_level=1)
    (root / "done").touch()


def _config(head: str, size: int, batch: int, width_multiplier: float, hyperparams: dict,
            overrides: tuple[str, ...] = ()) -> dict:
    """The composed config of conf/ for MobileNetV2 (random init) + `head` at size x size."""
    return compose_train_config([f"model/head={head}", "model.backbone.pretrained=null",
                     f"model.backbone.width_multiplier={width_multiplier}", f"preprocess.width={size}",
                     f"preprocess.height={size}", f"batch_size={batch}", "cache_dir=null",
                     *(f"model.head.{k}={v}" for k, v in hyperparams.items()), *overrides])


def _feature_batches(images: int, grid: int, dim: int, batch: int):
    """Random (batch, grid, grid, dim) feature batches, the last one padded; one batch in memory at a
    time; with the image count known up front, as AnomalyModel.fit hands them to a head."""
    from anomax.heads._base import FeatureBatches

    def make() -> Iterator[dict]:
        rng = np.random.default_rng(0)
        for start in range(0, images, batch):
            valid = np.arange(start, start + batch) < images
            yield {"features": rng.standard_normal((batch, grid, grid, dim), np.float32), "valid": valid}

    return FeatureBatches(make, images, batch)


MEASUREMENTS = ("matmul", "backbone", "head", "neighbors", "coreset", "padim_memory", "patchcore_scale", "apply",
                "deploy", "train", "lever", "tiling")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MEASUREMENTS:
        sys.exit(f"usage: python -m benchmarks.measure NAME ['{{JSON keyword arguments}}']; NAME one of "
                 f"{', '.join(MEASUREMENTS)} (each a function of benchmarks/measure.py, its arguments its keywords)")
    name, kwargs = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    result = globals()[name](**kwargs)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, default=float))
