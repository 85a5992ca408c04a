"""ONNX export of the whole inference; onnxruntime and OpenVINO behind the same apply as JAX.

One tiny MobileNetV2 model per head (its depthwise convolutions and every head's scoring go
through the converter), and one ResNet-18 (its stem max-pool), exported once into an artifact and
run in both runtimes.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

import tiny_models  # noqa: E402
import anomax  # noqa: E402
from anomax.errors import ArtifactError, ConfigError  # noqa: E402
from anomax.files import sha256_file  # noqa: E402
from anomax.model import AnomalyModel  # noqa: E402
from anomax.preprocess.params import preprocess_image  # noqa: E402

SIZE = 64
HEAD_SETUPS = {  # head hyperparams, adaptor kwargs: PatchCore with k > 1 exercises the top_k re-weighting
    "padim": ({"eps": 0.01}, {"pool_size": 1, "projection_dim": 16, "projection": "subset"}),
    "patchcore": ({"coreset_size": 32, "projection_dim": None, "num_neighbors": 3},
                  {"projection_dim": 16, "projection": "random"}),
    "student": ({"complexity": 4}, {"projection_dim": 8}),
    # both branches and the combined map through the runtimes; the maximum exercises the one non-mean op,
    # the branch image scores the standardisation saved with the head
    "efficientad": ({"width": 2, "ae_width": 2, "latent": 4, "distill_epochs": 1, "combine": "max",
                     "image_score": "branches"}, {"projection_dim": 8}),
    # the backbone as the teacher: MobileNetV2 runs in the graph again, feeding the head's maps
    "efficientad-backbone": ({"teacher": "backbone", "width": 2, "ae_width": 2, "latent": 4},
                             {"projection_dim": 8}),
    # ResNet's stem max-pool through the converter (its max-pool shim could not take torch's padding)
    "padim-resnet18": ({"eps": 0.01}, {"pool_size": 1, "projection_dim": 16, "projection": "subset"}),
}
RUNTIMES = ("onnxruntime", "openvino")
TOLERANCE = 1e-4  # relative to the largest value of the compared map or scores


def fitted_model(setup: str) -> AnomalyModel:
    """A tiny random-init MobileNetV2 (or the backbone the variant names; width 0.25) model whose head
    ('<head>' or '<head>-<variant>') is fitted on random images."""
    backbone = "resnet18" if setup.endswith("-resnet18") else "mobilenet_v2"
    return tiny_models.fitted_model(backbone, setup.split("-")[0], *HEAD_SETUPS[setup], size=SIZE)


def raw_images(count: int, seed: int = 1) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (count, SIZE + 8, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=list(HEAD_SETUPS))
def exported(request, tmp_path_factory):
    """(model with thresholds between its scores, artifact saved with model.onnx, JAX results on 5 images)."""
    model = fitted_model(request.param)
    images = raw_images(5)
    results = model.apply(images)
    scores = np.sort([r["anomaly_score"] for r in results])
    maps = np.stack([r["anomaly_image"] for r in results])
    # classification halfway between two scores (an image exactly at it could flip on rounding)
    model.thresholds = {"segmentation": float(np.quantile(maps, 0.9)), "classification": float(scores[2:4].mean())}
    expected = model.apply(images)
    path = anomax.save_model(model, tmp_path_factory.mktemp(request.param) / "model", onnx=True)
    return model, path, expected


def assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE * float(np.abs(want).max()))


def infer(model, images):
    import jax

    return jax.device_get(model._infer(model.params, images))


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_matches_jax_at_batch_1_and_5(exported, runtime):
    model, path, expected = exported
    deployed = anomax.load_model(path, runtime=runtime)
    for count in (1, 5):
        inputs = np.stack([preprocess_image(model.preprocess, image) for image in raw_images(count, seed=count)])
        want, got = infer(model, inputs), deployed.run(inputs)
        assert sorted(got) == sorted(want)
        for key in want:
            assert_close(got[key], want[key])
    results = deployed.apply(raw_images(5))  # batch_size 4: a full batch and a partial one
    for have, want in zip(results, expected):
        assert sorted(have) == sorted(want)
        assert_close(have["anomaly_image"], want["anomaly_image"])
        assert have["anomaly_score"] == pytest.approx(want["anomaly_score"], rel=TOLERANCE)
        assert have["anomaly_class"] == want["anomaly_class"]
        # a pixel within float rounding of the threshold may flip; nothing more
        assert np.mean(have["anomaly_region"]["mask"] != want["anomaly_region"]["mask"]) < 1e-3


@pytest.mark.slow
def test_jax_path_is_unchanged_by_the_export(exported):
    model, _, expected = exported  # expected was computed before the export
    for have, want in zip(model.apply(raw_images(5)), expected):
        assert have["anomaly_score"] == want["anomaly_score"]
        np.testing.assert_array_equal(have["anomaly_image"], want["anomaly_image"])


@pytest.mark.slow
def test_symbolic_batch_runs_any_batch_size(exported):
    import onnxruntime

    model, path, _ = exported
    session = onnxruntime.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", SIZE, SIZE, 3]
    for count in (1, 5, 16):
        inputs = np.random.default_rng(count).normal(size=(count, SIZE, SIZE, 3)).astype(np.float32)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": inputs})))
        want = infer(model, inputs)
        assert got["anomaly_image"].shape == (count, SIZE, SIZE) and got["anomaly_score"].shape == (count,)
        assert_close(got["anomaly_score"], want["anomaly_score"])


@pytest.mark.slow
def test_file_is_self_describing_for_programs_without_anomax(exported):
    import onnx

    model, path, _ = exported
    proto = onnx.load(str(path / "model.onnx"))
    assert {entry.domain: entry.version for entry in proto.opset_import}[""] == 18
    meta = {prop.key: prop.value for prop in proto.metadata_props}
    assert json.loads(meta["anomax.preprocess"]) == model.preprocess.to_dict()
    assert json.loads(meta["anomax.thresholds"]) == model.thresholds
    outputs = json.loads(meta["anomax.outputs"])  # efficientad adds its branches' maps and scores
    assert outputs == [output.name for output in proto.graph.output]
    assert sorted(outputs) == sorted(infer(model, np.zeros((1, SIZE, SIZE, 3), np.float32)))


@pytest.mark.slow
def test_the_metadata_names_the_domain_mask_beside_the_graph(tmp_path):
    """A program without anomax follows model.onnx's metadata to the mask copied into the artifact,
    not to the path it had on the training machine."""
    import onnx
    from PIL import Image

    model = fitted_model("padim")
    Image.fromarray(np.full((SIZE + 8, SIZE), 255, np.uint8)).save(tmp_path / "roi.png")
    model.preprocess = model.preprocess.replace(domain_handling="crop_domain", domain=str(tmp_path / "roi.png"))
    path = anomax.save_model(model, tmp_path / "model", onnx=True)
    meta = {prop.key: prop.value for prop in onnx.load(str(path / "model.onnx")).metadata_props}
    domain = json.loads(meta["anomax.preprocess"])["domain"]
    assert domain == "domain.png" and (path / domain).is_file()


@pytest.mark.slow
def test_graph_has_the_forms_the_runtimes_run_fast(exported):
    """relu6 as one Clip (fused into the convolution before it), not Max then Min; the map's
    upsampling and smoothing as MatMuls, no one-channel blur Conv; PatchCore's search over all
    patches as a minimum: no arg-min over the (patches, bank) distances."""
    import onnx

    model, path, _ = exported
    graph = onnx.load(str(path / "model.onnx")).graph
    producer = {output: node for node in graph.node for output in node.output}
    ops = [node.op_type for node in graph.node]
    if model.head.uses_backbone and model.backbone.name == "mobilenet_v2":  # efficientad's PDN teacher replaces it
        assert "Clip" in ops
    assert not [n for n in graph.node if n.op_type == "Min" and any(producer.get(i, n).op_type == "Max" for i in n.input)]
    weights = {w.name: list(w.dims) for w in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Conv" and weights.get(n.input[1], [0, 0])[1] == 1
                and weights.get(n.input[1], [0, 0])[0] == 1]
    if model.head.name == "patchcore":  # the search over all patches: distances alone (see test_kernels_neighbors)
        assert "ReduceMin" in ops


@pytest.fixture
def copy(exported, tmp_path):
    return Path(shutil.copytree(exported[1], tmp_path / "copy"))


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["padim"], indirect=True)  # file handling: the same for every head
def test_truncated_onnx_is_refused_naming_the_file(copy):
    onnx_file = copy / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="model.onnx does not match its sha256"):
        anomax.load_model(copy, runtime="onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["padim"], indirect=True)  # file handling: the same for every head
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_malformed_onnx_with_matching_hash_is_refused_naming_the_file(copy, runtime):
    onnx_file = copy / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:5000])  # truncated, then the manifest rehashed
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(onnx_file)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"{onnx_file} is not a loadable ONNX model"):
        anomax.load_model(copy, runtime=runtime)


def test_export_refuses_an_opset_it_cannot_honour(tmp_path):
    with pytest.raises(ConfigError, match="opset must be an integer from 17 to 23"):
        anomax.export_onnx(object(), tmp_path / "model.onnx", opset=11)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["padim"], indirect=True)
def test_export_names_a_missing_folder_first_and_leaves_the_root_logger_alone(exported, tmp_path, monkeypatch):
    """The folder was found missing after the whole conversion (about a minute at 256 x 256), with advice
    about disk space; jax2onnx logging through the root logger left a stderr handler there, so a station's
    own logging.basicConfig afterwards did nothing."""
    import logging

    import anomax.deploy.onnx_export as onnx_export
    from anomax.errors import OutputError

    model = exported[0]
    monkeypatch.setattr(onnx_export, "_converter", lambda: pytest.fail("converted before the folder was checked"))
    for export in (lambda path: anomax.export_onnx(model, path),
                   lambda path: anomax.export_inference(model, path, 1, SIZE, SIZE)):
        with pytest.raises(OutputError, match=f"no such folder: {tmp_path / 'missing'}; create it first"):
            export(tmp_path / "missing" / "model.onnx")
    monkeypatch.undo()
    root = logging.getLogger()
    before = list(root.handlers)
    monkeypatch.setattr(root, "handlers", [])  # as in a program that has not configured logging yet
    anomax.export_onnx(model, tmp_path / "model.onnx")
    assert root.handlers == []
    root.handlers = before


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["padim"], indirect=True)  # file handling: the same for every head
def test_runtime_needs_the_exported_file_and_a_known_name(exported, tmp_path):
    model = exported[0]
    path = anomax.save_model(model, tmp_path / "plain")  # no onnx=True
    with pytest.raises(ArtifactError, match="was saved without model.onnx"):
        anomax.load_model(path, runtime="openvino")
    # another model's graph dropped in beside the manifest is not part of this artifact
    shutil.copy(exported[1] / "model.onnx", path / "model.onnx")
    with pytest.raises(ArtifactError, match="was saved without model.onnx"):
        anomax.load_model(path, runtime="onnxruntime")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        anomax.load_model(exported[1], runtime="tensorrt")
    with pytest.raises(ConfigError, match="has no option"):
        anomax.load_model(exported[1], runtime="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="runtime 'jax' takes no options, got \\['threads'\\]"):
        anomax.load_model(exported[1], runtime="jax", threads=1)
    deployed = anomax.load_model(exported[1], runtime="onnxruntime")
    for bad in ({"segmentation": float("nan"), "classification": 0.5}, {"segmentation": "high", "classification": 1}):
        with pytest.raises(ConfigError, match="model parameter 'thresholds'"):
            deployed.set_params(thresholds=bad)  # the same rule as AnomalyModel.set_params
    with pytest.raises(ConfigError, match="openvino could not compile .* for device 'cpu' .*not registered.*devices here"):
        anomax.load_model(exported[1], runtime="openvino", device="cpu")  # the file is fine: the device name is not
    deployed.set_params(**deployed.get_params())  # get_params' values set back, as on AnomalyModel
    with pytest.raises(ConfigError, match="model parameter 'device' of a model run by onnxruntime .* runtime="):
        deployed.set_params(device="cpu")
    for runtime in RUNTIMES:  # a raw int() error, silently 2 for 2.7, or (OpenVINO) blamed on the device
        for threads in ("x", 2.7, True, -1):
            with pytest.raises(ConfigError, match=f"threads must be null .* got {threads!r}"):
                anomax.load_model(exported[1], runtime=runtime, threads=threads)
    for action, call in (("save_model", lambda: anomax.save_model(deployed, tmp_path / "again")),
                         ("export_onnx", lambda: anomax.export_onnx(deployed, tmp_path / "again.onnx")),
                         ("export_inference", lambda: anomax.export_inference(deployed, tmp_path / "f.npz", 1, SIZE, SIZE))):
        with pytest.raises(ConfigError, match=f"{action}: a model loaded with runtime='onnxruntime' .* runtime='jax'"):
            call()  # an AttributeError before
    assert not list(tmp_path.glob("again*")) and not (tmp_path / "f.npz").exists()


@pytest.mark.parametrize("exported", ["padim"], indirect=True)
def test_a_runtime_checks_what_runs_around_the_graph(exported, tmp_path):
    """The runtimes load without building the JAX model, so model.json's preprocess, thresholds and
    batch size are checked on their own: a rehashed edit is named as on the JAX path."""
    for key, edit in (("preprocess", lambda record: record["preprocess"].update(height=-3)),
                      ("thresholds", lambda record: record["thresholds"].update(classification=float("nan"))),
                      ("batch_size", lambda record: record.update(batch_size=0))):
        copy = shutil.copytree(exported[1], tmp_path / key)
        record = json.loads((copy / "model.json").read_text())
        edit(record)
        (copy / "model.json").write_text(json.dumps(record))
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["files"]["model.json"] = sha256_file(copy / "model.json")
        (copy / "manifest.json").write_text(json.dumps(manifest))
        for runtime in ("jax", *RUNTIMES):
            with pytest.raises(ArtifactError, match=rf"model\.json: '{key}' is invalid"):
                anomax.load_model(copy, runtime=runtime)
    deployed = anomax.load_model(exported[1], runtime="onnxruntime")
    assert deployed.get_params()["thresholds"] == exported[0].thresholds
    assert deployed.preprocess == exported[0].preprocess and deployed.batch_size == exported[0].batch_size
    # nor is JAX imported: a deployed model starts in under a second, not the several JAX's import takes
    for runtime in RUNTIMES:
        script = ("import sys, numpy as np, anomax; "
                  f"model = anomax.load_model({str(exported[1])!r}, runtime={runtime!r}); "
                  f"result = model.apply([np.zeros(({SIZE}, {SIZE}, 3), np.uint8)])[0]; "
                  "print(sorted(result), sorted(name for name in sys.modules if name.split('.')[0] in ('jax', 'flax')))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        assert "'anomaly_region'" in out and out.strip().endswith("] []"), out  # classified, and no JAX
    # anomax-predict too (its config schema alone is registered, not the training pipeline's)
    from PIL import Image

    Image.fromarray(raw_images(1)[0]).save(tmp_path / "part.png")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "anomax.apps.predict", f"model_dir={exported[1]}",
                           f"inputs={tmp_path / 'part.png'}", "runtime=onnxruntime", f"hydra.run.dir={tmp_path / 'p'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "p" / "results.csv").read_text().splitlines()) == 2
    assert not [line for line in done.stderr.splitlines() if line.split("|")[-1].strip() in ("jax", "flax")]


@pytest.mark.slow
@pytest.mark.parametrize("exported", ["padim"], indirect=True)
def test_a_fixed_batch_export_and_the_apps_runtime_setting(exported, tmp_path):
    """README's export_onnx(batch_size=8, opset=17): the file has that batch and opset; anomax-predict's
    runtime=onnxruntime with its batch_size (load_configured_model) scores as JAX does."""
    import onnx

    from anomax.apps._common import load_configured_model

    model, path, expected = exported
    fixed = anomax.export_onnx(model, tmp_path / "fixed.onnx", batch_size=8, opset=17)
    graph = onnx.load(str(fixed))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    deployed = load_configured_model({"model_dir": str(path), "runtime": "onnxruntime", "batch_size": 2})
    assert deployed.runtime == "onnxruntime" and deployed.batch_size == 2
    for have, want in zip(deployed.apply(raw_images(5)), expected):
        assert have["anomaly_score"] == pytest.approx(want["anomaly_score"], rel=TOLERANCE)
        assert have["anomaly_class"] == want["anomaly_class"]
