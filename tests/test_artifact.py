"""Model artifacts: bit-identical round trips, clear errors on damage, atomic writes, exported StableHLO."""
import errno
import importlib.util
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import tiny_models

import anomax
from anomax import artifact
from anomax.errors import ArtifactError, ConfigError, OutputError
from anomax.files import sha256_file
from anomax.evaluation.thresholds import AnomalyThresholds
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param
from PIL import Image

SIZE = 64
HEAD_SETUPS = {  # head hyperparams, adaptor kwargs: both projection kinds get stored
    "padim": ({"eps": 0.01}, {"pool_size": 1, "projection_dim": 16, "projection": "subset"}),
    "patchcore": ({"coreset_size": 32, "projection_dim": None, "num_neighbors": 3},
                  {"projection_dim": 16, "projection": "random"}),
    "student": ({"complexity": 4}, {"projection_dim": 8}),
}
ESTIMATES = AnomalyThresholds(1.5, 2.0, 3.0, 2.5, 2.6, None, "validation", 4.0, 5, 3)


def fitted_model(head_name: str) -> AnomalyModel:
    """A tiny random-init ResNet-18 model whose head is fitted on random images, with thresholds."""
    model = tiny_models.fitted_model("resnet18", head_name, *HEAD_SETUPS[head_name], size=SIZE)
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
    assert manifest["format"] == "anomax-model" and manifest["format_version"] == artifact.MODEL_FORMAT_VERSION
    assert manifest["anomax_version"] == anomax.__version__
    meta = artifact.read_metadata(path)
    assert meta["config"] == {"model": {"head": {"name": "padim"}}, "seed": 0}
    assert AnomalyThresholds.from_dict(meta["thresholds"]["estimates"]) == ESTIMATES
    assert meta["backbone"] == {"name": "resnet18", "taps": list(model.backbone.taps), "width_multiplier": 0.25,
                                "weights_sha256": None, "weights_file": None}
    assert not list(path.parent.glob(".model*")), "no staging directory is left behind"
    # every file as readable as the JSON ones (safetensors wrote its files 0600: another account could not serve them)
    umask = os.umask(0)
    os.umask(umask)
    assert {file.stat().st_mode & 0o777 for file in path.iterdir()} == {0o666 & ~umask}


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
    manifest["files"]["backbone.safetensors"] = sha256_file(file)
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


def test_a_run_directory_points_to_its_model(padim, tmp_path):
    shutil.copytree(padim[1], tmp_path / "run" / "model")
    with pytest.raises(ArtifactError, match=f"manifest.json is missing; the run directory's model is "
                                            f"{tmp_path / 'run' / 'model'}"):
        anomax.load_model(tmp_path / "run")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ArtifactError, match=f"no model artifact at {tmp_path / 'modle'}: the folder does not exist"):
        anomax.read_dl_model(tmp_path / "modle")


