"""Preprocess parameters and the pure image/mask functions, against hand computations."""

import json

import numpy as np
import pytest
from PIL import Image

from anomax.errors import ConfigError, InputError
from anomax.preprocess.params import PreprocessParams, create_dl_preprocess_param, preprocess_image, preprocess_mask

RGB = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 250]]], np.uint8)  # (2, 2, 3)


def params(**kw):
    return create_dl_preprocess_param(**{"width": 2, "height": 2, **kw})


def test_normalization_none_maps_0_255_to_range():
    out = preprocess_image(params(range_min=-1.0, range_max=1.0), RGB)
    np.testing.assert_allclose(out, RGB / 255 * 2 - 1, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)


def test_normalization_all_channels_min_max_over_the_image():
    out = preprocess_image(params(normalization_type="all_channels", range_min=0.0, range_max=10.0), RGB)
    np.testing.assert_allclose(out, (RGB - 10.0) / 240.0 * 10.0, atol=1e-5)


def test_normalization_first_channel_uses_channel_0_stats():
    out = preprocess_image(params(normalization_type="first_channel", range_min=-1.0, range_max=1.0), RGB)
    np.testing.assert_allclose(out, (RGB - 10.0) / 90.0 * 2 - 1, atol=1e-5)  # channel 0 spans 10..100


def test_normalization_constant_values():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    out = preprocess_image(params(normalization_type="constant_values", mean=mean, std=std), RGB)
    np.testing.assert_allclose(out, (RGB / 255 - np.array(mean)) / np.array(std), atol=1e-5)
    imagenet = preprocess_image(params(normalization_type="constant_values"), RGB)
    np.testing.assert_allclose(imagenet[0, 0, 0], (10 / 255 - 0.485) / 0.229, atol=1e-5)


def test_percentile_stretch_takes_its_ends_from_percentiles_and_clips_nothing():
    ramp = np.arange(100, dtype=np.uint8).reshape(10, 10)  # gray values 0..99
    square = {"width": 10, "height": 10, "num_channels": 1, "normalization_type": "all_channels",
              "range_min": -1.0, "range_max": 1.0}
    out = preprocess_image(params(**square, stretch_percentile=10.0), ramp)[..., 0]
    # numpy's linear percentiles of 0..99: the 10th is 9.9, the 90th 89.1
    np.testing.assert_allclose(out, (ramp - 9.9) / (89.1 - 9.9) * 2 - 1, atol=1e-5)
    assert out.min() < -1.0 and out.max() > 1.0  # the darkest and brightest pixels stay beyond the range
    halcon = preprocess_image(params(**square), ramp)[..., 0]
    np.testing.assert_allclose(halcon, ramp / 99.0 * 2 - 1, atol=1e-6)  # p = 0: HALCON's min/max


def test_percentile_stretch_resists_a_few_extreme_pixels():
    image = np.full((10, 10), 100, np.uint8)
    image[:, 5:] = 140
    image[0, 0] = 255  # one hot pixel sets HALCON's maximum
    square = {"width": 10, "height": 10, "num_channels": 1, "normalization_type": "all_channels",
              "range_min": 0.0, "range_max": 1.0}
    robust = preprocess_image(params(**square, stretch_percentile=2.0), image)[..., 0]
    assert robust[1, 0] == pytest.approx(0.0) and robust[1, 9] == pytest.approx(1.0)
    assert preprocess_image(params(**square), image)[1, 9, 0] == pytest.approx(40 / 155, abs=1e-6)
    # a uniform image with one small spot: the percentile ends coincide, so min/max keep the spot
    spot = np.full((10, 10), 100, np.uint8)
    spot[4, 4] = 60
    out = preprocess_image(params(**square, stretch_percentile=2.0), spot)[..., 0]
    assert out[4, 4] == 0.0 and np.all(np.delete(out.ravel(), 44) == 1.0)


