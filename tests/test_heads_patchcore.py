import json

import jax
import numpy as np
import pytest

from feature_batches import IMAGE, batches_of, grid_images

from anomax.errors import ArtifactError, ConfigError
from anomax.registry import HEADS

@pytest.fixture(scope="module")
def train():
    return np.random.default_rng(0).standard_normal((10, 4, 5, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(train):
    head = HEADS.get("patchcore")(coreset_ratio=0.25, projection_dim=4, chunk_size=16, sigma=0.0)
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
    out = jax.jit(head.score)(head.state, grid_images(query), query)
    patch, image = out["anomaly_image"], out["anomaly_score"]

    distances = np.sqrt(((query.reshape(3, 20, 1, 6) - bank) ** 2).sum(-1))  # (B, patches, bank)
    np.testing.assert_allclose(np.asarray(patch).reshape(3, 20), distances.min(-1), atol=1e-4)
    # anomalib's compute_anomaly_score, written out in numpy.
    worst = distances.min(-1).argmax(1)
    nearest = distances.argmin(-1)[np.arange(3), worst]
    support = np.argsort(((bank[nearest][:, None] - bank) ** 2).sum(-1), axis=1)[:, :9]
    d = np.linalg.norm(bank[support] - query.reshape(3, 20, 6)[np.arange(3), worst][:, None], axis=-1)
    weights = 1 - np.exp(d[:, 0]) / np.exp(d).sum(1)
    np.testing.assert_allclose(np.asarray(image), weights * distances.min(-1).max(1), rtol=1e-4)


def test_a_one_row_bank_scores_the_plain_maximum(train):
    """With one bank row there are no neighbours to weigh: 1 - softmax of one distance made every score 0."""
    head = HEADS.get("patchcore")(coreset_size=1, projection_dim=None, sigma=0.0)
    head.fit(batches_of(train))
    out = head.score(head.state, grid_images(train[:3]), train[:3])
    np.testing.assert_array_equal(np.asarray(out["anomaly_score"]), np.asarray(out["anomaly_image"]).max((1, 2)))
    assert (np.asarray(out["anomaly_score"]) > 0).all()


def test_planted_outlier_gets_the_top_scores(fitted, train):
    head, _ = fitted
    test = train[:3].copy()
    test[2, 1, 3] += 6.0
    out = head.score(head.state, grid_images(test), test)
    patch, image = out["anomaly_image"], out["anomaly_score"]
    assert np.unravel_index(np.argmax(patch), patch.shape) == (2, 1, 3)
    assert np.argmax(image) == 2


def test_absolute_size_patch_subsampling_and_reload(train):
    head = HEADS.get("patchcore")(coreset_size=7, max_patches_per_image=5, num_neighbors=1, projection_dim=None)
    info = head.fit(iter(batches_of(train)))  # no len(): the bank grows instead of being preallocated
    assert info["num_patches"] == 50 and head.state["memory_bank"].shape == (7, 6)
    clone = HEADS.get("patchcore").from_state(json.loads(json.dumps(head.hyperparams)), head.state)
    for key, value in head.score(head.state, IMAGE, train[:4]).items():
        np.testing.assert_array_equal(value, clone.score(clone.state, IMAGE, train[:4])[key])
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


def test_bank_is_allocated_once_from_the_known_image_count(train):
    """The model's batches say how many images come: the bank is sized from that, never grown, and a
    coreset larger than that bank fails before a single batch is extracted."""
    from anomax.heads._base import FeatureBatches

    extracted = []

    def make():
        for batch in batches_of(train):
            extracted.append(1)
            yield batch

    head = HEADS.get("patchcore")(coreset_size=7, projection_dim=None)
    head.fit(FeatureBatches(make, num_images=10, batch_size=4))
    assert head.state["memory_bank"].shape == (7, 6)
    with pytest.raises(ConfigError, match="coreset_size = 1000 .* at most the memory bank size 200"):
        HEADS.get("patchcore")(coreset_size=1000).fit(FeatureBatches(make, num_images=10, batch_size=4))


def test_upsampling_is_a_map_setting():
    patch = np.zeros((1, 2, 2), np.float32)
    patch[0, 0, 0] = 1.0
    nearest = HEADS.get("patchcore")(upsample="nearest", sigma=0.0).anomaly_map(patch, (4, 4))
    bilinear = HEADS.get("patchcore")(sigma=0.0).anomaly_map(patch, (4, 4))
    np.testing.assert_array_equal(np.asarray(nearest)[0], np.kron([[1, 0], [0, 0]], np.ones((2, 2))))
    assert 0 < float(bilinear[0, 1, 2]) < 1  # interpolated between the hot and a cold cell
    with pytest.raises(ConfigError, match="model.head.upsample"):
        HEADS.get("patchcore")(upsample="cubic")


def test_a_stored_memory_bank_must_be_a_finite_patches_by_dim_matrix():
    PatchCore = HEADS.get("patchcore")
    hyperparams = PatchCore(coreset_ratio=1.0).hyperparams
    PatchCore.from_state(hyperparams, {"memory_bank": np.zeros((3, 4), np.float32)})
    for bank, message in ((np.zeros(3, np.float32), r"shape \(3,\), expected \(patches, D\)"),
                          (np.zeros((0, 4), np.float32), r"shape \(0, 4\)"),
                          (np.full((3, 4), np.nan, np.float32), r"\['memory_bank'\] holds NaN")):
        with pytest.raises(ArtifactError, match=message):
            PatchCore.from_state(hyperparams, {"memory_bank": bank})
