"""Tiling on small defects in large images (issue 17): one variant per process, a JSON line per run.

    python experiments/tiling.py VARIANT [--out experiments/results/tiling] [--n-train 20] ...

VARIANT is resize_256, resize_512, tiled_shared or tiled_per_position. Every variant composes the
anomax-train config (PatchCore + MobileNetV2 ImageNet, the defaults) with its overrides, fits on
the synthetic brick images (size x size, defects of defect_area of the image), and evaluates the
test split with evaluate.native_resolution (pixel metrics against the original 2048 x 2048 masks).
Timings: fit_s (features + coreset), score_s (scoring the test split + metrics), apply_s_per_image
(``model.apply`` on raw test images after one warm-up call). peak_rss_mib is the process's.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

VARIANTS = {
    "resize_256": ["preprocess.width=256", "preprocess.height=256"],
    "resize_512": ["preprocess.width=512", "preprocess.height=512"],
    "tiled_shared": ["tiling=default", "model.head.max_patches_per_image=128"],
    "tiled_per_position": ["tiling=default", "tiling.mode=per_position"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", default="experiments/results/tiling")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--defect-area", default="[0.0001,0.001]")
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=10, help="good and defective test images each")
    parser.add_argument("--apply-images", type=int, default=4)
    parser.add_argument("--override", action="append", default=[], help="further Hydra overrides")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from anomax.apps.config import CONF_DIR, register_schemas
    from anomax.data.images import read_image
    from anomax.evaluation import evaluate_dl_model
    from anomax.pipeline import build_model, read_configured_dataset, results_of, validate_config
    from anomax.training import TrainConfig

    overrides = ["dataset=synthetic", "dataset.texture=brick", f"dataset.size={args.size}",
                 f"dataset.defect_area={args.defect_area}", f"dataset.n_train={args.n_train}",
                 f"dataset.n_test_good={args.n_test}", f"dataset.n_test_defect={args.n_test}",
                 "dataset.validation_from_test=0.0", "cache_dir=null", "progress=false",
                 *VARIANTS[args.variant], *args.override]
    register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("anomax_train", overrides=overrides), resolve=True)
    validate_config(cfg)
    model = build_model(cfg)
    dataset = read_configured_dataset(cfg["dataset"], cfg["split"], cfg["seed"])

    start = time.perf_counter()
    model.fit(dataset, "train", train=TrainConfig.from_dict(cfg["train"]), progress=False)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    metrics = evaluate_dl_model(results_of(model, dataset, "test", None, False, native_resolution=True),
                                native_resolution=True)
    score_s = time.perf_counter() - start

    images = [read_image(s.image_file_name) for s in dataset.samples_of("test")[:args.apply_images]]
    model.apply(images)  # compiles this many images' batch shape (apply pads a short batch to a power of two)
    start = time.perf_counter()
    model.apply(images)
    apply_s = (time.perf_counter() - start) / len(images)

    record = {"variant": args.variant, "overrides": overrides,
              "num_train": len(dataset.samples_of("train")), "num_test_good": metrics["num_good"],
              "num_test_defective": metrics["num_defective"],
              "image_auroc": metrics["image"]["auroc"],
              "pixel_auroc": metrics["pixel"]["auroc"], "pixel_aupro": metrics["pixel"]["aupro"],
              "pixel_resolution": metrics["pixel"]["resolution"],
              "fit_s": round(fit_s, 1), "score_s": round(score_s, 1), "apply_s_per_image": round(apply_s, 2),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.variant}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