def test_flat_image_maps_to_range_min():
    out = preprocess_image(
        params(normalization_type="all_channels", range_min=-2.0, range_max=2.0), np.full((2, 2, 3), 7, np.uint8)
    )
    assert np.all(out == -2.0)


def test_channel_conversion():
    gray = RGB[..., :1]
    np.testing.assert_allclose(
        preprocess_image(params(range_min=0.0, range_max=255.0), gray), np.repeat(gray, 3, -1), atol=1e-4
    )
    out = preprocess_image(params(num_channels=1, range_min=0.0, range_max=255.0), RGB)
    rgb = RGB.astype(int)
    luma = np.round((299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]) / 1000)  # ITU-R 601-2
    np.testing.assert_allclose(out[..., 0], luma, atol=1)
    with pytest.raises(InputError, match="uint8 image"):
        preprocess_image(params(), np.zeros((2, 2, 3), np.float32))


def test_area_resize_is_block_mean():
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    out = preprocess_image(params(num_channels=1, resize="area", range_min=0.0, range_max=255.0), image)
    blocks = image[..., 0].reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out[..., 0], blocks, atol=1e-3)
    bilinear = preprocess_image(params(width=7, height=5, num_channels=1), image)
    assert bilinear.shape == (5, 7, 1)


def test_crop_domain_box_and_mask_file(tmp_path):
    image = np.arange(24, dtype=np.uint8).reshape(4, 6, 1) * 10
    box = params(
        width=3,
        height=2,
        num_channels=1,
        range_min=0.0,
        range_max=255.0,
        domain_handling="crop_domain",
        domain=(1, 2, 2, 4),
    )
    np.testing.assert_allclose(preprocess_image(box, image)[..., 0], image[1:3, 2:5, 0], atol=1e-4)
    mask = np.zeros((4, 6), np.uint8)
    mask[2, 4] = 1
    assert preprocess_mask(box, mask).tolist() == [[0, 0, 0], [0, 0, 1]]
    region = np.zeros((4, 6), np.uint8)
    region[1:3, 2:5] = 255
    Image.fromarray(region).save(tmp_path / "roi.png")
    from_file = box.to_dict() | {"domain": str(tmp_path / "roi.png")}
    np.testing.assert_allclose(
        preprocess_image(PreprocessParams.from_dict(from_file), image)[..., 0], image[1:3, 2:5, 0], atol=1e-4
    )
    with pytest.raises(InputError, match="domain"):
        preprocess_image(params(domain_handling="crop_domain", domain=(0, 0, 9, 9)), image)


def test_keep_domain_zeroes_outside():
    image = np.full((4, 6, 1), 200, np.uint8)
    keep = params(
        width=6,
        height=4,
        num_channels=1,
        range_min=1.0,
        range_max=2.0,
        domain_handling="keep_domain",
        domain=(1, 2, 2, 4),
    )
    inside = np.zeros((4, 6), bool)
    inside[1:3, 2:5] = True
    np.testing.assert_allclose(preprocess_image(keep, image)[..., 0], np.where(inside, 1 + 200 / 255, 0.0), atol=1e-6)
    assert np.array_equal(preprocess_mask(keep, np.ones((4, 6))), inside.astype(np.uint8))


def test_keep_domain_resizes_image_and_mask_alike():
    """A keep_domain image of another size than the model's: image and mask zeroed on the same pixels."""
    keep = params(width=4, height=4, num_channels=1, domain_handling="keep_domain", domain=(0, 0, 3, 3))
    inside = np.zeros((4, 4), bool)
    inside[:2, :2] = True  # the 4 x 4 box of an 8 x 8 image, halved
    image = preprocess_image(keep, np.full((8, 8), 255, np.uint8))[..., 0]
    assert np.array_equal(image != 0, inside)
    assert np.array_equal(preprocess_mask(keep, np.ones((8, 8), np.uint8)), inside.astype(np.uint8))


