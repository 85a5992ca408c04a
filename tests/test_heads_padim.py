import json

import jax
import numpy as np
import pytest

from feature_batches import IMAGE, batches_of

from anomax.errors import ArtifactError, ConfigError
from anomax.kernels.stats import update_moments
from anomax.registry import HEADS

@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((30, 5, 6, 4)) @ rng.standard_normal((4, 4)) + 3).astype(np.float32)
    head = HEADS.get("padim")(eps=0.01)
    update_moments.clear_cache()
    info = head.fit(batches_of(train), progress=True)
    return head, train, info, update_moments._cache_size()


def test_fit_is_one_compiled_update_for_all_batches(fitted):
    head, train, info, compiled = fitted
    assert info == {"num_images": 30} and compiled == 1


def test_patch_score_is_the_regularised_mahalanobis_distance(fitted):
    head, train, _, _ = fitted
    query = np.random.default_rng(1).standard_normal((2, 5, 6, 4)).astype(np.float32)
    patch, image = head.score(head.state, IMAGE[:2], query)
    x = train.astype(np.float64)
    for h, w in [(0, 0), (4, 5), (2, 3)]:
        precision = np.linalg.inv(np.cov(x[:, h, w], rowvar=False) + 0.01 * np.eye(4))
        delta = query[:, h, w] - x[:, h, w].mean(0)
        expected = np.sqrt(np.einsum("bi,ij,bj->b", delta, precision, delta))
        np.testing.assert_allclose(np.asarray(patch)[:, h, w], expected, rtol=1e-4)
    np.testing.assert_allclose(image, np.asarray(head.anomaly_map(patch, (24, 24))).max((1, 2)), rtol=1e-6)


def test_planted_outlier_gets_the_top_scores(fitted):
    head, train, _, _ = fitted
    test = train[:3].copy()
    test[1, 2, 4] += 5.0
    patch, image = jax.jit(head.score)(head.state, IMAGE[:3], test)
    assert np.unravel_index(np.argmax(patch), patch.shape) == (1, 2, 4)
    assert np.argmax(image) == 1


def test_reloaded_head_scores_identically(fitted):
    head, train, _, _ = fitted
    clone = HEADS.get("padim").from_state(json.loads(json.dumps(head.hyperparams)), head.state)
    for a, b in zip(head.score(head.state, IMAGE, train[:4]), clone.score(clone.state, IMAGE, train[:4])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ArtifactError, match="whitening"):
        HEADS.get("padim").from_state(head.hyperparams, {"mean": head.state["mean"]})


@pytest.mark.parametrize("bad", [{"eps": 0}, {"eps": -1.0}, {"sigma": -1}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        HEADS.get("padim")(**bad)
