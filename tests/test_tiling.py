"""Tiling: the grid, the blending window and stitching; every head fitted and scored tiled; one head
per grid cell; native-resolution pixel metrics; tiled artifacts round-trip bit-identically."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_artifact import _rehashed  # a model.json edited and rehashed, as an earlier anomax wrote it

import anomax
from anomax.backbones import backbone_requirements, build_backbone
from anomax.data.formats.mvtec_ad import read_mvtec_ad
from anomax.errors import ConfigError, InputError
from anomax.features import FeatureAdaptor
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param
from anomax.registry import HEADS
from anomax.training import TrainConfig
from anomax.tiling import PerPositionHeads, TileGrid, TilingConfig, blend_window, place_add, tile_starts

WIDTH, HEIGHT, TILE = 96, 80, 32
SHARED = TilingConfig(tile_size=TILE, stride=24)
HEADS_SETUPS = {  # tiny settings: sigma 1 keeps 32-px tiles smoothable
    "padim": {"eps": 0.01, "sigma": 1.0},
    "patchcore": {"coreset_size": 16, "projection_dim": None, "num_neighbors": 3, "sigma": 1.0},
    "student": {"complexity": 4, "sigma": 1.0},
    "efficientad": {"width": 2, "ae_width": 2, "latent": 4, "distill_epochs": 1, "sigma": 1.0, "border": 0},
}
TRAIN = TrainConfig(max_num_epochs=1, batch_size=4)


# ---- geometry --------------------------------------------------------------------------------
def test_tile_starts_cover_the_image_with_the_last_tile_flush():
    assert tile_starts(96, 32, 24) == (0, 24, 48, 64)
    assert tile_starts(96, 32, 32) == (0, 32, 64)
    assert tile_starts(32, 32, 8) == (0,)
    grid = TileGrid.of(HEIGHT, WIDTH, SHARED)
    assert grid.shape == (3, 4) and len(grid) == 12
    assert grid.rows == (0, 24, 48) and grid.cols == (0, 24, 48, 64)


@pytest.mark.parametrize("tiling", [SHARED, TilingConfig(tile_size=TILE), TilingConfig(tile_size=TILE, stride=7)])
def test_overlap_weights_sum_to_one(tiling):
    grid = TileGrid.of(HEIGHT, WIDTH, tiling)
    total = np.asarray(place_add(grid.weights(), grid.positions, (HEIGHT, WIDTH)))
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)


@pytest.mark.parametrize("tiling", [SHARED, TilingConfig(tile_size=TILE), TilingConfig(tile_size=TILE, stride=7)])
def test_constant_tile_maps_stitch_to_the_constant_without_seams(tiling):
    grid = TileGrid.of(HEIGHT, WIDTH, tiling)
    stitched = np.asarray(grid.stitch(np.full((len(grid), TILE, TILE), 3.25, np.float32)))
    assert stitched.shape == (HEIGHT, WIDTH)
    np.testing.assert_allclose(stitched, 3.25, rtol=1e-6)
    assert np.abs(np.diff(stitched, axis=0)).max() < 1e-5 and np.abs(np.diff(stitched, axis=1)).max() < 1e-5


def test_smooth_maps_stay_seamless_where_tiles_overlap():
    """A ramp cut into tiles and stitched back is the ramp: the blend adds no step at tile borders."""
    grid = TileGrid.of(HEIGHT, WIDTH, SHARED)
    ramp = np.add.outer(np.arange(HEIGHT) * 0.5, np.arange(WIDTH) * 0.25).astype(np.float32)
    stitched = np.asarray(grid.stitch(grid.cut(ramp, range(len(grid)))))
    np.testing.assert_allclose(stitched, ramp, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("cell, pixel", [(5, (16, 12)), (0, (0, 0)), (11, (31, 31)), (6, (2, 28))])
def test_a_hot_pixel_lands_where_it_belongs(cell, pixel):
    grid = TileGrid.of(HEIGHT, WIDTH, SHARED)
    maps = np.zeros((len(grid), TILE, TILE), np.float32)
    maps[cell][pixel] = 1.0
    stitched = np.asarray(grid.stitch(maps))
    row, col = grid.positions[cell] + np.asarray(pixel)
    assert np.unravel_index(np.argmax(stitched), stitched.shape) == (row, col)
    assert np.count_nonzero(stitched) == 1
    if cell == 5:  # the middle of an interior tile: no other tile covers it, the value is kept
        assert stitched[row, col] == 1.0


def test_window_is_one_inside_and_positive_everywhere():
    window = blend_window(32, 8)
    assert (window > 0).all() and (window[8:24] == 1).all()
    np.testing.assert_allclose(window[:8] + window[24:], 1.0)  # neighbours' ramps cross-fade
    assert (blend_window(32, 0) == 1).all()


def test_settings_are_checked():
    assert not TilingConfig().enabled
    with pytest.raises(ConfigError, match="tiling.stride"):
        TilingConfig(tile_size=32, stride=40)
    with pytest.raises(ConfigError, match="tiling.mode"):
        TilingConfig(tile_size=32, mode="mosaic")
    with pytest.raises(ConfigError, match="tiling.resize_before"):
        TilingConfig(tile_size=32, resize_before=0)
    with pytest.raises(InputError, match="smaller than tiling.tile_size = 128"):
        TileGrid.of(HEIGHT, WIDTH, TilingConfig(tile_size=128))


@pytest.mark.parametrize("setting", [{"stride": 16}, {"mode": "per_position"}, {"resize_before": 0.5}])
def test_a_tiling_setting_without_a_tile_size_is_refused(setting):
    """It was accepted and the run was silently untiled."""
    (key,) = setting
    with pytest.raises(ConfigError, match=f"tiling.{key} = .* while tiling.tile_size is null"):
        TilingConfig(**setting)


# ---- models ------------------------------------------------------------------------------------
def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny MVTec-layout dataset of 96x80 noise images; defects are bright squares with masks."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)

    def image():
        return rng.integers(60, 120, (HEIGHT, WIDTH, 3), dtype=np.uint8)

    for i in range(4):
        _write(root / "cat" / "train" / "good" / f"{i}.png", image())
    for i in range(2):
        _write(root / "cat" / "test" / "good" / f"{i}.png", image())
        defect, mask = image(), np.zeros((HEIGHT, WIDTH), np.uint8)
        row, col = 10 + 25 * i, 20 + 30 * i
        defect[row:row + 9, col:col + 11] = 250
        mask[row:row + 9, col:col + 11] = 255
        _write(root / "cat" / "test" / "spot" / f"{i}.png", defect)
        _write(root / "cat" / "ground_truth" / "spot" / f"{i}_mask.png", mask)
    return read_mvtec_ad(root, "cat")


def build(head_name: str, tiling: TilingConfig = SHARED, size: int = 64, **head) -> AnomalyModel:
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=size, height=size, **requirements)
    adaptor = FeatureAdaptor(backbone.taps, projection_dim=8)
    return AnomalyModel(preprocess, backbone, adaptor, HEADS.get(head_name)(**{**HEADS_SETUPS[head_name], **head}),
                        batch_size=4, tiling=tiling)


def images_of(dataset) -> list[np.ndarray]:
    return [np.asarray(Image.open(s.image_file_name)) for s in dataset.samples_of("test")]


@pytest.mark.parametrize("head_name", ["padim", "patchcore", "student", "efficientad"])
def test_every_head_fits_and_scores_tiled(head_name, dataset):
    model = build(head_name)
    info = model.fit(dataset, train=TRAIN, progress=False)
    assert info["tiling"] == {"mode": "shared", "num_tiles": 4 * 12}
    results = model.apply(images_of(dataset))
    batches = list(model.score_split(dataset, "test", progress=False))
    assert len(results) == len(batches) == 4
    branches = ("_local", "_global") if head_name == "efficientad" else ()
    for result, batch in zip(results, batches):
        assert result["anomaly_image"].shape == (HEIGHT, WIDTH) == batch["mask"].shape[1:]
        # the untiled keys (efficientad's branch scores were dropped), each score its map's maximum
        assert sorted(result) == sorted(f"anomaly_{kind}{branch}" for kind in ("image", "score")
                                        for branch in ("", *branches))
        for branch in ("", *branches):
            assert result[f"anomaly_score{branch}"] == result[f"anomaly_image{branch}"].max()
            assert batch[f"anomaly_score{branch}"].shape == (1,)
        np.testing.assert_allclose(batch["anomaly_image"][0], result["anomaly_image"], rtol=1e-5, atol=1e-5)
        assert np.isfinite(result["anomaly_image"]).all()


def test_patchcore_keeps_max_patches_per_tile(dataset):
    model = build("patchcore", max_patches_per_image=5)
    info = model.fit(dataset, progress=False)
    assert info["num_patches"] == 4 * 12 * 5  # training images x tiles x patches kept per tile


def test_resize_before_gives_maps_at_the_roi_size(dataset):
    model = build("padim", TilingConfig(tile_size=TILE, stride=16, resize_before=0.5))
    model.fit(dataset, progress=False)
    (result,) = model.apply(images_of(dataset)[:1])
    assert result["anomaly_image"].shape == (HEIGHT, WIDTH)


def test_tiles_are_cut_after_the_domain_crop(dataset):
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=64, height=64, domain_handling="crop_domain",
                                            domain=(4, 8, 4 + 39, 8 + 71), **requirements)  # 40 x 72 ROI
    model = AnomalyModel(preprocess, backbone, FeatureAdaptor(backbone.taps, projection_dim=8),
                         HEADS.get("padim")(**HEADS_SETUPS["padim"]), batch_size=4, tiling=SHARED)
    info = model.fit(dataset, progress=False)
    assert info["tiling"]["num_tiles"] == 4 * 2 * 3  # rows (0, 8), cols (0, 24, 40)
    (batch, *_) = model.score_split(dataset, "test", progress=False)
    assert batch["anomaly_image"].shape == batch["mask"].shape == (1, 40, 72)


def test_a_domain_box_outside_an_image_names_the_image(dataset):
    model = build("padim")
    model.preprocess = model.preprocess.replace(domain_handling="crop_domain", domain=(0, 0, 500, 500))
    first = dataset.samples_of("train")[0].image_file_name
    with pytest.raises(InputError, match=f"{first}: .*domain"):
        model.fit(dataset, progress=False)


@pytest.fixture(scope="module")
def per_position(dataset):
    model = build("patchcore", TilingConfig(tile_size=TILE, stride=24, mode="per_position"))
    info = model.fit(dataset, progress=False)
    return model, info


def test_per_position_keeps_one_head_per_grid_cell(per_position, dataset):
    model, info = per_position
    assert isinstance(model.head, PerPositionHeads) and info["tiling"]["grid"] == [3, 4]
    assert len(info["cells"]) == 12 and all(cell["num_images"] == 4 for cell in info["cells"])
    assert model.head.stacked["memory_bank"].shape[0] == 12
    # each cell's bank comes from that cell's tiles only: the banks differ
    banks = model.head.stacked["memory_bank"]
    assert not np.array_equal(banks[0], banks[1])
    results = model.apply(images_of(dataset))
    assert all(r["anomaly_image"].shape == (HEIGHT, WIDTH) for r in results)


@pytest.mark.parametrize("head_name", ["student", pytest.param("efficientad", marks=pytest.mark.slow)])
def test_trained_heads_work_per_position(head_name, dataset, tmp_path, monkeypatch):
    """Each cell's head scores its tiles with its own slice of the stacked state (vmapped);
    efficientad's generic images are read and put through the backbone once, not once per cell."""
    import dataclasses

    import anomax.heads.efficientad as efficientad

    reads, original = [], efficientad.distillation_batches

    def counted(model, folder, **options):
        reads.append(folder)
        yield from original(model, folder, **options)

    monkeypatch.setattr(efficientad, "distillation_batches", counted)
    for index, image in enumerate(np.random.default_rng(2).integers(0, 256, (3, 40, 40, 3), np.uint8)):
        _write(tmp_path / f"{index}.png", image)
    head = {"distill_images": str(tmp_path)} if head_name == "efficientad" else {}
    model = build(head_name, TilingConfig(tile_size=TILE, stride=32, mode="per_position"), **head)
    held_out = [dataclasses.replace(s, split="validation") if s.split == "test" and s.anomaly_label == "ok" else s
                for s in dataset.samples]  # the good test images: efficientad's validation
    info = model.fit(dataclasses.replace(dataset, samples=held_out), train=TRAIN, progress=False)
    assert len(info["cells"]) == 9 and isinstance(model.head, PerPositionHeads)  # rows 0, 32, 48; cols 0, 32, 64
    assert len(reads) == (head_name == "efficientad")
    if head_name == "efficientad":
        assert all(cell["distillation"]["num_images"] == 4 + 3 for cell in info["cells"])
    (result,) = model.apply(images_of(dataset)[-1:])
    assert result["anomaly_image"].shape == (HEIGHT, WIDTH) and np.isfinite(result["anomaly_image"]).all()