def test_crash_mid_save_leaves_nothing_loadable(padim, tmp_path, monkeypatch):
    model, existing = padim
    target = tmp_path / "model"

    def failing_write(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device"):
        anomax.write_dl_model(model, target)
    assert list(tmp_path.iterdir()) == []
    # Overwriting: the old artifact stays whole when the new save crashes.
    old = Path(shutil.copytree(existing, target))
    with pytest.raises(OutputError, match="No space left"):
        anomax.save_model(model, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    artifact.read_metadata(old)


def test_overwrite_only_when_asked(padim, copy):
    model, _ = padim
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        anomax.save_model(model, copy)
    before = (copy / "manifest.json").stat().st_mtime_ns
    anomax.save_model(model, copy, overwrite=True)
    assert (copy / "manifest.json").stat().st_mtime_ns != before, "a new artifact replaced the old one"
    assert not list(copy.parent.glob(".copy*"))
    artifact.read_metadata(copy)


@pytest.mark.parametrize("content", [{"notes.md": "my notes"}, {"manifest.json": '{"files": {}}', "a.txt": "x"}])
def test_overwrite_never_deletes_a_folder_that_is_not_an_artifact(padim, tmp_path, content):
    """A user's folder at the target (even one with some manifest.json) survives overwrite=True."""
    folder = tmp_path / "userdata"
    folder.mkdir()
    for name, text in content.items():
        (folder / name).write_text(text)
    with pytest.raises(OutputError, match=f"refusing to replace {folder}: it is not an anomax model artifact"):
        anomax.save_model(padim[0], folder, overwrite=True)
    assert {p.name: p.read_text() for p in folder.iterdir()} == content
    (tmp_path / "file").write_text("a file")
    with pytest.raises(OutputError, match="refusing to replace .*file: it is not an anomax model artifact"):
        anomax.save_model(padim[0], tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "userdata"]


def test_overwrite_refuses_an_artifact_holding_other_files(padim, copy):
    (copy / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match=r"refusing to replace .*copy: besides the artifact it holds notes\.md"):
        anomax.save_model(padim[0], copy, overwrite=True)
    assert (copy / "notes.md").read_text() == "mine"
    artifact.read_metadata(copy)


def _kill_mid_swap(path: Path) -> tuple[str, Path]:
    """The state a kill between the swap's two renames leaves: the artifact moved aside, a complete new
    one still in staging, nothing at ``path``. Returns the old manifest and the staging directory."""
    manifest = (path / "manifest.json").read_text()
    staging = Path(shutil.copytree(path, path.with_name(f".{path.name}.tmp-0123")))
    (staging / "head.safetensors").write_bytes(b"a newer, different head")
    path.rename(path.with_name(f".{path.name}.old-4567"))
    return manifest, staging


def test_a_swap_killed_midway_is_undone_by_the_next_load(copy):
    manifest, staging = _kill_mid_swap(copy)
    anomax.load_model(copy)
    assert (copy / "manifest.json").read_text() == manifest, "the old artifact is back in place"
    assert [p.name for p in copy.parent.iterdir()] == ["copy"], "staging and moved-aside copies are removed"


def test_a_swap_killed_midway_is_undone_by_the_next_save(padim, copy):
    _kill_mid_swap(copy)
    with pytest.raises(OutputError, match="already exists"):  # the restored artifact is not silently replaced
        anomax.save_model(padim[0], copy)
    assert [p.name for p in copy.parent.iterdir()] == ["copy"]
    artifact.read_metadata(copy)


def test_stale_copies_are_removed_by_the_next_save(padim, copy):
    (copy.parent / ".copy.tmp-89ab").mkdir()
    shutil.copytree(copy, copy.parent / ".copy.old-cdef")
    (copy.parent / ".copyright.tmp-1").mkdir()  # another target's: not touched
    anomax.save_model(padim[0], copy, overwrite=True)
    assert sorted(p.name for p in copy.parent.iterdir()) == [".copyright.tmp-1", "copy"]


def test_an_error_between_the_renames_puts_the_old_artifact_back(padim, copy, monkeypatch):
    manifest = (copy / "manifest.json").read_text()
    rename = os.rename

    def failing_rename(source, destination):
        if ".tmp-" in Path(source).name:  # the staging directory's move into place
            raise OSError(errno.EIO, "Input/output error")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OutputError, match=f"cannot write {copy}: Input/output error"):
        anomax.save_model(padim[0], copy, overwrite=True)
    assert [p.name for p in copy.parent.iterdir()] == ["copy"]
    assert (copy / "manifest.json").read_text() == manifest
    artifact.read_metadata(copy)


def test_unwritable_directory_is_an_output_error(padim, tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)  # what a read-only directory does to the save
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'model'}: Permission denied"):
        anomax.save_model(padim[0], tmp_path / "model")


def test_a_file_where_the_folder_should_be_is_an_output_error(padim, tmp_path):
    """A real OS error, unlike a read-only folder, which root (CI) writes into anyway."""
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'taken' / 'model'}: "):
        anomax.save_model(padim[0], tmp_path / "taken" / "model")
    assert (tmp_path / "taken").read_text() == "a file"


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
    assert set(report["batches"]) == {1, 2, "2, 1/call"}  # and one image per call at the largest batch size
    for key, timing in report["batches"].items():
        images_per_call = 1 if key == "2, 1/call" else key
        assert timing["images_per_s"] == pytest.approx(images_per_call / timing["median_s"])
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


