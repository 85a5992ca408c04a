"""The efficientad head on tiny shapes: its loss and normalisation against numpy, the training
protocol (HALCON's parameters, early stop, best epoch, seeds), and the maps through apply and an
artifact round trip. The teacher target is a random-init narrow ResNet-18's adapted features."""
import dataclasses
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import anomax
from anomax.backbones import backbone_requirements, build_backbone
from anomax.errors import ArtifactError, ConfigError, DatasetError, InputError
from anomax.features import FeatureAdaptor
from anomax.heads._pdn import Conv, average_pool
from anomax.heads.efficientad import (EfficientAD, colour_jitter, distillation_batches, hard_feature_errors,
                                     hard_feature_loss, map_quantiles, normalise, order_statistics, quantile)
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param, pixel_scale, preprocess_image
from anomax.registry import HEADS
from anomax.tiling import TilingConfig
from anomax.training import TrainConfig

SIZE = 32
HEAD = dict(width=2, ae_width=2, latent=4, distill_epochs=2, sigma=1.0)
TRAIN = TrainConfig(max_num_epochs=4, error_threshold=0.0, domain_ratio=0.5, batch_size=4, learning_rate=0.003)
KEYS = ("anomaly_image", "anomaly_image_local", "anomaly_image_global")


def build_model(**head) -> AnomalyModel:
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=SIZE, height=SIZE, **requirements)
    adaptor = FeatureAdaptor(backbone.taps, projection_dim=8)
    return AnomalyModel(preprocess, backbone, adaptor, EfficientAD(**{**HEAD, **head}), batch_size=4)


MODEL = build_model()
IMAGES = np.random.default_rng(0).normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)


def batches(images):
    """Fixed-shape batches like the model's: the last one padded and marked invalid."""
    for start in range(0, len(images), 4):
        chunk = images[start:start + 4]
        padded = np.concatenate([chunk, np.zeros((4 - len(chunk), *chunk.shape[1:]), np.float32)])
        features = MODEL._features(MODEL.backbone.params, MODEL.adaptor_params, padded)
        yield {"image": padded, "features": np.asarray(features), "valid": np.arange(4) < len(chunk)}


def fit(validation=None, distill=None, **train):
    head = EfficientAD(**HEAD)
    info = head.fit(batches(IMAGES), train=dataclasses.replace(TRAIN, **train), preprocess=MODEL.preprocess,
                    validation=None if validation is None else batches(validation), distill=distill)
    return head, info


@pytest.fixture(scope="module")
def trained():
    return fit()


def test_hard_feature_loss_matches_numpy():
    errors = np.random.default_rng(1).exponential(size=(2, 3, 4, 50)).astype(np.float32)
    for q in (0.0, 0.5, 0.9, 0.999):
        np.testing.assert_allclose(quantile(jnp.asarray(errors), q), np.quantile(errors, q), rtol=1e-6)
        reference = errors[errors >= np.quantile(errors, q)].mean()
        np.testing.assert_allclose(hard_feature_loss(jnp.asarray(errors), q), reference, rtol=1e-5)
        # The per-position shares the training loop averages give the same loss.
        np.testing.assert_allclose(hard_feature_errors(jnp.asarray(errors), q).mean(), reference, rtol=1e-5)
    assert hard_feature_errors(jnp.asarray(errors), 0.9).shape == (2, 3, 4)


def test_order_statistics_are_exact_for_any_floats():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(size=300) * 10.0 ** rng.integers(-30, 30, size=300),
                             [0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf, 2.5, 2.5]]).astype(np.float32)
    ranks = (0, 1, 7, 155, 309, 308)
    np.testing.assert_array_equal(np.asarray(order_statistics(jnp.asarray(values), ranks)), np.sort(values)[list(ranks)])
    for q in (0.3, 0.999):  # negative values too: the quantile is numpy's
        np.testing.assert_allclose(quantile(jnp.asarray(values[:300]), q), np.quantile(values[:300], q), rtol=1e-6)