@pytest.mark.parametrize("mode", ["shared", "per_position"])
def test_an_image_that_cannot_be_tiled_is_named_before_the_fit(mode, dataset, tmp_path):
    """A validation or test image smaller than a tile (or, per position, of another grid) was found
    only when it was scored, after the fit: on 5-Mpx parts, ten minutes lost."""
    import dataclasses

    from anomax.tiling import check_tileable

    model = build("padim", TilingConfig(tile_size=TILE, stride=24, mode=mode))
    check_tileable(model, dataset)  # the dataset as it is: nothing to say
    odd = tmp_path / "odd.png"
    _write(odd, np.zeros((20, WIDTH, 3), np.uint8) if mode == "shared" else np.zeros((HEIGHT, WIDTH + 24, 3), np.uint8))
    samples = list(dataset.samples)
    index = next(i for i, s in enumerate(samples) if s.split == "test" and s.anomaly_label == "ok")
    samples[index] = dataclasses.replace(samples[index], image_file_name=str(odd))
    with pytest.raises(InputError, match="odd.png" + (" is 96x20 .* smaller than tiling.tile_size" if mode == "shared"
                                                        else ": tiling.mode=per_position .* grid is 3x5 tiles")):
        check_tileable(model, dataclasses.replace(dataset, samples=samples))