# ---- a modified artifact whose manifest was rehashed: the loader still validates what it reads ----------
MJ = r"model\.json: "


def _rehashed(path: Path, name: str, edit) -> None:
    """Apply ``edit`` to the JSON file ``name`` and update its sha256 in the manifest, as an attacker would."""
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))
    if name != "manifest.json":
        _rehashed(path, "manifest.json", lambda manifest: manifest["files"].update({name: sha256_file(path / name)}))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["thresholds"].update(classification=float("nan")), MJ + r"'thresholds' is invalid: .*finite"),
    (lambda m: m["thresholds"].update(segmentation="2.0"), MJ + r"'thresholds' is invalid"),
    (lambda m: m["thresholds"].pop("segmentation"), MJ + r"'thresholds' is invalid"),
    (lambda m: m["thresholds"]["estimates"].pop("split"), MJ + r"'thresholds' is invalid: .*split"),
    # the estimates anomax-evaluate reads: refused when the model loads, not after the test split is scored
    (lambda m: m["thresholds"]["estimates"].update(largest_good="abc"),
     MJ + r"'thresholds' is invalid: largest_good must be a finite number, got 'abc'"),
    (lambda m: m["thresholds"]["estimates"].update(intermediate=float("nan")), MJ + r"'thresholds' .*intermediate"),
    (lambda m: m["thresholds"]["estimates"].update(split=3), MJ + r"'thresholds' is invalid: .*split"),
    (lambda m: m["thresholds"]["estimates"].update(num_good=-5), MJ + r"'thresholds' is invalid: num_good"),
    (lambda m: m.pop("batch_size"), MJ + r"'batch_size' is missing"),
    (lambda m: m.update(batch_size=0), MJ + r"'batch_size' is invalid: .*integer >= 1"),
    (lambda m: m.update(batch_size=None), MJ + r"'batch_size' is invalid"),
    (lambda m: m.update(extra=1), r"model\.json is invalid: unknown key\(s\) \['extra'\]"),
    (lambda m: m["head"].update(name="nohead"), MJ + r"'head' is invalid: unknown head 'nohead'"),
    (lambda m: m["head"].pop("hyperparams"), MJ + r"'head\.hyperparams' is missing"),
    (lambda m: m["head"]["hyperparams"].update(eps="big"), MJ + r"'head' is invalid: .*eps"),
    (lambda m: m["head"]["hyperparams"].update(unknown=1), MJ + r"'head' is invalid: .*unknown"),
    (lambda m: m["backbone"].update(name="nonet"), MJ + r"'backbone' is invalid: unknown backbone 'nonet'"),
    (lambda m: m["backbone"].update(width_multiplier=1e9),  # checked against the file, not allocated
     MJ + r"'backbone' is invalid: resnet18 with width_multiplier 1000000000.0 does not fit the stored arrays"),
    (lambda m: m["backbone"].update(width_multiplier="wide"), MJ + r"'backbone' is invalid: width_multiplier"),
    (lambda m: m["backbone"].update(width_multiplier=-1.0), MJ + r"'backbone' is invalid: width_multiplier"),
    (lambda m: m["backbone"].update(taps=["nope"]), MJ + r"'backbone' is invalid: .*nope"),
    (lambda m: m["adaptor"].update(projection_dim=3), r"adaptor\.safetensors: .* has shape"),
    (lambda m: m["adaptor"].update(pool_size=2), MJ + r"'adaptor' is invalid: .*pool_size"),
    (lambda m: m.update(preprocess=[1, 2]), MJ + r"'preprocess' is invalid"),
    (lambda m: m["preprocess"].update(width=-5), MJ + r"'preprocess' is invalid: .*width"),
    (lambda m: m["preprocess"].update(colour="red"),
     MJ + r"'preprocess' is invalid: unknown key\(s\) preprocess\.colour"),
    # the sections must fit together: PaDiM's per-position Gaussians are for the saved size's grid
    (lambda m: m["preprocess"].update(width=2 * m["preprocess"]["width"]), MJ + r"'preprocess' is invalid"),
    (lambda m: m["tiling"].update(tile_size=40, stride=40), MJ + r"'tiling' is invalid: .*multiple of 32"),
], ids=["nan-threshold", "string-threshold", "one-threshold", "estimates-key", "string-estimate", "nan-estimate",
    "number-split", "negative-count", "no-batch-size", "batch-size-0",
    "batch-size-null", "unknown-key", "unknown-head", "no-hyperparams", "string-eps", "unknown-hyperparam",
    "unknown-backbone", "absurd-width", "string-width", "negative-width", "unknown-tap", "projection-dim",
    "even-pool-size", "preprocess-list", "negative-image-width", "unknown-preprocess-key", "other-image-size",
    "tile-not-a-multiple"])
