import json

import jax
import numpy as np
import pytest

from feature_batches import IMAGE, batches_of

from anomax.errors import ArtifactError, ConfigError
from anomax.registry import HEADS

@pytest.fixture(scope="module")
def train():
    return np.random.default_rng(0).standard_normal((10, 4, 5, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(train):
    head = HEADS.get("patchcore")(coreset_ratio=0.25, projection_dim=4, chunk_size=16)
    return head, head.fit(batches_of(train), progress=True)


def test_bank_is_a_coreset_of_the_valid_training_patches(fitted, train):
    head, info = fitted
    bank = head.state["memory_bank"]
    assert info["num_images"] == 10 and info["num_patches"] == 200 and info["coreset_size"] == 50
    patches = train.reshape(-1, 6)
    assert bank.shape == (50, 6)
    assert all((patches == row).all(1).any() for row in bank)  # padding never enters the bank


def test_scores_are_nearest_distances_and_the_papers_reweighting(fitted, train):
    head, _ = fitted
    bank = head.state["memory_bank"].astype(np.float64)
    query = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    patch, image = jax.jit(head.score)(head.state, IMAGE[:3], query)

    distances = np.sqrt(((query.reshape(3, 20, 1, 6) - bank) ** 2).sum(-1))  # (B, patches, bank)
    np.testing.assert_allclose(np.asarray(patch).reshape(3, 20), distances.min(-1), atol=1e-4)
    # anomalib's compute_anomaly_score, written out in numpy.
    worst = distances.min(-1).argmax(1)
    nearest = distances.argmin(-1)[np.arange(3), worst]
    support = np.argsort(((bank[nearest][:, None] - bank) ** 2).sum(-1), axis=1)[:, :9]
    d = np.linalg.norm(bank[support] - query.reshape(3, 20, 6)[np.arange(3), worst][:, None], axis=-1)
    weights = 1 - np.exp(d[:, 0]) / np.exp(d).sum(1)
    np.testing.assert_allclose(np.asarray(image), weights * distances.min(-1).max(1), rtol=1e-4)


def test_planted_outlier_gets_the_top_scores(fitted, train):
    head, _ = fitted
    test = train[:3].copy()
    test[2, 1, 3] += 6.0
    patch, image = head.score(head.state, IMAGE[:3], test)
    assert np.unravel_index(np.argmax(patch), patch.shape) == (2, 1, 3)
    assert np.argmax(image) == 2


def test_absolute_size_patch_subsampling_and_reload(train):
    head = HEADS.get("patchcore")(coreset_size=7, max_patches_per_image=5, num_neighbors=1, projection_dim=None)
    info = head.fit(iter(batches_of(train)))  # no len(): the bank grows instead of being preallocated
    assert info["num_patches"] == 50 and head.state["memory_bank"].shape == (7, 6)
    clone = HEADS.get("patchcore").from_state(json.loads(json.dumps(head.hyperparams)), head.state)
    for a, b in zip(head.score(head.state, IMAGE, train[:4]), clone.score(clone.state, IMAGE, train[:4])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ArtifactError, match="memory_bank"):
        HEADS.get("patchcore").from_state(head.hyperparams, {})


@pytest.mark.parametrize("bad", [{"coreset_ratio": 0}, {"coreset_ratio": 1.5}, {"coreset_size": 0},
                                 {"num_neighbors": 0}, {"chunk_size": 2.5}, {"max_patches_per_image": -1}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        HEADS.get("patchcore")(**bad)


def test_coreset_larger_than_the_bank_is_refused(train):
    with pytest.raises(ConfigError, match="coreset_size"):
        HEADS.get("patchcore")(coreset_size=1000).fit(batches_of(train))
