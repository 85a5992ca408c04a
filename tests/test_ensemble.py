"""Ensembles (anomax.ensemble): backbone feature concatenation, score ensembles normalised on validation good images."""
import numpy as np
import pytest
from PIL import Image

from anomax.backbones import backbone_requirements, build_backbone
from anomax.data.dataset import DLDataset, Sample
from anomax.ensemble import ConcatBackbone, ScoreEnsemble
from anomax.errors import ConfigError, DatasetError, InputError
from anomax.features import FeatureAdaptor
from anomax.registry import HEADS
from anomax.heads.patchcore import PatchCore
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param

SIZE = 32


def tiny_backbone(name: str):
    return build_backbone(name, pretrained=None, width_multiplier=0.25)


def test_concat_backbone_names_and_stacks_every_members_taps():
    resnet, mobilenet = tiny_backbone("resnet18"), tiny_backbone("mobilenet_v2")
    both = ConcatBackbone([resnet, mobilenet])
    assert both.taps == tuple(f"resnet18/{t}" for t in resnet.taps) + tuple(f"mobilenet_v2/{t}" for t in mobilenet.taps)
    images = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    features = both(images)
    for member in (resnet, mobilenet):
        for tap, value in member(images).items():
            np.testing.assert_allclose(np.asarray(features[f"{member.name}/{tap}"]), np.asarray(value), rtol=1e-4, atol=1e-4)
            assert both.channels[f"{member.name}/{tap}"] == value.shape[-1]
    adapted = FeatureAdaptor(both.taps).apply({}, features)
    assert adapted.shape == (2, SIZE // 8, SIZE // 8, sum(both.channels.values()))


def test_each_member_gets_its_own_input_normalisation():
    """One image normalised for MobileNetV2 (ImageNet mean/std) feeds EfficientNet-Lite0 exactly as
    if it had been normalised for Lite0 ((x - 127) / 128)."""
    mobilenet, lite = tiny_backbone("mobilenet_v2"), tiny_backbone("efficientnet_lite0")
    both = ConcatBackbone([mobilenet, lite])
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.float32)
    as_first = [create_dl_preprocess_param(width=SIZE, height=SIZE, **{k: v for k, v in backbone_requirements(name).items()
                                                                        if k != "input_multiple"})
                for name in ("mobilenet_v2", "efficientnet_lite0")]
    from anomax.preprocess.params import preprocess_image

    mobilenet_input = np.stack([preprocess_image(as_first[0], p.astype(np.uint8)) for p in pixels])
    lite_input = np.stack([preprocess_image(as_first[1], p.astype(np.uint8)) for p in pixels])
    features = both(mobilenet_input)
    for tap, value in lite(lite_input).items():
        np.testing.assert_allclose(np.asarray(features[f"efficientnet_lite0/{tap}"]), np.asarray(value), rtol=1e-4, atol=1e-4)
    for tap, value in mobilenet(mobilenet_input).items():  # the first member's input is passed on unchanged
        np.testing.assert_allclose(np.asarray(features[f"mobilenet_v2/{tap}"]), np.asarray(value), rtol=1e-4, atol=1e-4)


def test_concat_backbone_from_config_names_a_wrong_member_key():
    from anomax.ensemble import concat_backbone

    with pytest.raises(ConfigError, match=r"members\[1\]: unknown key\(s\) \['tapz'\]"):
        concat_backbone([{"name": "resnet18"}, {"name": "mobilenet_v2", "tapz": ["features.6"]}])
    with pytest.raises(ConfigError, match=r"members\[0\].name: unknown backbone 'resnet19'"):
        concat_backbone([{"name": "resnet19"}, {"name": "mobilenet_v2"}])
    with pytest.raises(ConfigError, match="at least two"):
        concat_backbone([{"name": "resnet18"}])


