import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from anomax.errors import ConfigError, InputError
from anomax.features import FeatureAdaptor


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    return {"fine": rng.standard_normal((2, 8, 8, 3)).astype(np.float32),
            "coarse": rng.standard_normal((2, 4, 4, 5)).astype(np.float32)}


def test_pool_resize_concat_match_torch_semantics(features):
    adaptor = FeatureAdaptor(["fine", "coarse"], pool_size=3)
    out = np.asarray(jax.jit(adaptor.apply)(adaptor.init({"fine": 3, "coarse": 5}), features))
    # AvgPool2d(3, 1, 1) with count_include_pad=True: zero padding, always divided by 9.
    pool = lambda x: ndi.uniform_filter(x.astype(np.float64), (1, 3, 3, 1), mode="constant")
    # F.interpolate(bilinear, align_corners=False) == zoom on the pixel grid with edge clamping.
    up = ndi.zoom(pool(features["coarse"]), (1, 2, 2, 1), order=1, grid_mode=True, mode="nearest")
    assert out.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(out, np.concatenate([pool(features["fine"]), up], -1), atol=1e-5)


def test_nearest_resize_repeats_coarse_cells(features):
    adaptor = FeatureAdaptor(["fine", "coarse"], pool_size=1, resize="nearest")
    out = np.asarray(adaptor.apply({}, features))
    np.testing.assert_array_equal(out[..., 3:], features["coarse"].repeat(2, 1).repeat(2, 2))


def test_grid_tap_averages_finer_taps_into_its_grid(features):
    """grid_tap='coarse': the 8 x 8 tap joins the 4 x 4 grid as the mean of each 2 x 2 block."""
    adaptor = FeatureAdaptor(["fine", "coarse"], pool_size=1, grid_tap="coarse")
    out = np.asarray(jax.jit(adaptor.apply)({}, features))
    blocks = features["fine"].reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    assert out.shape == (2, 4, 4, 8)
    np.testing.assert_allclose(out, np.concatenate([blocks, features["coarse"]], -1), atol=1e-6)
    finest = FeatureAdaptor(["fine", "coarse"], pool_size=1, grid_tap="fine").apply({}, features)
    np.testing.assert_array_equal(finest, FeatureAdaptor(["fine", "coarse"], pool_size=1).apply({}, features))
    with pytest.raises(ConfigError, match="model.head.adaptor.grid_tap"):
        FeatureAdaptor(["fine", "coarse"], grid_tap="other")


@pytest.mark.parametrize("resize", ["bilinear", "nearest"])
def test_grid_tap_averages_every_position_of_a_4x_finer_tap(resize):
    """Plain interpolation keeps one pixel (nearest) or the centre (bilinear) of each 4 x 4 block: a
    spot elsewhere in the block would vanish from the grid."""
    fine = np.zeros((1, 8, 8, 1), np.float32)
    fine[0, 0, 0, 0] = 16.0
    out = np.asarray(FeatureAdaptor(["fine", "coarse"], pool_size=1, resize=resize, grid_tap="coarse").apply(
        {}, {"fine": fine, "coarse": np.zeros((1, 2, 2, 1), np.float32)}))
    np.testing.assert_array_equal(out[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_repeated_taps_are_refused():
    with pytest.raises(ConfigError, match="model.head.adaptor.taps"):
        FeatureAdaptor(["fine", "fine"])


def test_projections_are_seeded(features):
    channels = {"fine": 3, "coarse": 5}
    subset = FeatureAdaptor(["fine", "coarse"], pool_size=1, projection_dim=4, projection="subset", seed=1)
    params = subset.init(channels)
    full = np.asarray(FeatureAdaptor(["fine", "coarse"], pool_size=1).apply({}, features))
    np.testing.assert_array_equal(np.asarray(subset.apply(params, features)), full[..., params["channels"]])
    assert np.array_equal(params["channels"], subset.init(channels)["channels"])

    random = FeatureAdaptor(["fine", "coarse"], pool_size=1, projection_dim=4, seed=1)
    matrix = random.init(channels)["matrix"]
    other = FeatureAdaptor(["fine"], pool_size=1, projection_dim=4, seed=2)
    assert matrix.shape == (8, 4) and not np.array_equal(matrix, other.init({"fine": 8})["matrix"])
    assert np.array_equal(matrix, random.init(channels)["matrix"])  # the same seed, the same projection
    np.testing.assert_allclose(np.asarray(random.apply({"matrix": matrix}, features)), full @ matrix, atol=1e-5)


def test_bad_adaptor_settings_are_refused(features):
    with pytest.raises(ConfigError, match="projection_dim"):
        FeatureAdaptor(["fine"], projection_dim=9).init({"fine": 3})
    with pytest.raises(ConfigError, match="not backbone taps"):
        FeatureAdaptor(["other"]).init({"fine": 3})
    with pytest.raises(ConfigError, match="pool_size"):
        FeatureAdaptor(["fine"], pool_size=2)
    with pytest.raises(InputError, match="lack the adaptor taps"):
        FeatureAdaptor(["fine", "other"]).apply({}, features)
