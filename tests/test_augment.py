"""Fit-time augmentation and test-time augmentation (anomax.augment) on tiny shapes."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from anomax.augment import INVERSE, AugmentConfig, mean_over_transforms, transform, undo
from anomax.backbones import backbone_requirements, build_backbone
from anomax.data.dataset import DLDataset, Sample
from anomax.errors import ConfigError
from anomax.features import FeatureAdaptor
from anomax.heads.patchcore import PatchCore
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param

TRANSFORMS = [name for name in INVERSE if name != "identity"]
SIZE = 32


def asymmetric(batch: int = 2, height: int = 6, width: int = 6, channels: int = 3) -> np.ndarray:
    return np.arange(batch * height * width * channels, dtype=np.float32).reshape(batch, height, width, channels)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_undo_inverts_each_transform_exactly(name):
    images = asymmetric()
    moved = np.asarray(transform(images, name))
    assert not np.array_equal(moved, images)  # each transform really moves pixels of an asymmetric image
    np.testing.assert_array_equal(np.asarray(undo(moved, name)), images)
    maps = images[..., 0]
    np.testing.assert_array_equal(np.asarray(undo(transform(maps, name), name)), maps)


def test_transforms_are_the_eight_distinct_symmetries():
    images = asymmetric(1)
    results = [np.asarray(transform(images, name)).tobytes() for name in INVERSE]
    assert len(set(results)) == len(INVERSE) == 7


def per_pixel_score(images):
    """An equivariant 'model': each pixel's map value depends on that pixel only."""
    anomaly_image = (images ** 2).sum(-1)
    return {"anomaly_image": anomaly_image, "anomaly_score": anomaly_image.max(axis=(1, 2))}


@pytest.mark.parametrize("transforms", [(name,) for name in TRANSFORMS] + [tuple(TRANSFORMS)])
def test_tta_of_an_equivariant_map_is_the_map(transforms):
    """Undoing each transform exactly: with an equivariant score the mean over transforms equals the
    plain map for any input (a wrong inverse would average misplaced maps)."""
    images = asymmetric()
    plain = per_pixel_score(images)
    out = mean_over_transforms(per_pixel_score, images, transforms)
    np.testing.assert_allclose(np.asarray(out["anomaly_image"]), np.asarray(plain["anomaly_image"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["anomaly_score"]), np.asarray(plain["anomaly_score"]), rtol=1e-6)


def test_tta_leaves_the_map_of_a_symmetric_input_unchanged():
    y, x = np.mgrid[:8, :8] - 3.5
    symmetric = np.broadcast_to(np.hypot(y, x)[None, ..., None], (1, 8, 8, 3)).astype(np.float32)
    for name in TRANSFORMS:
        np.testing.assert_array_equal(np.asarray(transform(symmetric, name)), symmetric)
    out = mean_over_transforms(per_pixel_score, symmetric, tuple(TRANSFORMS))
    np.testing.assert_allclose(np.asarray(out["anomaly_image"]), per_pixel_score(symmetric)["anomaly_image"],
                               rtol=1e-6)


def test_settings_refuse_unknown_repeated_and_non_square():
    with pytest.raises(ConfigError, match="augment.fit"):
        AugmentConfig(fit=("hflip", "spin"))
    with pytest.raises(ConfigError, match="distinct"):
        AugmentConfig(tta=("hflip", "hflip"))
    AugmentConfig(fit=("hflip", "vflip", "rot180")).check_input(32, 64)  # these keep the shape
    with pytest.raises(ConfigError, match="square"):
        AugmentConfig(tta=("rot90",)).check_input(32, 64)


def tiny_model(augment: AugmentConfig, state=None) -> AnomalyModel:
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=SIZE, height=SIZE, **requirements)
    head = PatchCore(coreset_ratio=1.0, projection_dim=None, num_neighbors=1, sigma=0.0)
    head._state = state
    return AnomalyModel(preprocess, backbone, FeatureAdaptor(backbone.taps, pool_size=1), head, batch_size=2,
                        augment=augment)


def good_images(tmp_path, count: int = 2) -> DLDataset:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        path = tmp_path / f"good_{index}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(index, str(path), "ok", "good", split="train"))
    return DLDataset(samples, "test")