def test_a_feature_ensemble_model_round_trips_bit_identically(tmp_path):
    import anomax
    import tiny_models

    model = tiny_models.fitted_model("mobilenet_v2+efficientnet_lite0", "patchcore",
                                     {"coreset_size": 16, "projection_dim": None, "num_neighbors": 3},
                                     {"projection_dim": 8, "projection": "random"}, size=SIZE)
    loaded = anomax.load_model(anomax.save_model(model, tmp_path / "model"))
    assert loaded.backbone.name == "mobilenet_v2+efficientnet_lite0" and loaded.backbone.taps == model.backbone.taps
    images = list(np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8))
    for want, have in zip(model.apply(images), loaded.apply(images)):
        assert have["anomaly_score"] == want["anomaly_score"]
        np.testing.assert_array_equal(have["anomaly_image"], want["anomaly_image"])


def member(backbone_name: str, head, size: int = SIZE) -> AnomalyModel:
    backbone = tiny_backbone(backbone_name)
    requirements = {k: v for k, v in backbone_requirements(backbone_name).items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=size, height=size, **requirements)
    return AnomalyModel(preprocess, backbone, FeatureAdaptor(backbone.taps, pool_size=1), head, batch_size=4)


def write_dataset(folder, seed: int, counts: dict) -> DLDataset:
    """Random images per (split, label); ``seed`` changes the pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for (split, label), count in counts.items():
        for _ in range(count):
            path = folder / f"{len(samples)}.png"
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
            samples.append(Sample(len(samples), str(path), label, "good" if label == "ok" else "crack", split=split))
    return DLDataset(samples, "test")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    dataset = write_dataset(folder, 0, {("train", "ok"): 4, ("validation", "ok"): 4, ("validation", "nok"): 3,
                                        ("test", "ok"): 2, ("test", "nok"): 2})
    members = [member("resnet18", PatchCore(coreset_ratio=0.5, projection_dim=None, num_neighbors=1)),
               member("mobilenet_v2", HEADS.get("padim")(eps=0.01))]
    for model in members:
        model.fit(dataset, progress=False)
    return dataset, ScoreEnsemble(members)


def test_fit_fits_each_member_with_its_own_train_settings_then_normalises(tmp_path):
    from anomax.training import TrainConfig

    dataset = write_dataset(tmp_path, 3, {("train", "ok"): 3, ("validation", "ok"): 2, ("test", "nok"): 1})
    ensemble = ScoreEnsemble([member("resnet18", PatchCore(coreset_ratio=0.5, projection_dim=None)),
                              member("mobilenet_v2", HEADS.get("padim")(eps=0.01))])
    given = []
    for model in ensemble.members:  # record what each member is fitted with, then fit it for real
        model.fit = (lambda fit: lambda *args, **kwargs: given.append(kwargs["train"]) or fit(*args, **kwargs))(
            model.fit)
    trains = [TrainConfig(max_num_epochs=2), TrainConfig(max_num_epochs=3)]
    info = ensemble.fit(dataset, train=trains, progress=False)
    assert given == trains and len(info["members"]) == 2
    assert info["normalisation"] == ensemble.stats == ensemble.normalise(dataset)
    with pytest.raises(ConfigError, match="2 members got 3 train settings"):
        ensemble.fit(dataset, train=trains + trains[:1], progress=False)


def test_fit_without_validation_good_images_fails_before_any_member_is_fitted(tmp_path):
    dataset = write_dataset(tmp_path, 4, {("train", "ok"): 3, ("validation", "nok"): 2})
    ensemble = ScoreEnsemble([member("resnet18", PatchCore(coreset_ratio=0.5, projection_dim=None))] * 2)
    ensemble.members[0].fit = lambda *args, **kwargs: pytest.fail("a member was fitted")
    with pytest.raises(DatasetError, match="'validation' split's good images, and the dataset has none"):
        ensemble.fit(dataset, progress=False)


def test_normalisation_uses_validation_good_images_only(fitted, tmp_path):
    dataset, ensemble = fitted
    stats = [dict(s) for s in ensemble.normalise(dataset)]
    # the same statistics when every other image (train, test, validation defects) is replaced
    other = write_dataset(tmp_path / "other", 1, {("train", "ok"): 4, ("validation", "nok"): 5, ("test", "ok"): 3,
                                                  ("test", "nok"): 3})
    validation_good = [s for s in dataset.samples if s.split == "validation" and s.anomaly_label == "ok"]
    mixed = DLDataset(other.samples + validation_good, "test")
    for again, first in zip(ensemble.normalise(mixed), stats):
        assert again == pytest.approx(first, rel=1e-6)
    # and they are the mean and std of each member's maps and scores on exactly those images
    for model, member_stats in zip(ensemble.members, stats):
        batches = list(model.score_split(DLDataset(validation_good, "test"), "validation", progress=False))
        maps = np.concatenate([b["anomaly_image"][b["valid"]] for b in batches]).astype(np.float64)
        scores = np.concatenate([b["anomaly_score"][b["valid"]] for b in batches]).astype(np.float64)
        assert member_stats["map_mean"] == pytest.approx(maps.mean(), rel=1e-5)
        assert member_stats["map_std"] == pytest.approx(maps.std(), rel=1e-5)
        assert member_stats["score_mean"] == pytest.approx(scores.mean(), rel=1e-5)
        assert member_stats["score_std"] == pytest.approx(scores.std(), rel=1e-5)


def test_ensemble_scores_are_the_mean_of_z_normalised_members(fitted):
    dataset, ensemble = fitted
    stats = ensemble.normalise(dataset)
    out = list(ensemble.score_split(dataset, "test"))
    members = [list(m.score_split(dataset, "test", progress=False)) for m in ensemble.members]
    for index, batch in enumerate(out):
        expected = np.mean([(m[index]["anomaly_score"] - s["score_mean"]) / s["score_std"]
                            for m, s in zip(members, stats)], axis=0)
        np.testing.assert_allclose(batch["anomaly_score"], expected, rtol=1e-5, atol=1e-6)
        expected_map = np.mean([(m[index]["anomaly_image"] - s["map_mean"]) / s["map_std"]
                                for m, s in zip(members, stats)], axis=0)
        np.testing.assert_allclose(batch["anomaly_image"], expected_map, rtol=1e-4, atol=1e-5)
    # on the normalising images themselves each normalised member map has mean 0 and std 1
    validation_good = DLDataset([s for s in dataset.samples if s.split == "validation" and s.anomaly_label == "ok"],
                                "test")
    single = ScoreEnsemble(ensemble.members[:1])
    single.normalise(dataset)
    maps = np.concatenate([b["anomaly_image"][b["valid"]] for b in single.score_split(validation_good, "validation")])
    assert maps.mean() == pytest.approx(0, abs=1e-4) and maps.std() == pytest.approx(1, rel=1e-4)


def test_a_member_of_another_input_size_is_normalised_at_the_ensembles_map_size(fitted):
    """The ensemble averages maps at the first member's size, so a member's map statistics are taken
    there too: resized, each member's normalised map has mean 0 and std 1 on the normalising images."""
    from anomax.ensemble import _resized

    dataset, _ = fitted
    larger = member("mobilenet_v2", HEADS.get("padim")(eps=0.01), size=2 * SIZE)
    larger.fit(dataset, progress=False)
    ensemble = ScoreEnsemble([member("resnet18", PatchCore(coreset_ratio=0.5, projection_dim=None)), larger])
    ensemble.members[0].fit(dataset, progress=False)
    stats = ensemble.normalise(dataset)
    good = DLDataset([s for s in dataset.samples if s.split == "validation" and s.anomaly_label == "ok"], "test")
    maps = np.concatenate([_resized(b["anomaly_image"], (SIZE, SIZE))[b["valid"]]
                           for b in larger.score_split(good, "validation", progress=False)]).astype(np.float64)
    assert maps.shape[1:] == (SIZE, SIZE)
    normalised_maps = (maps - stats[1]["map_mean"]) / stats[1]["map_std"]
    assert normalised_maps.mean() == pytest.approx(0, abs=1e-5) and normalised_maps.std() == pytest.approx(1, rel=1e-5)