def test_loader_validates_a_rehashed_model_json(copy, edit, message):
    _rehashed(copy, "model.json", edit)
    with pytest.raises(ArtifactError, match=message):
        anomax.load_model(copy)


def _rehashed_arrays(path: Path, name: str, edit) -> None:
    """Apply ``edit`` to the arrays of the safetensors file ``name`` and rehash it in the manifest."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(path / name)
    edit(arrays)
    save_file(arrays, path / name)
    _rehashed(path, "manifest.json", lambda manifest: manifest["files"].update({name: sha256_file(path / name)}))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["mean"].__setitem__((0, 0, 0), np.nan), r"head 'padim' state \['mean'\] holds NaN"),
    (lambda a: a.update(whitening=np.full_like(a["whitening"], np.inf)), r"\['whitening'\] holds NaN, infinite"),
    (lambda a: a.update(mean=a["mean"][:1]), r"'mean' \(1, .*\) and 'whitening' .* do not fit together"),
    (lambda a: a.pop("whitening"), r"head\.safetensors: head 'padim' state lacks \['whitening'\]"),
    (lambda a: a.update(mean=a["mean"].astype(np.float16)), r"head\.safetensors: .*\['mean \(float16\)'\] is not of the type"),
    (lambda a: a.update(mean=a["mean"].astype(np.int32)), r"\['mean \(int32\)'\] is not of the type the head saves \(float32"),
], ids=["nan", "inf", "shapes", "missing", "float16", "int32"])
def test_loader_validates_rehashed_head_arrays(copy, edit, message):
    """Refused when the artifact loads, naming the array, not later in apply as a NaN score or a
    broadcasting error."""
    _rehashed_arrays(copy, "head.safetensors", edit)
    with pytest.raises(ArtifactError, match=message):
        anomax.load_model(copy)


@pytest.mark.parametrize("version", [0, -7, True, "2", 1.5, None])
def test_format_version_must_be_a_known_integer(copy, version):
    _rehashed(copy, "manifest.json", lambda manifest: manifest.update(format_version=version))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: 'format_version' must be an integer >= 1, got "
                                            rf"{re.escape(repr(version))}"):
        anomax.load_model(copy)


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "sub/file", "..", "nul\0byte"])
def test_manifest_entries_outside_the_artifact_are_refused(copy, name):
    _rehashed(copy, "manifest.json", lambda manifest: manifest["files"].update({name: "0" * 64}))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: 'files\.{re.escape(name)}' names .* not a file name "
                                            r"inside the artifact"):
        anomax.load_model(copy)


def test_links_leaving_the_artifact_are_refused(copy, tmp_path):
    (tmp_path / "outside.txt").write_text("not the artifact's")
    (copy / "notes.txt").symlink_to(tmp_path / "outside.txt")
    _rehashed(copy, "manifest.json", lambda manifest: manifest["files"].update(
        {"notes.txt": sha256_file(tmp_path / "outside.txt")}))
    with pytest.raises(ArtifactError, match=r"'files\.notes\.txt' names .*notes\.txt, a link that leaves"):
        anomax.load_model(copy)


@pytest.mark.parametrize("domain", ["../roi.png", "ROI", "/etc/hostname"])
def test_domain_mask_outside_the_artifact_is_refused(copy, tmp_path, domain):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "roi.png")
    _rehashed(copy, "model.json", lambda m: m["preprocess"].update(domain_handling="keep_domain", domain=domain))
    with pytest.raises(ArtifactError, match=r"model\.json: 'preprocess.*domain"):
        anomax.load_model(copy)


def test_an_unknown_runtime_is_named_before_the_artifact_is_looked_at(padim):
    """A mistyped runtime on a model saved without model.onnx: the runtime is what is wrong."""
    with pytest.raises(ConfigError, match="runtime must be one of jax, onnxruntime, openvino, got 'onnxruntme'"):
        artifact.load_model(padim[1], runtime="onnxruntme")


@pytest.mark.parametrize("edit, message", [
    (lambda a, key: a.update({key: a[key].astype(np.int32)}), r"is int32, the network needs float32"),
    (lambda a, key: a.update({key: np.full_like(a[key], np.nan)}), r"holds NaN or infinite values"),
], ids=["int32", "nan"])
def test_loader_validates_rehashed_backbone_arrays(copy, edit, message):
    """Right names and shapes but another dtype or NaN: refused naming the file and the array (they loaded,
    then scored differently or NaN)."""
    name = "backbone.safetensors"
    def edited(arrays):
        key = next(k for k, v in sorted(arrays.items()) if np.issubdtype(v.dtype, np.floating) and v.size > 1)
        edit(arrays, key)

    _rehashed_arrays(copy, name, edited)
    with pytest.raises(ArtifactError, match=f"{name}: .*{message}"):
        anomax.load_model(copy)


def test_an_unreadable_dtype_names_the_file(copy):
    """A dtype numpy lacks (float8) was reported as an invalid 'head' section of model.json."""
    import struct

    header = json.dumps({"mean": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (copy / "head.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    _rehashed(copy, "manifest.json", lambda manifest: manifest["files"].update(
        {"head.safetensors": sha256_file(copy / "head.safetensors")}))
    with pytest.raises(ArtifactError, match=r"head\.safetensors is not a complete safetensors file"):
        anomax.load_model(copy)


@pytest.mark.parametrize("edit", ["dropped", "reshaped"])
def test_an_exported_function_with_modified_parameters_is_refused_at_load(padim, tmp_path, edit):
    path = anomax.export_inference(padim[0], tmp_path / "f.npz", batch_size=1, height=SIZE, width=SIZE)
    bundle = dict(np.load(path))
    key = sorted(k for k in bundle if k != "__function__" and bundle[k].ndim > 1)[0]
    bundle = ({k: v for k, v in bundle.items() if k != key} if edit == "dropped"
              else {**bundle, key: bundle[key].reshape(-1)})
    np.savez(tmp_path / "edited.npz", **bundle)
    with pytest.raises(ArtifactError, match=r"edited\.npz: .*export it again"):
        anomax.load_exported(tmp_path / "edited.npz")


def test_export_at_a_size_the_head_cannot_score_names_the_sizes(padim, tmp_path):
    """PaDiM's per-position Gaussians fix the grid: exporting at twice the size was a raw broadcasting error."""
    with pytest.raises(ConfigError, match=f"cannot score {2 * SIZE}x{2 * SIZE} .* fitted state is for {SIZE}x{SIZE}"):
        anomax.export_inference(padim[0], tmp_path / "f.npz", batch_size=1, height=2 * SIZE, width=2 * SIZE)
    assert not (tmp_path / "f.npz").exists()


def test_estimates_saved_without_a_pair_warn_that_the_model_will_not_classify(padim, tmp_path, caplog):
    model = fitted_model("padim")
    model.set_params(thresholds={})
    with caplog.at_level("WARNING", logger="anomax"):
        anomax.save_model(model, tmp_path / "model", thresholds=ESTIMATES)
    assert "score without classifying" in caplog.text
    assert "anomaly_class" not in anomax.load_model(tmp_path / "model").apply(raw_images(1))[0]