def test_per_position_refuses_another_grid(per_position, dataset):
    model, _ = per_position
    wider = np.zeros((HEIGHT, WIDTH + 24, 3), np.uint8)
    with pytest.raises(InputError, match=r"image 0: tiling.mode=per_position .* grid is 3x5 tiles .* trained on a 3x4"):
        model.apply([wider])


@pytest.mark.parametrize("tiling", [SHARED, TilingConfig(tile_size=TILE, stride=24, mode="per_position")],
                         ids=["shared", "per_position"])
def test_tiled_round_trip_is_bit_identical(tiling, dataset, tmp_path):
    model = build("padim", tiling)
    model.fit(dataset, progress=False)
    model.set_params(thresholds={"segmentation": 5.0, "classification": 6.0})
    loaded = anomax.load_model(anomax.save_model(model, tmp_path / "model"))
    assert loaded.tiling == tiling
    images = images_of(dataset)
    for want, have in zip(model.apply(images), loaded.apply(images)):
        assert have["anomaly_score"] == want["anomaly_score"]
        np.testing.assert_array_equal(have["anomaly_image"], want["anomaly_image"])
        np.testing.assert_array_equal(have["anomaly_region"]["mask"], want["anomaly_region"]["mask"])


def test_an_untiled_artifact_loads_untiled(dataset, tmp_path):
    model = build("padim", TilingConfig())
    model.fit(dataset, progress=False)
    path = anomax.save_model(model, tmp_path / "model")
    assert not anomax.load_model(path).tiling.enabled
    # saved before tiling settings without a tile size were refused: they changed nothing then, nor now
    _rehashed(path, "model.json", lambda meta: meta["tiling"].update(stride=224, resize_before=0.5))
    assert anomax.load_model(path).tiling == TilingConfig()


