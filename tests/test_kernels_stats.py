import numpy as np

from anomax.kernels.stats import covariance, init_moments, update_moments


def test_streamed_mean_and_covariance_equal_float64_numpy():
    rng = np.random.default_rng(0)
    positions, dim, batch = 3, 6, 8
    # A large common offset and correlated channels: raw sum-of-squares formulas cancel badly in float32.
    mixing = rng.standard_normal((dim, dim))
    data = (100.0 + rng.standard_normal((61, positions, dim)) @ mixing).astype(np.float32)
    padded = np.concatenate([data, np.full((64 - 61, positions, dim), 1e6, np.float32)])
    valid = np.arange(64) < 61
    moments = init_moments(positions, dim)
    for start in range(0, 64, batch):
        moments = update_moments(moments, padded[start:start + batch], valid[start:start + batch])
    # A batch of padding only changes nothing.
    moments = update_moments(moments, padded[:batch], np.zeros(batch, bool))

    exact = data.astype(np.float64)
    mean = exact.mean(0)
    cov = np.stack([np.cov(exact[:, p], rowvar=False) for p in range(positions)])
    assert int(moments.count) == 61
    assert np.abs(np.asarray(moments.mean) - mean).max() / np.abs(mean).max() < 1e-4
    assert np.abs(np.asarray(covariance(moments)) - cov).max() / np.abs(cov).max() < 1e-4


def test_the_old_moment_buffers_are_donated_to_the_update():
    """The P x D x D buffer is reused for the result instead of living twice; the count stays readable
    so a caller can wait on it."""
    moments = init_moments(4, 3)
    x = np.ones((2, 4, 3), np.float32)
    updated = update_moments(moments, x, np.ones(2, bool))
    assert moments.m2.is_deleted() and moments.mean.is_deleted()
    assert not moments.count.is_deleted() and float(updated.count) == 2