def test_fit_time_augmentation_fits_each_transform_of_the_good_images(tmp_path):
    dataset = good_images(tmp_path)
    images = [np.asarray(Image.open(s.image_file_name)) for s in dataset.samples]
    flipped = [image[:, ::-1] for image in images]
    plain = tiny_model(AugmentConfig())
    info = plain.fit(dataset, progress=False)
    augmented = tiny_model(AugmentConfig(fit=("hflip",)))
    info_augmented = augmented.fit(dataset, progress=False)
    assert info_augmented["num_images"] == 2 * info["num_images"] == 4
    # with every patch in the bank, a flipped training image is normal only to the augmented model (its
    # distances are the rounding of the search, as for the unflipped training images in the plain model)
    rounding = max(r["anomaly_score"] for r in plain.apply(images))
    assert max(r["anomaly_score"] for r in augmented.apply(flipped)) <= 2 * rounding
    assert min(r["anomaly_score"] for r in plain.apply(flipped)) > 100 * rounding


def test_feature_batches_count_the_batches_each_transform_repeats(tmp_path):
    """3 images in batches of 2, and their flips: 4 batches (the progress total said 3)."""
    batches = tiny_model(AugmentConfig(fit=("hflip",))).feature_batches(good_images(tmp_path, count=3), "train",
                                                                        transforms=("hflip",))
    assert len(batches) == sum(1 for _ in batches) == 4 and batches.num_images == 6


def test_model_tta_is_the_mean_of_the_undone_maps(tmp_path):
    plain = tiny_model(AugmentConfig())
    plain.fit(good_images(tmp_path), progress=False)
    transforms = ("hflip", "rot90", "transpose")
    tta = tiny_model(AugmentConfig(tta=transforms), state=plain.head.state)
    images = asymmetric(2, SIZE, SIZE)
    out = tta.infer(tta.params, images)
    maps = [np.asarray(undo(plain.infer(plain.params, transform(images, name))["anomaly_image"], name))
            for name in ("identity", *transforms)]
    scores = [np.asarray(plain.infer(plain.params, transform(images, name))["anomaly_score"])
              for name in ("identity", *transforms)]
    np.testing.assert_allclose(np.asarray(out["anomaly_image"]), np.mean(maps, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["anomaly_score"]), np.mean(scores, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(maps[0], np.mean(maps, axis=0))  # the transforms did change the maps

    from anomax.artifact import load_model, save_model

    tta.thresholds = {}
    save_model(tta, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")  # the artifact keeps the test-time augmentation
    assert reloaded.augment == tta.augment
    np.testing.assert_array_equal(np.asarray(reloaded.infer(reloaded.params, images)["anomaly_image"]),
                                  np.asarray(out["anomaly_image"]))


def test_a_tiled_model_refuses_augmentation_it_would_not_apply():
    from anomax.tiling import TilingConfig

    model = tiny_model(AugmentConfig())
    for augment in (AugmentConfig(fit=("hflip",)), AugmentConfig(tta=("vflip",))):
        with pytest.raises(ConfigError, match="augment.fit = .*tiling=off"):
            AnomalyModel(model.preprocess, model.backbone, model.adaptor, model.head, augment=augment,
                         tiling=TilingConfig(tile_size=SIZE))


def test_fit_augmentation_with_a_held_out_normalisation_needs_a_validation_split(tmp_path):
    """efficientad normalises its maps on good validation images, or else on training images it holds
    out; with augment.fit those would have transformed copies in training, so it needs the former."""
    from anomax.heads.efficientad import EfficientAD

    model = tiny_model(AugmentConfig(fit=("hflip",)))
    model.head = EfficientAD(width=2, ae_width=2, latent=4, distill_epochs=1)
    dataset = good_images(tmp_path, count=3)
    with pytest.raises(ConfigError, match="augment.fit = \\['hflip'\\] with model.head=efficientad needs good images "
                                          "in the 'validation' split"):
        model.fit(dataset, progress=False)
    fitted = []
    model.head.fit = lambda batches, **kwargs: fitted.append(kwargs["validation"]) or {}
    held_out = [dataclasses.replace(s, split="validation") if i == 0 else s for i, s in enumerate(dataset.samples)]
    model.fit(dataclasses.replace(dataset, samples=held_out), progress=False)
    assert fitted and fitted[0] is not None  # with one, the head is fitted and normalises on it


@pytest.mark.parametrize("option", ["none", "flips", "fit_flips", "dihedral"])
def test_augment_group_composes_and_validates(option):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from anomax.apps.config import CONF_DIR, register_schemas
    from anomax.pipeline import validate_config

    register_schemas()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("anomax_train", overrides=[f"augment={option}"]), resolve=True)
        bad = OmegaConf.to_container(compose("anomax_train", overrides=["augment.tta=[spin]"]), resolve=True)
    validate_config(cfg)
    AugmentConfig.from_dict(cfg["augment"])
    with pytest.raises(ConfigError, match="augment.tta"):
        validate_config(bad)
