import json

import jax
import numpy as np
import pytest

from feature_batches import IMAGE, batches_of, grid_images

from anomax.errors import ArtifactError, ConfigError
from anomax.kernels.stats import _update
from anomax.registry import HEADS

@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((30, 5, 6, 4)) @ rng.standard_normal((4, 4)) + 3).astype(np.float32)
    head = HEADS.get("padim")(eps=0.01, sigma=0.0)
    _update.clear_cache()
    info = head.fit(batches_of(train), progress=True)
    return head, train, info, _update._cache_size()


def test_fit_is_one_compiled_update_for_all_batches(fitted):
    head, train, info, compiled = fitted
    assert info == {"num_images": 30} and compiled == 1


def test_patch_score_is_the_regularised_mahalanobis_distance(fitted):
    head, train, _, _ = fitted
    query = np.random.default_rng(1).standard_normal((2, 5, 6, 4)).astype(np.float32)
    out = head.score(head.state, grid_images(query), query)
    patch, image = out["anomaly_image"], out["anomaly_score"]
    x = train.astype(np.float64)
    for h, w in [(0, 0), (4, 5), (2, 3)]:
        precision = np.linalg.inv(np.cov(x[:, h, w], rowvar=False) + 0.01 * np.eye(4))
        delta = query[:, h, w] - x[:, h, w].mean(0)
        expected = np.sqrt(np.einsum("bi,ij,bj->b", delta, precision, delta))
        np.testing.assert_allclose(np.asarray(patch)[:, h, w], expected, rtol=1e-4)
    np.testing.assert_allclose(image, np.asarray(patch).max((1, 2)), rtol=1e-6)
    smoothed = HEADS.get("padim").from_state({"sigma": 4.0}, head.state).score(head.state, IMAGE[:2], query)
    assert smoothed["anomaly_image"].shape == (2, 24, 24)
    np.testing.assert_allclose(smoothed["anomaly_score"], np.asarray(smoothed["anomaly_image"]).max((1, 2)))


def test_planted_outlier_gets_the_top_scores(fitted):
    head, train, _, _ = fitted
    test = train[:3].copy()
    test[1, 2, 4] += 5.0
    out = jax.jit(head.score)(head.state, grid_images(test), test)
    patch, image = out["anomaly_image"], out["anomaly_score"]
    assert np.unravel_index(np.argmax(patch), patch.shape) == (1, 2, 4)
    assert np.argmax(image) == 1


def test_reloaded_head_scores_identically(fitted):
    head, train, _, _ = fitted
    clone = HEADS.get("padim").from_state(json.loads(json.dumps(head.hyperparams)), head.state)
    for key, value in head.score(head.state, IMAGE, train[:4]).items():
        np.testing.assert_array_equal(value, clone.score(clone.state, IMAGE, train[:4])[key])
    with pytest.raises(ArtifactError, match="whitening"):
        HEADS.get("padim").from_state(head.hyperparams, {"mean": head.state["mean"]})


@pytest.mark.parametrize("bad", [{"eps": 0}, {"eps": -1.0}, {"sigma": -1}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        HEADS.get("padim")(**bad)


def test_an_ill_conditioned_covariance_is_not_blamed_on_the_features():
    """Finite features of a large scale from 3 images: float32's Cholesky fails; the message says what
    helps (eps, more images, normalised inputs), not that the features hold NaN."""
    from anomax.errors import InputError

    features = (np.random.default_rng(0).standard_normal((3, 1, 1, 256)) * 50).astype(np.float32)
    with pytest.raises(InputError, match=r"too ill-conditioned .* raise model.head.eps \(now 0.01\)"):
        HEADS.get("padim")(eps=0.01, sigma=0.0).fit(batches_of(features))
    with pytest.raises(InputError, match="the training features contain NaN or inf"):
        HEADS.get("padim")(eps=0.01, sigma=0.0).fit(batches_of(np.where(features > 0, features, np.nan)))