@pytest.mark.parametrize("size, stride, shape", [(4, 1, (7, 6)), (3, 1, (5, 5)), (4, 2, (9, 8)), (1, 1, (3, 4))])
def test_conv_matches_lax_convolution(size, stride, shape):
    conv = Conv(3, 5, size, stride, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, *shape, 3)).astype(np.float32))
    reference = jax.lax.conv_general_dilated(x, conv.kernel[...], (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
    np.testing.assert_allclose(conv(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_pooling_and_its_onnx_export_form_agree(factor):
    """The PDN's average pooling against a numpy mean of zero-padded blocks, and the grouped
    convolution the ONNX export traces instead (OpenVINO refuses the 6-D Conv of reduce_window)."""
    from anomax.deploy.onnx_export import _grouped_strided_average_pool

    x = np.random.default_rng(factor).normal(size=(2, 13, 10, 3)).astype(np.float32)  # sizes not multiples
    rows, cols = -(-13 // factor), -(-10 // factor)
    padded = np.zeros((2, rows * factor, cols * factor, 3), np.float32)
    padded[:, :13, :10] = x
    expected = padded.reshape(2, rows, factor, cols, factor, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(average_pool(jnp.asarray(x), factor), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_grouped_strided_average_pool(jnp.asarray(x), factor), expected, rtol=1e-6, atol=1e-6)


def test_quantile_normalisation_on_known_maps():
    maps = np.arange(2000, dtype=np.float32).reshape(5, 20, 20)
    quantiles = map_quantiles(maps)
    np.testing.assert_allclose(quantiles, [0.9 * 1999, 0.995 * 1999], rtol=1e-6)
    normalised = np.asarray(normalise(jnp.asarray([quantiles[0], quantiles[1], 2 * quantiles[1] - quantiles[0]]),
                                      jnp.asarray(quantiles)))
    np.testing.assert_allclose(normalised, [0.0, 0.1, 0.2], atol=1e-6)


@pytest.mark.parametrize("normalization", [dict(normalization_type="constant_values"),
                                           dict(normalization_type="none", range_min=-2.0, range_max=3.0)])
def test_pixel_scale_maps_pixels_to_model_inputs(normalization):
    params = create_dl_preprocess_param(width=6, height=5, **normalization)
    image = np.random.default_rng(1).integers(0, 256, (5, 6, 3), np.uint8)
    scale, offset = pixel_scale(params)
    np.testing.assert_allclose(preprocess_image(params, image), image / 255 * scale + offset, rtol=1e-5, atol=1e-5)


def test_colour_jitter_is_brightness_contrast_or_saturation_in_pixel_space():
    """Each image gets one of torchvision's ColorJitter operations: out = f * p + (1 - f) * t in
    pixels, t = 0 (brightness), the image's mean luma (contrast) or each pixel's luma (saturation),
    f in [0.8, 1.2]. Pixels in [0.2, 0.8] never clip at this strength."""
    scale, offset = pixel_scale(MODEL.preprocess)
    pixels = np.random.default_rng(2).uniform(0.2, 0.8, (48, 5, 6, 3)).astype(np.float32)
    out = np.asarray(colour_jitter(jax.random.key(3), pixels * scale + offset, 0.2, scale, offset))
    out = (out - offset) / scale
    luma = (pixels @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    kinds = []
    for p, o, y in zip(pixels, out, luma):
        fits = []
        for t in (np.zeros_like(p), np.full_like(p, y.mean()), np.broadcast_to(y, p.shape)):
            factor = np.sum((o - t) * (p - t)) / np.sum((p - t) ** 2)
            fits.append((np.abs(factor * (p - t) + t - o).max(), factor))
        kind = int(np.argmin([error for error, _ in fits]))
        assert fits[kind][0] < 1e-5 and 0.8 <= fits[kind][1] <= 1.2
        kinds.append(kind)
    assert set(kinds) == {0, 1, 2}
    # strength 0 changes nothing; one channel has no saturation to change
    same = colour_jitter(jax.random.key(3), pixels * scale + offset, 0.0, scale, offset)
    np.testing.assert_allclose((np.asarray(same) - offset) / scale, pixels, atol=1e-5)
    gray = pixels[..., :1]
    out = np.asarray(colour_jitter(jax.random.key(3), gray, 0.2))
    changed = np.abs(out - gray).max(axis=(1, 2, 3)) > 1e-6
    assert np.array_equal(changed, np.asarray(kinds) != 2)


def test_colour_jitter_changes_only_what_the_global_branch_learns_from(trained):
    """ae_jitter > 0: the same teacher (distillation does not see the jitter), another student and
    autoencoder, the same seed giving the same result."""
    head, info = trained
    jittered = [EfficientAD(**HEAD, ae_jitter=0.2) for _ in range(2)]
    infos = [j.fit(batches(IMAGES), train=TRAIN, preprocess=MODEL.preprocess) for j in jittered]
    assert info["ae_jitter"] == 0.0 and infos[0]["ae_jitter"] == 0.2
    assert [e["error"] for e in infos[0]["log"]] == [e["error"] for e in infos[1]["log"]]
    for key in head.state:
        if key.startswith("teacher"):
            np.testing.assert_array_equal(jittered[0].state[key], head.state[key])
        if key.startswith("autoencoder"):
            np.testing.assert_array_equal(jittered[0].state[key], jittered[1].state[key])
    assert any(not np.array_equal(jittered[0].state[k], head.state[k]) for k in head.state if k.startswith("autoencoder"))


def test_fit_reports_halcon_results_and_both_phases(trained):
    head, info = trained
    errors = [entry["error"] for entry in info["log"]]
    assert len(errors) == 4 and info["best_error"] == min(errors) and errors[info["best_epoch"] - 1] == min(errors)
    assert len(info["distillation"]["log"]) == 2
    assert info["quantiles_from"].startswith("1 training images held out") and info["num_train_images"] == 9
    quantiles = head.state["quantiles_local"]
    assert quantiles.shape == (2,) and quantiles[0] < quantiles[1]


def test_each_epoch_of_both_phases_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="anomax"):
        fit(max_num_epochs=3)
    epochs = [re.search(r"(teacher|student).* epoch (\d+)", r.getMessage()) for r in caplog.records]
    logged = [(m[1], int(m[2])) for m in epochs if m]
    assert logged == [("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2), ("student", 3)]


def test_stops_at_error_threshold_and_is_deterministic_per_seed(trained):
    head, info = trained
    threshold = info["log"][1]["error"] * 1.0001  # the same trajectory reaches it in epoch 2 at the latest
    stopped, stopped_info = fit(error_threshold=threshold)
    assert stopped_info["best_epoch"] <= 2 and len(stopped_info["log"]) == stopped_info["best_epoch"] < 4
    # Same seed: the same errors epoch by epoch and the same teacher, bit for bit.
    assert [e["error"] for e in stopped_info["log"]] == [e["error"] for e in info["log"][:len(stopped_info["log"])]]
    for key in head.state:
        if key.startswith("teacher"):
            np.testing.assert_array_equal(stopped.state[key], head.state[key])
    other, other_info = fit(seed=1, max_num_epochs=1)
    assert other_info["log"][0]["error"] != info["log"][0]["error"]


def test_validation_images_set_the_quantiles_and_distillation_images_teach_the_teacher(tmp_path):
    for index, image in enumerate(np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE + 4, 3), np.uint8)):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    extra = list(distillation_batches(MODEL, str(tmp_path)))
    assert [b["image"].shape for b in extra] == [(4, SIZE, SIZE, 3)] and extra[0]["valid"].sum() == 3
    head, info = fit(validation=IMAGES[:4], distill=extra, max_num_epochs=1)
    assert info["quantiles_from"] == "4 validation images" and info["num_train_images"] == 10
    assert info["distillation"]["num_images"] == 13
    with pytest.raises(ConfigError, match="distill_images"):
        EfficientAD(**HEAD, distill_images=str(tmp_path)).fit(batches(IMAGES), train=TRAIN)
    # the folder is checked when the batches are asked for, not when they are read (after the training split)
    with pytest.raises(ConfigError, match="no such folder"):
        distillation_batches(MODEL, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a folder"):
        distillation_batches(MODEL, str(tmp_path / "0.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found there"):
        distillation_batches(MODEL, str(tmp_path / "empty"))
    (tmp_path / "3.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="3.png"):
        distillation_batches(MODEL, str(tmp_path))
    for empty in ("", "  "):  # an empty environment variable, say: it silently trained without the images
        with pytest.raises(ConfigError, match="distill_images = .* null for none"):
            EfficientAD(distill_images=empty)


def test_generic_images_skip_the_region_of_interest_and_come_at_the_tile_size(tmp_path):
    from anomax.tiling import TilingConfig

    photos = np.random.default_rng(4).integers(0, 256, (2, 20, 24, 3), np.uint8)
    for index, image in enumerate(photos):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    model = build_model()
    # the parts' region of interest lies outside these photos: it is not theirs to crop to
    model.preprocess = model.preprocess.replace(domain_handling="crop_domain", domain=(0, 0, 39, 59))
    (batch,) = distillation_batches(model, str(tmp_path))
    np.testing.assert_array_equal(batch["image"][:2], [preprocess_image(MODEL.preprocess, p) for p in photos])
    model.tiling = TilingConfig(tile_size=64)  # tiled, the teacher learns from 64 x 64 tiles
    (batch,) = distillation_batches(model, str(tmp_path))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["features"].shape[1:3] == (8, 8)


def test_generic_penalty_pushes_the_student_to_zero_on_generic_images(tmp_path):
    """EfficientAD's L_P: with generic images, the student's teacher channels learn to output 0 there."""
    generic = np.random.default_rng(5).integers(0, 256, (8, SIZE, SIZE, 3), np.uint8)
    for index, image in enumerate(generic):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    extra = list(distillation_batches(MODEL, str(tmp_path)))
    generic_images = np.concatenate([b["image"] for b in extra])
    outputs = {}
    for weight in (0.0, 10.0):
        head = EfficientAD(**HEAD, generic_penalty=weight)
        info = head.fit(batches(IMAGES), train=TRAIN, distill=extra, preprocess=MODEL.preprocess)
        assert info["generic_penalty"] == weight
        student = head._student.apply(head._student.params(head.state), generic_images)
        outputs[weight] = float(jnp.mean(jnp.square(student[..., :student.shape[-1] // 2])))
    assert outputs[10.0] < 0.5 * outputs[0.0]
    # without generic images there is nothing to penalise
    assert fit(max_num_epochs=1)[1]["generic_penalty"] == 0.0


def test_score_gives_local_global_and_combined_maps(trained):
    head, _ = trained
    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    out = jax.jit(head.score)(state, IMAGES[:3], None)
    for key in KEYS:
        assert out[key].shape == (3, SIZE, SIZE)
        np.testing.assert_allclose(out[key.replace("image", "score")], out[key].max(axis=(1, 2)))
    # Upsampling and smoothing are linear: the combined map is the branches' mean.
    np.testing.assert_allclose(out["anomaly_image"], 0.5 * (out["anomaly_image_local"] + out["anomaly_image_global"]),
                               atol=1e-5)


def test_combine_max_is_the_branches_pointwise_maximum(trained):
    head, _ = trained
    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    # Without smoothing and with nearest upsampling the maps are the grid's values, so the
    # maximum taken on the grid shows pixel by pixel.
    sharp = {**head.hyperparams, "sigma": 0.0, "upsample": "nearest"}
    out = EfficientAD.from_state({**sharp, "combine": "max"}, head.state).score(state, IMAGES[:3], None)
    both = np.maximum(out["anomaly_image_local"], out["anomaly_image_global"])
    np.testing.assert_array_equal(out["anomaly_image"], both)
    mean = EfficientAD.from_state(sharp, head.state).score(state, IMAGES[:3], None)
    assert not np.allclose(mean["anomaly_image"], both)  # the default is still the paper's mean
    for key in ("anomaly_image_local", "anomaly_image_global"):
        np.testing.assert_array_equal(out[key], mean[key])


def test_branch_image_scores_are_standardised_on_the_calibration_images(trained, tmp_path):
    head, _ = trained
    plain, branches = (EfficientAD.from_state(head.hyperparams, head.state) for _ in range(2))
    assert "score_stats" not in branches.state_keys
    branches.config = dataclasses.replace(branches.config, image_score="branches")  # as if fitted so
    good = IMAGES[:6]
    for each in (plain, branches):
        each.calibrate(good, batch_size=4)
    state = {key: jnp.asarray(value) for key, value in branches.state.items()}
    out = jax.jit(branches.score)(state, IMAGES, None)
    maxima = jax.jit(plain.score)({key: jnp.asarray(v) for key, v in plain.state.items()}, IMAGES, None)
    for key in KEYS:  # the maps are those of the image_score='max' head
        np.testing.assert_array_equal(out[key], maxima[key])
    local = np.asarray(out["anomaly_image_local"]).max(axis=(1, 2))
    global_ = np.asarray(out["anomaly_image_global"]).mean(axis=(1, 2))
    np.testing.assert_allclose(out["anomaly_score_local"], local)
    np.testing.assert_allclose(out["anomaly_score_global"], global_, rtol=1e-6)
    # numpy reference: each branch score standardised on the 6 calibration images, then the larger
    z = [(s - s[:6].mean()) / s[:6].std() for s in (local, global_)]
    np.testing.assert_allclose(out["anomaly_score"], np.maximum(*z), rtol=1e-4, atol=1e-4)
    for branch in z:
        assert abs(branch[:6].mean()) < 1e-4 and abs(branch[:6].std() - 1) < 1e-4
    # the statistics travel with the artifact; an artifact without them is refused
    model = build_model(image_score="branches")
    model.head = branches
    raw = list(np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    loaded = anomax.load_model(anomax.save_model(model, tmp_path / "model"))
    for before, after in zip(model.apply(raw), loaded.apply(raw)):
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])
    incomplete = {key: value for key, value in branches.state.items() if key != "score_stats"}
    with pytest.raises(ArtifactError, match="score_stats"):
        EfficientAD.from_state(branches.hyperparams, incomplete)
    # one image has no standard deviation: the scores came out ~1e5 (std floored at 1e-6), without a word
    with pytest.raises(DatasetError, match="image_score = branches .* at least 2, got 1"):
        branches.calibrate(good[:1], batch_size=4)


def test_branch_scores_refuse_one_validation_image_before_training(monkeypatch):
    import anomax.heads.efficientad as efficientad

    monkeypatch.setattr(efficientad, "_train", lambda *a, **k: pytest.fail("trained before the refusal"))
    with pytest.raises(DatasetError, match="image_score = branches .* at least 2, got 1"):
        EfficientAD(**HEAD, image_score="branches").fit(batches(IMAGES), train=TRAIN, preprocess=MODEL.preprocess,
                                                        validation=batches(IMAGES[:1]))


def test_a_network_that_diverges_fails_the_fit_with_the_key_to_lower(tmp_path):
    """In the last update of the last epoch too (one step per epoch, a small HALCON project): the
    weights came back blown up, the quantiles NaN, and the saved model would not load."""
    with pytest.raises(ConfigError, match="student\\+autoencoder: the .*error became (nan|inf).* lower train.learning_rate"):
        fit(max_num_epochs=1, batch_size=16, learning_rate=1e6)
    head = EfficientAD(**{**HEAD, "distill_learning_rate": 1e8})
    with pytest.raises(ConfigError, match="distil efficientad teacher: .* lower model.head.distill_learning_rate"):
        head.fit(batches(IMAGES), train=TRAIN, preprocess=MODEL.preprocess)


def test_branch_image_scores_refuse_tiling():
    with pytest.raises(ConfigError, match="image_score"):
        AnomalyModel(MODEL.preprocess, MODEL.backbone, MODEL.adaptor, EfficientAD(**HEAD, image_score="branches", border=0),
                     tiling=TilingConfig(tile_size=SIZE))


def test_map_borders_are_zero_before_normalisation(trained):
    head, _ = trained
    sharp = EfficientAD.from_state({**head.hyperparams, "sigma": 0.0, "upsample": "nearest"}, head.state)
    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    out = sharp.score(state, IMAGES[:2], None)
    for branch in ("local", "global"):
        edge = float(normalise(jnp.zeros(()), state[f"quantiles_{branch}"]))
        ring = np.asarray(out[f"anomaly_image_{branch}"]).copy()
        ring[:, 8:-8, 8:-8] = edge  # one 8-pixel grid cell at each edge is the border
        np.testing.assert_allclose(ring, edge, atol=1e-6)
        assert np.abs(np.asarray(out[f"anomaly_image_{branch}"])[:, 8:-8, 8:-8] - edge).max() > 0


def test_map_quantiles_come_from_the_cells_inside_the_border(trained):
    """The zeroed border ring is not part of the good images' map distribution (the paper's unpadded
    PDN has no cells there): the quantiles are numpy's over the inner cells only."""
    head, _ = trained
    calibrated = EfficientAD.from_state(head.hyperparams, head.state)
    calibrated.calibrate(IMAGES[:6], batch_size=4)
    local, global_ = head._raw_maps({key: jnp.asarray(value) for key, value in head.state.items()}, IMAGES[:6])
    for branch, raw in (("local", local), ("global", global_)):
        inner = np.asarray(raw, np.float64)[:, 1:-1, 1:-1]
        np.testing.assert_allclose(calibrated.state[f"quantiles_{branch}"], np.quantile(inner, [0.9, 0.995]),
                                   rtol=1e-5)
    # a border that leaves no inner cell is refused, naming the key
    with pytest.raises(ConfigError, match="model.head.border = 2 zeroes every cell of the 4x4 patch grid"):
        EfficientAD(**HEAD, border=2).fit(batches(IMAGES), train=TRAIN, preprocess=MODEL.preprocess)


def test_apply_and_artifact_round_trip_are_bit_identical(trained, tmp_path):
    model = build_model()
    model.head = trained[0]
    raw = list(np.random.default_rng(2).integers(0, 256, (5, SIZE + 8, SIZE, 3), dtype=np.uint8))
    results = model.apply(raw)
    assert len(results) == 5
    for key in KEYS:
        assert results[0][key].shape == (SIZE, SIZE)
        assert isinstance(results[0][key.replace("image", "score")], float)
    path = anomax.save_model(model, tmp_path / "model")
    loaded = anomax.load_model(path)
    assert loaded.head.name == "efficientad" and loaded.head.config == model.head.config
    for before, after in zip(results, loaded.apply(raw)):
        assert before.keys() == after.keys()
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])


def test_registry_and_bad_settings():
    assert HEADS.get("efficientad") is EfficientAD
    with pytest.raises(ConfigError, match="size"):
        EfficientAD(size="large")
    with pytest.raises(ConfigError, match="hard_quantile"):
        EfficientAD(hard_quantile=1.0)
    with pytest.raises(ConfigError, match="combine"):
        EfficientAD(combine="sum")
    with pytest.raises(ConfigError, match="image_score"):
        EfficientAD(image_score="mean")
    bad = [{"image": IMAGES[:4], "features": np.zeros((4, 5, 5, 8), np.float32)}]
    with pytest.raises(InputError, match="times smaller"):
        EfficientAD(**HEAD).fit(bad, train=TRAIN, preprocess=MODEL.preprocess)
    with pytest.raises(ConfigError, match="ae_jitter"):  # the jitter works on pixels: it needs the preprocessing
        EfficientAD(**HEAD, ae_jitter=0.2).fit(batches(IMAGES), train=TRAIN)


def test_backbone_teacher_regresses_the_features_themselves(tmp_path):
    """teacher='backbone': no distillation, no PDN teacher in the state; the local map is the student's
    error against the standardised features, and the model runs the backbone at apply."""
    head = EfficientAD(**HEAD, teacher="backbone")
    train = dataclasses.replace(TRAIN, max_num_epochs=2)
    info = head.fit(batches(IMAGES), train=train, preprocess=MODEL.preprocess)
    assert info["distillation"] is None and head.uses_backbone and not EfficientAD(**HEAD).uses_backbone
    assert not any(key.startswith("teacher/") for key in head.state)
    features = np.concatenate([b["features"][b["valid"]] for b in batches(IMAGES)])
    held = np.random.default_rng(train.seed).permutation(10)[:1]  # the quantiles' image
    kept = features[np.setdiff1d(np.arange(10), held)]
    np.testing.assert_allclose(head.state["teacher_mean"], kept.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)

    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    local, _ = head._raw_maps(state, IMAGES[:3], features[:3])
    student = np.asarray(head._student.apply(head._student.params(state), IMAGES[:3]))[..., :features.shape[-1]]
    teacher = (features[:3] - head.state["teacher_mean"]) / head.state["teacher_std"]
    reference = np.square(teacher - student).mean(-1)
    reference[:, [0, -1]], reference[:, :, [0, -1]] = 0.0, 0.0  # the border ring
    np.testing.assert_allclose(local, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="backbone features"):
        head.score(state, IMAGES[:3], None)

    model = build_model(teacher="backbone")
    model.head = head
    raw = list(np.random.default_rng(6).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8))
    results = model.apply(raw)
    loaded = anomax.load_model(anomax.save_model(model, tmp_path / "model"))
    for before, after in zip(results, loaded.apply(raw)):
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])

    with pytest.raises(ConfigError, match="ae_jitter"):
        EfficientAD(teacher="backbone", ae_jitter=0.2)
    # generic images only feed the penalty: without it they are not read
    unused = build_model(teacher="backbone", distill_images=str(tmp_path / "none"), generic_penalty=0.0)
    assert "distill" not in unused.head.fit_inputs(unused)
    # with the penalty they are read, and not put through the backbone (only the PDN teacher learns from its features)
    for index, image in enumerate(np.random.default_rng(7).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    penalised = build_model(teacher="backbone", distill_images=str(tmp_path), generic_penalty=1.0)
    (generic,) = penalised.head.fit_inputs(penalised)["distill"]
    assert "features" not in generic and generic["valid"].sum() == 3
    info = penalised.head.fit(batches(IMAGES), train=train, distill=[generic], preprocess=MODEL.preprocess)
    assert info["generic_penalty"] == 1.0


def test_predict_writes_each_branch_score_and_overlay(trained, tmp_path):
    """anomax-predict showed the combined map and score only; which branch flagged an image is the
    point of the global context."""
    import csv

    from anomax.apps.predict import predict_files

    model = build_model()
    model.head = trained[0]
    paths = []
    for index, image in enumerate(np.random.default_rng(6).integers(0, 256, (2, SIZE, SIZE, 3), np.uint8)):
        paths.append(tmp_path / "in" / f"{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    rows = predict_files(model, paths, tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:4] == ["image_file_name", "anomaly_score", "anomaly_score_global", "anomaly_score_local"]
    expected = model.apply([np.asarray(Image.open(p)) for p in paths])
    for row, line, result in zip(rows, table, expected):
        for branch in ("", "_local", "_global"):
            assert float(line[f"anomaly_score{branch}"]) == pytest.approx(result[f"anomaly_score{branch}"], rel=1e-6)
            assert Path(row[f"overlay{branch}"]).is_file() and line[f"overlay{branch}"] == row[f"overlay{branch}"]
        assert row["overlay_local"].endswith("_local.png")