def test_a_tiled_model_fitted_with_a_map_border_loads_with_a_warning(dataset, tmp_path, caplog):
    """Fitted before the border was refused under tiling: still usable, its blind seams named."""
    model = build("efficientad")
    model.fit(dataset, train=TRAIN, progress=False)
    path = anomax.save_model(model, tmp_path / "model")
    _rehashed(path, "model.json", lambda meta: meta["head"]["hyperparams"].update(border=1))
    with caplog.at_level("WARNING", logger="anomax"):
        loaded = anomax.load_model(path)
    assert loaded.head.config.border == 1 and "each tile seam inside an image is blind" in caplog.text


# ---- the config group ------------------------------------------------------------------------------
def composed(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from anomax.apps.config import CONF_DIR, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose("anomax_train", overrides=["dataset=synthetic", *overrides]),
                                      resolve=True)


def test_the_tiling_group_is_off_by_default_and_validated_at_composition():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from anomax.pipeline import validate_config

    assert not TilingConfig.from_dict(composed()["tiling"]).enabled
    on = composed("tiling=default", "tiling.mode=per_position")
    validate_config(on)
    assert TilingConfig.from_dict(on["tiling"]) == TilingConfig(tile_size=256, stride=224, mode="per_position")
    for override, key in (("tiling.stride=300", "tiling.stride"), ("tiling.mode=mosaic", "mode"),
                          ("tiling.tile_sise=64", "tile_sise")):
        with pytest.raises((ConfigError, HydraException, OmegaConfBaseException), match=key):
            validate_config(composed("tiling=default", override))
    with pytest.raises(ConfigError, match="export.onnx = true is not available with tiling"):
        validate_config(composed("tiling=default", "export.onnx=true"))