@pytest.mark.parametrize("kind", ["all_channels", "first_channel"])
def test_keep_domain_stretches_on_the_domain_only(kind):
    """What lies outside the region of interest (a bright fixture, a dark edge) sets no contrast."""
    image = np.full((4, 6, 3), 100, np.uint8)
    image[1:3, 2:5] = np.array([[100, 120, 140], [110, 130, 140]])[..., None]
    keep = params(width=6, height=4, num_channels=3, normalization_type=kind, range_min=0.0, range_max=1.0,
                  domain_handling="keep_domain", domain=(1, 2, 2, 4))
    clean = preprocess_image(keep, image)[1:3, 2:5, 0]
    np.testing.assert_allclose(clean, [[0.0, 0.5, 1.0], [0.25, 0.75, 1.0]], atol=1e-6)
    image[0, 0], image[3, 5] = 0, 255  # outside the domain only
    np.testing.assert_array_equal(preprocess_image(keep, image)[1:3, 2:5, 0], clean)


def test_mask_resize_stays_binary():
    mask = np.random.default_rng(0).integers(0, 2, (17, 13)) * 255
    for width, height in ((8, 8), (40, 30)):
        out = preprocess_mask(params(width=width, height=height, resize="bilinear"), mask)
        assert out.dtype == np.uint8 and out.shape == (height, width) and set(np.unique(out)) == {0, 1}
    expected = np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize((8, 8), Image.Resampling.NEAREST))
    assert np.array_equal(preprocess_mask(params(width=8, height=8), mask), expected)


@pytest.mark.parametrize(
    "key, value",
    [
        ("width", 0),
        ("height", 2.5),
        ("num_channels", 2),
        ("range_min", 200.0),
        ("normalization_type", "zscore"),
        ("domain_handling", "crop"),
        ("resize", "cubic"),
        ("std", (0.1, 0.0, 0.2)),
        ("mean", "abc"),
        ("domain", (0, 0, 1, 1)),
        ("stretch_percentile", 50.0),
        ("stretch_percentile", -1.0),
    ],
)
def test_invalid_parameter_names_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        create_dl_preprocess_param(**{key: value})


def test_invalid_domains_and_unknown_keys():
    with pytest.raises(ConfigError, match="'domain'"):
        create_dl_preprocess_param(domain_handling="crop_domain")
    with pytest.raises(ConfigError, match="'domain'"):
        create_dl_preprocess_param(domain_handling="keep_domain", domain=(3, 0, 1, 1))
    with pytest.raises(ConfigError, match="'domain' mask file .*nothere.png"):
        create_dl_preprocess_param(domain_handling="keep_domain", domain="nothere.png")
    with pytest.raises(ConfigError, match="preprocess.mean"):
        create_dl_preprocess_param(normalization_type="constant_values", num_channels=1)
    for kind in ("none", "constant_values"):  # only the per-image stretches have ends to choose
        with pytest.raises(ConfigError, match="preprocess.stretch_percentile .* all_channels or first_channel"):
            create_dl_preprocess_param(normalization_type=kind, stretch_percentile=1.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) preprocess.image_width"):
        create_dl_preprocess_param(image_width=3)


def test_dict_round_trip_is_json_and_hashable():
    original = params(normalization_type="constant_values", domain_handling="crop_domain", domain=[0, 1, 1, 1])
    restored = PreprocessParams.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored == original and hash(restored) == hash(original)
    robust = params(normalization_type="all_channels", stretch_percentile=1.0)
    assert PreprocessParams.from_dict(json.loads(json.dumps(robust.to_dict()))).stretch_percentile == 1.0


def test_a_domain_mask_may_be_given_as_a_path(tmp_path):
    from PIL import Image

    from anomax.preprocess.params import create_dl_preprocess_param

    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "domain.png")
    by_path = create_dl_preprocess_param(domain_handling="crop_domain", domain=tmp_path / "domain.png")
    assert by_path == create_dl_preprocess_param(domain_handling="crop_domain", domain=str(tmp_path / "domain.png"))
