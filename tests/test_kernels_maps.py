import numpy as np
import pytest
import scipy.ndimage as ndi

from anomax.errors import InputError
from anomax.kernels.maps import anomaly_map, gaussian_kernel


def test_kernel_size_is_anomalibs():
    assert gaussian_kernel(4.0).shape == (33,) and gaussian_kernel(1.2).shape == (11,)


def test_anomaly_map_is_half_pixel_bilinear_upsampling():
    scores = np.random.default_rng(1).random((2, 4, 5)).astype(np.float32)
    upsampled = np.asarray(anomaly_map(scores, (16, 20), sigma=0.0))
    # F.interpolate(bilinear, align_corners=False) == scipy zoom on the pixel grid with edge clamping.
    expected = ndi.zoom(scores.astype(np.float64), (1, 4, 4), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(upsampled, expected, atol=1e-6)
    assert anomaly_map(scores, (40, 48), sigma=4.0).shape == (2, 40, 48)


@pytest.mark.parametrize("upsample, order", [("bilinear", 1), ("nearest", 0)])
def test_anomaly_map_is_upsampling_then_reflect_smoothing(upsample, order):
    # anomaly_map applies one composed matrix per axis; the reference does the steps one by one.
    scores = np.random.default_rng(2).gamma(2.0, size=(2, 8, 6))
    smoothed = np.asarray(anomaly_map(scores.astype(np.float32), (64, 48), sigma=2.0, upsample=upsample))
    upsampled = ndi.zoom(scores, (1, 8, 8), order=order, grid_mode=True, mode="nearest")
    expected = ndi.gaussian_filter(upsampled, (0, 2.0, 2.0), mode="mirror")
    np.testing.assert_allclose(smoothed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_map_too_small_for_sigma_is_refused():
    with pytest.raises(InputError, match="sigma"):
        anomaly_map(np.zeros((1, 2, 2), np.float32), (16, 16), sigma=4.0)
