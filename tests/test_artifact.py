"""Model artifacts: bit-identical round trips, clear errors on damage, atomic writes, exported StableHLO."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import anomax
from anomax import artifact
from anomax.backbones import backbone_requirements, build_backbone
from anomax.errors import ArtifactError, ConfigError
from anomax.evaluation.thresholds import AnomalyThresholds
from anomax.features import FeatureAdaptor
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param
from PIL import Image
from anomax.registry import HEADS

SIZE = 64
HEAD_SETUPS = {  # head hyperparams, adaptor kwargs: both projection kinds get stored
    "padim": ({"eps": 0.01}, {"pool_size": 1, "projection_dim": 16, "projection": "subset"}),
    "patchcore": ({"coreset_size": 32, "projection_dim": None, "num_neighbors": 3},
                  {"projection_dim": 16, "projection": "random"}),
    "student": ({"complexity": 4, "train": {"max_num_epochs": 1, "batch_size": 4}}, {"projection_dim": 8}),
}
ESTIMATES = AnomalyThresholds(1.5, 2.0, 3.0, 2.5, 2.6, None, "validation", 4.0, 5, 3)


def fitted_model(head_name: str) -> AnomalyModel:
    """A tiny random-init ResNet-18 model whose head is fitted on random images."""
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    if not hasattr(backbone, "width_multiplier"):  # until Backbone records it itself
        backbone.width_multiplier = 0.25
    requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=SIZE, height=SIZE, **requirements)
    hyperparams, adaptor_kwargs = HEAD_SETUPS[head_name]
    adaptor = FeatureAdaptor(backbone.taps, **adaptor_kwargs)
    model = AnomalyModel(preprocess, backbone, adaptor, HEADS.get(head_name)(**hyperparams), batch_size=4)
    images = np.random.default_rng(0).normal(size=(8, SIZE, SIZE, 3)).astype(np.float32)
    features = model._features(backbone.params, model.adaptor_params, images)
    model.head.fit([{"image": images, "features": features, "valid": np.ones(8, bool)}])
    model.thresholds = {"segmentation": 2.0, "classification": 2.5}
    return model


def raw_images(count: int, seed: int = 1) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (count, SIZE + 8, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def padim(tmp_path_factory):
    model = fitted_model("padim")
    path = artifact.save_model(model, tmp_path_factory.mktemp("padim") / "model", thresholds=ESTIMATES,
                               config={"model": {"head": {"name": "padim"}}, "seed": 0})
    return model, path


@pytest.fixture
def copy(padim, tmp_path):
    return Path(shutil.copytree(padim[1], tmp_path / "copy"))


@pytest.mark.parametrize("head_name", ["padim", "patchcore", "student"])
def test_round_trip_is_bit_identical(head_name, tmp_path):
    model = fitted_model(head_name)
    loaded = anomax.load_model(anomax.save_model(model, tmp_path / "model"))
    images = raw_images(5)  # 5 = one full batch of 4 and a padded one
    expected, got = model.apply(images), loaded.apply(images)
    for want, have in zip(expected, got):
        assert have["anomaly_score"] == want["anomaly_score"]
        np.testing.assert_array_equal(have["anomaly_image"], want["anomaly_image"])
        np.testing.assert_array_equal(have["anomaly_region"]["mask"], want["anomaly_region"]["mask"])
        assert have["anomaly_class_id"] == want["anomaly_class_id"]
    assert loaded.get_params() == model.get_params()
    assert loaded.head.hyperparams == model.head.hyperparams


def test_layout_metadata_and_checksums(padim):
    model, path = padim
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert set(manifest["files"]) == set(artifact.REQUIRED_FILES)
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["anomax_version"] == anomax.__version__
    meta = artifact.read_metadata(path)
    assert meta["config"] == {"model": {"head": {"name": "padim"}}, "seed": 0}
    assert AnomalyThresholds.from_dict(meta["thresholds"]["estimates"]) == ESTIMATES
    assert meta["backbone"] == {"name": "resnet18", "taps": list(model.backbone.taps), "width_multiplier": 0.25,
                                "weights_sha256": None, "weights_file": None}
    assert not list(path.parent.glob(".model*")), "no staging directory is left behind"


def test_flipped_byte_names_the_file(copy):
    data = bytearray((copy / "head.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"head\.safetensors does not match its sha256"):
        anomax.load_model(copy)


def test_truncated_file_is_reported(copy):
    file = copy / "backbone.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"backbone\.safetensors does not match its sha256"):
        anomax.load_model(copy)
    # Even with a manifest that agrees (e.g. truncated before hashing), the reader says so.
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["backbone.safetensors"] = artifact._sha256(file)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"backbone\.safetensors is not a complete safetensors file"):
        anomax.load_model(copy)


def test_newer_format_asks_to_upgrade(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = artifact.FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="upgrade anomax"):
        anomax.load_model(copy)


@pytest.mark.parametrize("name", ["adaptor.safetensors", "model.json", "manifest.json"])
def test_missing_file_is_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.") + " is missing"):
        anomax.read_dl_model(copy)


def test_crash_mid_save_leaves_nothing_loadable(padim, tmp_path, monkeypatch):
    model, existing = padim
    target = tmp_path / "model"

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        anomax.write_dl_model(model, target)
    assert list(tmp_path.iterdir()) == []
    # Overwriting: the old artifact stays whole when the new save crashes.
    old = Path(shutil.copytree(existing, target))
    with pytest.raises(OSError, match="disk full"):
        anomax.save_model(model, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    artifact.read_metadata(old)


def test_overwrite_only_when_asked(padim, copy):
    model, _ = padim
    with pytest.raises(ArtifactError, match="already exists; pass overwrite=True"):
        anomax.save_model(model, copy)
    (copy / "stale.txt").write_text("from before")
    anomax.save_model(model, copy, overwrite=True)
    assert not (copy / "stale.txt").exists()
    assert not list(copy.parent.glob(".copy*"))
    artifact.read_metadata(copy)


def test_runtime_params(padim):
    loaded = anomax.load_model(padim[1])
    assert loaded.get_params() == {"batch_size": 4, "thresholds": {"segmentation": 2.0, "classification": 2.5},
                                   "device": f"{jax.devices()[0].platform}:0"}
    loaded.set_params(thresholds={}, batch_size=2, device="cpu")
    (result,) = loaded.apply(raw_images(1))
    assert set(result) == {"anomaly_image", "anomaly_score"}
    score = result["anomaly_score"]
    loaded.set_params(thresholds={"segmentation": 1e9, "classification": score})
    (result,) = loaded.apply(raw_images(1))
    assert result["anomaly_class"] == "nok" and not result["anomaly_region"]["mask"].any()
    for bad in ({"batch_size": 0}, {"thresholds": {"segmentation": 1.0}}, {"device": "tpu:7"},
                {"thresholds": {"segmentation": float("nan"), "classification": 1.0}}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            loaded.set_params(**bad)


EXPORTED_RUNNER = """
import sys
import numpy as np
from jax import export
bundle = dict(np.load(sys.argv[1], allow_pickle=False))
function = export.deserialize(bytearray(bundle.pop("__function__").tobytes()))
out = function.call(bundle, np.load(sys.argv[2]))
assert not any(name.startswith("anomax") for name in sys.modules), "the exported function needs no anomax"
np.savez(sys.argv[3], **{key: np.asarray(value) for key, value in out.items()})
"""


def test_exported_function_runs_without_anomax(padim, tmp_path):
    model = anomax.load_model(padim[1])
    path = anomax.export_inference(model, tmp_path / "padim.npz", batch_size=2, height=SIZE, width=SIZE)
    images = np.random.default_rng(3).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    subprocess.run([sys.executable, "-c", EXPORTED_RUNNER, str(path), str(tmp_path / "images.npy"),
                    str(tmp_path / "out.npz")], check=True, timeout=120)
    exported = np.load(tmp_path / "out.npz")
    library = jax.device_get(jax.jit(model.infer)(model.params, images))
    for key in ("anomaly_image", "anomaly_score"):
        np.testing.assert_allclose(exported[key], library[key], rtol=1e-6, atol=1e-6)
    in_process = anomax.load_exported(path)(images)
    np.testing.assert_allclose(in_process["anomaly_score"], library["anomaly_score"], rtol=1e-6, atol=1e-6)


def test_garbage_export_file_is_an_artifact_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a function")
    with pytest.raises(ArtifactError, match="bad.npz"):
        anomax.load_exported(tmp_path / "bad.npz")


def test_apply_benchmark_reports_each_batch_size(padim):
    spec = importlib.util.spec_from_file_location("apply_benchmark", Path(__file__).parents[1] / "benchmarks/apply.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report = benchmark.measure_apply(padim[1], batch_sizes=(1, 2), repeats=2)
    assert set(report["batches"]) == {1, 2}
    for batch_size, timing in report["batches"].items():
        assert timing["images_per_s"] == pytest.approx(batch_size / timing["median_s"])
        assert timing["first_call_s"] > 0 and report["load_s"] > 0


def test_domain_mask_travels_with_the_artifact(padim, tmp_path):
    model, _ = padim
    mask = np.zeros((SIZE + 8, SIZE), np.uint8)
    mask[4:SIZE + 4] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    model = AnomalyModel(create_dl_preprocess_param(**{**model.preprocess.to_dict(), "domain_handling": "crop_domain",
                                                       "domain": str(tmp_path / "roi.png")}),
                         model.backbone, model.adaptor, model.head, model.adaptor_params, batch_size=4)
    path = anomax.save_model(model, tmp_path / "model")
    images = raw_images(2)
    expected = [r["anomaly_score"] for r in model.apply(images)]
    (tmp_path / "roi.png").unlink()  # the loaded model must not need the original file
    loaded = anomax.load_model(path)
    assert Path(loaded.preprocess.domain).parent == path
    assert [r["anomaly_score"] for r in loaded.apply(images)] == expected


def test_config_must_be_json(padim, tmp_path):
    with pytest.raises(ConfigError, match="config must be plain JSON"):
        anomax.save_model(padim[0], tmp_path / "model", config={"path": Path("x")})
    assert not (tmp_path / "model").exists()