def test_the_tile_size_must_suit_the_backbone():
    from anomax.pipeline import build_model

    cfg = composed("tiling=default", "tiling.tile_size=100", "tiling.stride=90", "model/backbone=resnet18",
                   "model.backbone.pretrained=null")
    with pytest.raises(ConfigError, match="tiling.tile_size = 100 .* multiple of 32"):
        build_model(cfg)


def test_a_zeroed_map_border_is_refused_under_tiling(dataset):
    """efficientad's border cells are 0 in every tile: each seam inside the image was blind to defects."""
    with pytest.raises(ConfigError, match="model.head.border = 1 needs tiling off"):
        build("efficientad", border=1).fit(dataset, train=TRAIN, progress=False)


def test_the_tile_size_is_checked_against_the_backbone_in_the_api_too():
    with pytest.raises(ConfigError, match="tiling.tile_size = 40 .* multiple of 32"):
        build("padim", TilingConfig(tile_size=40))


def test_a_tiled_model_is_not_exported(dataset, tmp_path):
    """Neither to ONNX nor as a StableHLO function: export_inference gave one tile's score for the image's."""
    model = build("padim")
    model.fit(dataset, progress=False)
    with pytest.raises(ConfigError, match="onnx=True is not available for tiled models"):
        anomax.save_model(model, tmp_path / "model", onnx=True)
    assert not (tmp_path / "model").exists()
    with pytest.raises(ConfigError, match="export_inference: tiled models are not exportable"):
        anomax.export_inference(model, tmp_path / "f.npz", batch_size=1, height=HEIGHT, width=WIDTH)
    assert not (tmp_path / "f.npz").exists()
    path = anomax.save_model(model, tmp_path / "saved")  # asking for a runtime it cannot have says so
    with pytest.raises(ConfigError, match="is a tiled model: it runs with runtime='jax' only"):
        anomax.load_model(path, runtime="onnxruntime")


def test_thresholds_apply_to_images_of_different_sizes(dataset):
    """A tiled model's maps have each image's size; classifying them as one stack crashed."""
    model = build("padim")
    model.fit(dataset, progress=False)
    images = images_of(dataset)[:2]
    images = [images[0], images[1][:64, :72]]
    model.set_params(thresholds={"segmentation": 1.0, "classification": 1.0})
    together = model.apply(images)
    alone = [model.apply([image])[0] for image in images]
    assert [r["anomaly_region"]["mask"].shape for r in together] == [(HEIGHT, WIDTH), (64, 72)]
    for have, want in zip(together, alone):
        assert have["anomaly_class"] == want["anomaly_class"]
        np.testing.assert_array_equal(have["anomaly_region"]["mask"], want["anomaly_region"]["mask"])
    assert model.apply([]) == []