def test_members_must_cover_the_same_region_of_the_image(fitted, tmp_path):
    """A cropped member's map covers its box only; averaged with a full-image map, a defect landed
    at two places at once. One mask file is one region, also once saved (each member keeps a copy)."""
    import anomax

    dataset, ensemble = fitted
    cropped = member("mobilenet_v2", HEADS.get("padim")(eps=0.01))
    cropped.preprocess = cropped.preprocess.replace(domain_handling="crop_domain", domain=(0, 0, SIZE // 2 - 1, SIZE - 1))
    with pytest.raises(ConfigError, match=r"ensemble member 1's preprocess.domain_handling / domain \('crop_domain'"):
        ScoreEnsemble([ensemble.members[0], cropped])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    members = [member(name, HEADS.get("padim")(eps=0.01)) for name in ("resnet18", "mobilenet_v2")]
    for model in members:
        model.preprocess = model.preprocess.replace(domain_handling="crop_domain", domain=str(tmp_path / "roi.png"))
        model.fit(dataset, progress=False)
    masked = ScoreEnsemble(members)
    masked.normalise(dataset)
    loaded = anomax.load_model(anomax.save_model(masked, tmp_path / "model"))  # refused: two copies, two paths
    assert [m.preprocess.domain for m in loaded.members] == [str(tmp_path / "model" / f"member-{i}" / "domain.png")
                                                             for i in (0, 1)]


def test_a_member_with_non_finite_maps_is_named_and_the_statistics_are_kept(fitted, monkeypatch):
    dataset, ensemble = fitted
    before = ensemble.normalise(dataset)
    scored = ensemble.members[1].score_split

    def with_nan(*args, **kwargs):
        for batch in scored(*args, **kwargs):
            yield {**batch, "anomaly_image": np.full_like(batch["anomaly_image"], np.nan)}

    monkeypatch.setattr(ensemble.members[1], "score_split", with_nan)
    with pytest.raises(InputError, match=r"member 1 \(.*\) gives non-finite anomaly_image"):
        ensemble.normalise(dataset)
    assert ensemble.stats == before


def test_normalise_needs_validation_good_images(fitted):
    dataset, ensemble = fitted
    without = DLDataset([s for s in dataset.samples if s.split != "validation"], "test")
    with pytest.raises(DatasetError, match="validation"):
        ensemble.normalise(without)


def test_anomax_train_config_builds_a_feature_ensemble():
    from hydra import compose, initialize_config_dir

    from anomax.apps.config import CONF_DIR, register_schemas
    from anomax.pipeline import build_model, validate_config

    register_schemas()
    tiny = "{pretrained: null, width_multiplier: 0.25}"
    members = f"[{{name: mobilenet_v2, {tiny[1:-1]}}}, {{name: efficientnet_lite0, {tiny[1:-1]}}}]"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("anomax_train", ["model/backbone=concat_lite2_mobilenet_v2", f"model.backbone.members={members}",
                                       "preprocess.width=64", "preprocess.height=64"])
        wrong = compose("anomax_train", ["model/backbone=concat_lite2_mobilenet_v2", f"model.backbone.members={members}",
                                         "preprocess.normalization_type=none"])
        typo = compose("anomax_train", ["model/backbone=concat_lite2_mobilenet_v2",
                                        "model.backbone.members=[{name: mobilenet_v2}, {name: resnet18, taps: 3, seeed: 1}]"])
    from anomax.apps._common import plain

    cfg, wrong, typo = plain(cfg), plain(wrong), plain(typo)  # what anomax-train passes on
    model = build_model(cfg)
    assert isinstance(model.backbone, ConcatBackbone) and model.backbone.name == "mobilenet_v2+efficientnet_lite0"
    assert model.preprocess.normalization_type == "constant_values"  # the first member's
    with pytest.raises(ConfigError, match="preprocess.normalization_type: a backbone ensemble"):
        build_model(wrong)
    same = {**cfg, "preprocess": {**cfg["preprocess"], "mean": list(model.preprocess.mean)}}  # the first member's
    assert build_model(same).preprocess.mean == model.preprocess.mean
    with pytest.raises(ConfigError, match=r"members\[1\]: unknown key\(s\) \['seeed'\]"):
        validate_config(typo)


# ---- the score ensemble as an artifact and as an anomax-train config ------------------------------------
def normalised(fitted) -> ScoreEnsemble:
    dataset, ensemble = fitted
    ensemble.normalise(dataset)
    ensemble.set_params(thresholds={"segmentation": 1.0, "classification": 0.5})
    return ensemble


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    import anomax

    return anomax.save_model(normalised(fitted), tmp_path_factory.mktemp("ensemble") / "model", config={"seed": 0})


def test_an_ensemble_artifact_round_trips_bit_identically(fitted, saved):
    import json

    import anomax

    ensemble = normalised(fitted)
    loaded = anomax.load_model(saved)
    assert isinstance(loaded, ScoreEnsemble) and loaded.stats == ensemble.stats
    assert loaded.get_params() == ensemble.get_params()
    assert [m.backbone.name for m in loaded.members] == ["resnet18", "mobilenet_v2"]
    images = list(np.random.default_rng(2).integers(0, 256, (5, SIZE + 4, SIZE, 3), dtype=np.uint8))
    want, have = ensemble.apply(images), loaded.apply(images)
    assert len(have) == 5 and {"anomaly_image", "anomaly_score", "anomaly_class", "anomaly_region"} <= set(have[0])
    for w, h in zip(want, have):
        assert h["anomaly_score"] == w["anomaly_score"] and h["anomaly_class_id"] == w["anomaly_class_id"]
        np.testing.assert_array_equal(h["anomaly_image"], w["anomaly_image"])
        np.testing.assert_array_equal(h["anomaly_region"]["mask"], w["anomaly_region"]["mask"])
    # apply gives the ensemble's scores as score_split does (one formula)
    dataset = fitted[0]
    test = [s for s in dataset.samples if s.split == "test"]
    scored = np.concatenate([b["anomaly_score"][b["valid"]] for b in loaded.score_split(dataset, "test")])
    applied = [r["anomaly_score"] for r in loaded.apply([np.asarray(Image.open(s.image_file_name)) for s in test])]
    np.testing.assert_allclose(applied, scored, rtol=1e-5, atol=1e-5)
    # each member folder is a one-model artifact of its own; the ensemble's manifest is format 2
    assert anomax.load_model(saved / "member-1").backbone.name == "mobilenet_v2"
    assert json.loads((saved / "manifest.json").read_text())["format_version"] == 2
    assert json.loads((saved / "member-0" / "manifest.json").read_text())["format_version"] == 1


def test_a_failed_ensemble_save_leaves_nothing_and_overwrite_replaces_one(fitted, saved, tmp_path, monkeypatch):
    import errno
    import shutil

    import anomax
    from anomax import artifact
    from anomax.errors import OutputError

    write_json = artifact._write_json

    def disk_full_at_ensemble_json(path, value):
        if path.name == "ensemble.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        write_json(path, value)

    monkeypatch.setattr(artifact, "_write_json", disk_full_at_ensemble_json)
    with pytest.raises(OutputError):
        anomax.save_model(normalised(fitted), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging folder
    monkeypatch.undo()
    copy = shutil.copytree(saved, tmp_path / "copy")
    anomax.save_model(normalised(fitted), copy, overwrite=True)  # an ensemble artifact is replaceable
    assert anomax.load_model(copy).stats == normalised(fitted).stats


@pytest.fixture
def ensemble_copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_a_tampered_or_incomplete_ensemble_artifact_is_refused_naming_the_file(ensemble_copy):
    import json
    import shutil

    import anomax
    from anomax.errors import ArtifactError
    from anomax.files import sha256_file

    head = ensemble_copy / "member-1" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-3] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"member-1/head\.safetensors does not match its sha256"):
        anomax.load_model(ensemble_copy)
    # a member manifest rehashed to the tampered file: the ensemble's manifest still holds the old one
    manifest = json.loads((ensemble_copy / "member-1" / "manifest.json").read_text())
    manifest["files"]["head.safetensors"] = sha256_file(head)
    (ensemble_copy / "member-1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"member-1/manifest\.json does not match its sha256"):
        anomax.load_model(ensemble_copy)
    shutil.rmtree(ensemble_copy / "member-1")
    with pytest.raises(ArtifactError, match=r"member-1/manifest\.json is missing"):
        anomax.load_model(ensemble_copy)


def test_a_rehashed_ensemble_json_is_still_validated(ensemble_copy):
    import json

    import anomax
    from anomax.errors import ArtifactError, ConfigError
    from anomax.files import sha256_file

    original = json.loads((ensemble_copy / "ensemble.json").read_text())

    def rehashed(edit):  # the edit on the original ensemble.json, rehashed in the manifest as an attacker would
        record = json.loads(json.dumps(original))
        edit(record)
        (ensemble_copy / "ensemble.json").write_text(json.dumps(record))
        manifest = json.loads((ensemble_copy / "manifest.json").read_text())
        manifest["files"]["ensemble.json"] = sha256_file(ensemble_copy / "ensemble.json")
        (ensemble_copy / "manifest.json").write_text(json.dumps(manifest))

    rehashed(lambda r: r["stats"][1].update(map_std=0.0))
    with pytest.raises(ArtifactError, match=r"ensemble\.json: 'stats' is invalid: .*'map_std' must be a finite number > "):
        anomax.load_model(ensemble_copy)
    rehashed(lambda r: r.update(members=["member-0", "../member-1"]))
    with pytest.raises(ArtifactError, match=r"ensemble\.json is invalid: 'members' must list the member folders"):
        anomax.load_model(ensemble_copy)
    rehashed(lambda r: None)
    with pytest.raises(ConfigError, match="runtime='jax' only"):
        anomax.load_model(ensemble_copy, runtime="onnxruntime")


TINY_RUN = ["+experiment=synthetic_smoke", "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4",
            "dataset.validation_from_train=0.25", "preprocess.width=32", "preprocess.height=32", "progress=false"]


def test_ensemble_configs_compose_and_bad_members_are_named():
    from anomax.apps.config import compose_train_config, ensemble_member_configs
    from anomax.pipeline import validate_config

    overrides = ["+experiment=elpv_best", "dataset=elpv_mono"]  # the chosen recipe is this ensemble
    cfg = compose_train_config(overrides)
    members = ensemble_member_configs(cfg, overrides)
    assert [m["model"]["backbone"]["name"] for m in members] == ["efficientnet_lite2", "mobilenet_v2",
                                                                   "efficientnet_lite2"]
    assert members[2]["model"]["backbone"]["taps"] == ["blocks.3", "blocks.6", "blocks.14"]
    head = cfg["model"]["head"]  # the run's head for every member; the third pools its stride-4 tap
    multi_scale = {**head, "adaptor": {**head["adaptor"], "grid_tap": "blocks.6"}}
    assert [m["model"]["head"] for m in members] == [head, head, multi_scale]
    assert all(m["dataset"] == cfg["dataset"] for m in members)
    assert len(validate_config(cfg, members).members) == 3
    with pytest.raises(ConfigError, match="ensemble.members lists 3 members, but 0"):
        validate_config(cfg)
    # On poly, validation chose the same members with the Lite2 inputs contrast-stretched per image,
    # from the 1st to the 99th percentile gray value.
    poly = ["+experiment=elpv_best", "dataset=elpv_poly"]
    poly_members = ensemble_member_configs(compose_train_config(poly), poly)
    assert [m["model"] for m in poly_members] == [m["model"] for m in members]
    assert [m["preprocess"]["normalization_type"] for m in poly_members] == ["all_channels", None, "all_channels"]
    assert [m["preprocess"].get("stretch_percentile") for m in poly_members] == [1, None, 1]
    assert all(m["preprocess"]["normalization_type"] is None for m in members)

    # the logical-parts recipe: its own model trained with three training seeds, nothing else changed
    logical = ["+experiment=efficientad_logical", "model.head.distill_images=/generic"]
    cfg = compose_train_config(logical)
    members = ensemble_member_configs(cfg, logical)
    assert [m["train"]["seed"] for m in members] == [0, 1001, 1002]
    assert all({**m, "train": None} == {**cfg, "train": None, "ensemble": m["ensemble"]} for m in members)
    assert len(validate_config(cfg, members).members) == 3
    clash = [*logical, "seed=1001"]  # the run's own training seed is a member's
    with pytest.raises(ConfigError, match=r"members\[1\] .*: the same model as ensemble.members\[0\]"):
        validate_config(compose_train_config(clash), ensemble_member_configs(compose_train_config(clash), clash))

    def check(*extra):
        cfg = compose_train_config([*TINY_RUN, *extra])
        validate_config(cfg, ensemble_member_configs(cfg, [*TINY_RUN, *extra]))

    for name in ("lite2_mobilenet_v2", "lite2_mobilenet_v2_lite2ms", "lite2_mobilenet_v2_lite2ms_lite1",
                 "lite2_mobilenet_v2_lite2ms_stretch", "lite2_mobilenet_v2_lite2ms_stretch_all",
                 "lite2_mobilenet_v2_lite2ms_robust_stretch", "lite2_mobilenet_v2_lite2ms_robust_stretch_all"):
        check(f"ensemble={name}")
    for overrides, message in [
        (["ensemble.members=[[],['model.head.coreset_ratoi=0.1']]"], r"members\[1\] .*: .*ratoi"),
        (["ensemble.members=[['model.head.coreset_ratio=2'],[]]"], r"members\[0\] .*: model.head.coreset_ratio = 2.0"),
        (["ensemble.members=[[],['batch_size=4']]"], r"members\[1\] .*: batch_size differs from the run's"),
        (["ensemble.members=[[],['dataset.texture=???']]"],
         r"members\[1\] .*: dataset.name does not resolve: .*dataset.texture"),
        (["ensemble.members=[[],[]]"], r"members\[1\] .*: the same model as ensemble.members\[0\]"),
        # PatchCore fits no networks: training seeds would fit three identical members
        (["model/head=patchcore", "ensemble=train_seeds3"],
         r"members\[1\] .*: the same model as ensemble.members\[0\] \(model.head 'patchcore' trains no networks"),
        (["ensemble.members=[[]]"], r"ensemble.members = \(\(\),\) is invalid"),
        (["ensemble=lite2_mobilenet_v2", "tiling=default"], r"tiling.tile_size: not available with a score ensemble"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check(*overrides)


def test_an_ensemble_without_validation_good_images_fails_before_any_fit(tmp_path):
    from anomax.apps.config import compose_train_config, ensemble_member_configs
    from anomax.pipeline import train_and_evaluate

    overrides = [*TINY_RUN, "dataset.validation_from_train=0.0", "dataset.validation_from_test=0.0",
                 "ensemble=lite2_mobilenet_v2"]
    cfg = compose_train_config(overrides)
    with pytest.raises(DatasetError, match=r"ensemble.members\) normalises its members on the 'validation' split's "
                                           r"good images, and the dataset has none"):
        train_and_evaluate(cfg, tmp_path / "run", members=ensemble_member_configs(cfg, overrides))
    assert not (tmp_path / "run" / "model").exists()


def test_training_seeds_ensemble_averages_each_branch_with_its_own_statistics(tmp_path):
    """efficientad members trained with different seeds: the ensemble gives 'anomaly_image_local' /
    '_global' and their scores too, each member's z-normalised with that output's own statistics
    on the validation good images; they travel with the artifact. A member without the branches
    (PatchCore) leaves the ensemble with the main output only."""
    import anomax
    from anomax.heads.efficientad import EfficientAD
    from anomax.training import TrainConfig

    dataset = write_dataset(tmp_path, 5, {("train", "ok"): 4, ("validation", "ok"): 4, ("test", "ok"): 2,
                                          ("test", "nok"): 2})
    head = dict(width=2, ae_width=2, latent=4, distill_epochs=1, sigma=1.0, image_score="branches")
    members = [member("resnet18", EfficientAD(**head)) for _ in range(2)]
    ensemble = ScoreEnsemble(members)
    ensemble.fit(dataset, train=[TrainConfig(max_num_epochs=2, batch_size=4, seed=seed) for seed in (0, 1001)],
                 progress=False)
    assert ensemble.branches == ("global", "local")
    keys = [f"anomaly_{kind}{suffix}" for suffix in ("", "_local", "_global") for kind in ("image", "score")]
    out = list(ensemble.score_split(dataset, "test"))
    per_member = [list(m.score_split(dataset, "test", progress=False)) for m in members]
    assert not np.array_equal(per_member[0][0]["anomaly_image_local"], per_member[1][0]["anomaly_image_local"])
    for suffix, branch in (("", None), ("_local", "local"), ("_global", "global")):
        stats = [s["branches"][branch] if branch else s for s in ensemble.stats]
        for index, batch in enumerate(out):
            for kind, prefix in (("image", "map"), ("score", "score")):
                key = f"anomaly_{kind}{suffix}"
                expected = np.mean([(m[index][key] - s[f"{prefix}_mean"]) / s[f"{prefix}_std"]
                                    for m, s in zip(per_member, stats)], axis=0)
                np.testing.assert_allclose(batch[key], expected, rtol=1e-4, atol=1e-5)
    # the statistics of each branch are its own: the global map's pixels are not the local map's
    assert ensemble.stats[0]["branches"]["local"] != ensemble.stats[0]["branches"]["global"]
    loaded = anomax.load_model(anomax.save_model(ensemble, tmp_path / "model"))
    assert loaded.stats == ensemble.stats
    images = list(np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    for want, have in zip(ensemble.apply(images), loaded.apply(images)):
        assert set(keys) <= set(have)
        for key in keys:
            np.testing.assert_array_equal(have[key], want[key])
    mixed = ScoreEnsemble([members[0], member("resnet18", PatchCore(coreset_ratio=0.5, projection_dim=None))])
    mixed.members[1].fit(dataset, progress=False)
    mixed.normalise(dataset)
    assert mixed.branches == () and not any(key.endswith(("_local", "_global")) for key in mixed.apply(images)[0])
    with pytest.raises(ConfigError, match="'branches' must map output names"):
        ScoreEnsemble(members, [{**ensemble.stats[0], "branches": [1]}, ensemble.stats[1]])
    with pytest.raises(ConfigError, match="'map_std' must be a finite number > 0"):
        broken = {**ensemble.stats[0], "branches": {"local": {**ensemble.stats[0]["branches"]["local"], "map_std": 0.0}}}
        ScoreEnsemble(members, [broken, ensemble.stats[1]])
