"""The student head on tiny synthetic data: 32x32 images of a smooth wave pattern, and a
fixed nonlinear 'teacher' (tanh of a random channel mix, averaged over 8x8 cells)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anomax.errors import ArtifactError, ConfigError, InputError
from anomax.heads.student import PatchConv, StudentHead
from anomax.registry import HEADS

SIZE, DIM = 32, 8
MIX = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
TRAIN = dict(max_num_epochs=10, error_threshold=0.0, domain_ratio=0.5, learning_rate=0.003, batch_size=8)


def teacher(images):
    features = np.tanh(images @ MIX)
    return features.reshape(len(images), SIZE // 8, 8, SIZE // 8, 8, DIM).mean(axis=(2, 4))


def good_images(count, seed):
    rng = np.random.default_rng(seed)
    axis = np.linspace(-np.pi, np.pi, SIZE, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1, 1))
    waves = np.sin(3 * axis[:, None, None] + phase) * np.cos(3 * axis[None, :, None])
    return (waves + 0.1 * rng.normal(size=(count, SIZE, SIZE, 3))).astype(np.float32)


def batches(images, batch_size=8):
    """Fixed-shape batches like the data loader's: the last one padded and marked invalid."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        valid = np.arange(batch_size) < len(chunk)
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.float32)])
        yield {"image": padded, "features": teacher(padded), "valid": valid}


IMAGES = good_images(20, seed=1)


def fit(**train):
    head = StudentHead(complexity=4, sigma=0.0)
    return head, head.fit(batches(IMAGES), train={**TRAIN, **train})


def scores(head, images):
    """(anomaly_image, anomaly_score); with sigma 0 the map is the bilinearly upsampled patch errors."""
    state = {key: jnp.asarray(value) for key, value in head.state.items()}
    out = jax.jit(head.score)(state, images, teacher(images))
    return out["anomaly_image"], out["anomaly_score"]


@pytest.fixture(scope="module")
def trained():
    return fit()


def test_is_registered():
    assert HEADS.get("student") is StudentHead


def test_training_reduces_the_error(trained):
    head, info = trained
    errors = [entry["error"] for entry in info["log"]]
    assert len(errors) == 10 and errors[-1] < 0.5 * errors[0]
    assert info["best_error"] == min(errors) and errors[info["best_epoch"] - 1] == info["best_error"]
    assert head.config.stride == 8 and head.hyperparams["stride"] == 8


def test_same_seed_gives_identical_error_and_scores_and_stops_at_a_reached_threshold(trained):
    head, info = trained
    again, info_again = fit()
    assert info_again["best_error"] == info["best_error"]
    for first, second in zip(scores(head, IMAGES[:4]), scores(again, IMAGES[:4])):
        np.testing.assert_array_equal(first, second)
    threshold = info["log"][2]["error"] * 1.0001  # the same trajectory reaches it in epoch 3 at the latest
    _, stopped = fit(error_threshold=threshold)
    assert stopped["best_epoch"] <= 3 and len(stopped["log"]) == stopped["best_epoch"] < 10


def test_state_round_trip_scores_identically(trained):
    head, _ = trained
    # '/'-joined names match the weights they label (complexity 4, stride 8: widths 4, 8, 16).
    assert head.state["student/layers/0/kernel"].shape == (3, 3, 3, 4)
    assert head.state["student/head/kernel"].shape == (16, DIM) and head.state["teacher_std"].shape == (DIM,)
    reloaded = StudentHead.from_state(head.hyperparams, head.state)
    for first, second in zip(scores(head, IMAGES[:4]), scores(reloaded, IMAGES[:4])):
        np.testing.assert_array_equal(first, second)
    incomplete = {key: value for key, value in head.state.items() if key != "teacher_std"}
    with pytest.raises(ArtifactError, match="teacher_std"):
        StudentHead.from_state(head.hyperparams, incomplete)


def test_map_highlights_a_planted_anomaly(trained):
    head, _ = trained
    good = good_images(4, seed=2)
    defective = good.copy()
    defective[:, 8:16, 8:16, :] = 2.0  # a bright square filling feature cell (1, 1)
    good_patches, good_scores = scores(head, good)
    patches, defect_scores = scores(head, defective)
    hottest_cells = [tuple(int(i) // 8 for i in np.unravel_index(np.argmax(p), p.shape)) for p in np.asarray(patches)]
    assert hottest_cells == [(1, 1)] * 4
    assert np.min(defect_scores) > np.max(good_scores)
    assert good_patches.shape == (4, *IMAGES.shape[1:3]) and good_scores.shape == (4,)


@pytest.mark.parametrize("train", [{"domain_ratio": 0}, {"domain_ratio": 1.5}, {"regularization_noise": -1},
                                   {"max_num_epochs": 0}])
def test_invalid_training_parameters_fail_before_any_work(train):
    def never_read():
        raise AssertionError("the data was read before the parameters were checked")
        yield

    key = next(iter(train))
    with pytest.raises(ConfigError, match=f"train.{key}"):
        StudentHead().fit(never_read(), train=train)


def test_features_must_be_8_or_16_times_smaller_than_the_image():
    images = IMAGES[:8]
    with pytest.raises(InputError, match="stride 8 or 16"):
        StudentHead(complexity=4).fit([{"image": images, "features": teacher(images)[:, :3, :3],
                                        "valid": np.ones(8, bool)}])


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_conv_is_a_same_padded_convolution(stride):
    layer = PatchConv(5, 7, stride, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 5)), jnp.float32)
    expected = jax.lax.conv_general_dilated(x, layer.kernel[...], (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer.bias[...]
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)
