"""The generic optax training loop on a tiny linear regression (per-position errors)."""
import jax.numpy as jnp
import numpy as np
import pytest

from anomax.errors import ConfigError, InputError
from anomax.training import TrainConfig, train

RNG = np.random.default_rng(0)
INPUTS = RNG.normal(size=(13, 4, 4, 3)).astype(np.float32)  # 13: the last batch is padded
TARGETS = INPUTS @ RNG.normal(size=(3, 2)).astype(np.float32)
START = {"w": jnp.zeros((3, 2))}


def linear_error(params, inputs, targets, key=None):
    return jnp.mean(jnp.square(inputs @ params["w"] - targets), axis=-1)


def fit(**overrides):
    config = dict(max_num_epochs=15, learning_rate=0.05, batch_size=4, domain_ratio=0.5)
    return train(linear_error, START, INPUTS, TARGETS, TrainConfig(**{**config, **overrides}), progress=False)


def test_defaults_are_halcons():
    config = TrainConfig()
    assert (config.max_num_epochs, config.error_threshold, config.domain_ratio, config.regularization_noise) == (
        30, 0.001, 0.1, 0.0001)


@pytest.mark.parametrize("optimizer, schedule", [("adam", "constant"), ("adamw", "cosine"), ("sgd", "constant")])
def test_training_reduces_the_error(optimizer, schedule):
    params, info = fit(optimizer=optimizer, schedule=schedule, error_threshold=0.0)
    errors = [entry["error"] for entry in info["log"]]
    assert len(errors) == 15 and errors[-1] < 0.1 * errors[0]
    assert info["best_error"] == min(errors) and errors[info["best_epoch"] - 1] == info["best_error"]
    assert linear_error(params, INPUTS, TARGETS).mean() < 0.1 * linear_error(START, INPUTS, TARGETS).mean()
    assert all(entry["seconds"] > 0 for entry in info["log"])


def test_stops_as_soon_as_the_error_threshold_is_reached():
    _, unreached = fit(error_threshold=0.0)
    threshold = unreached["log"][4]["error"] * 1.0001  # reached in epoch 5 at the latest
    _, reached = fit(error_threshold=threshold)
    assert len(unreached["log"]) == 15
    assert reached["best_epoch"] <= 5 and len(reached["log"]) == reached["best_epoch"]
    assert reached["best_error"] < threshold <= min(entry["error"] for entry in reached["log"][:-1])


def test_same_seed_gives_identical_results_and_another_seed_does_not():
    params, info = fit(seed=3, regularization_noise=0.01)
    again, info_again = fit(seed=3, regularization_noise=0.01)
    other, info_other = fit(seed=4, regularization_noise=0.01)
    assert info["best_error"] == info_again["best_error"]
    np.testing.assert_array_equal(params["w"], again["w"])
    assert info["best_error"] != info_other["best_error"]


def test_epoch_error_is_the_mean_over_all_samples_without_padding():
    # A vanishing learning rate keeps the params at START, so the epoch error is the dataset mean.
    _, info = fit(optimizer="sgd", learning_rate=1e-30, domain_ratio=1.0, regularization_noise=0.0,
                  max_num_epochs=1)
    expected = np.mean(np.square(TARGETS), axis=-1).mean()
    np.testing.assert_allclose(info["best_error"], expected, rtol=1e-5)


def test_every_batch_holds_distinct_real_samples():
    """An error that looks across its batch (efficientad's hard-feature quantile) sees real, distinct
    samples in every batch: the last batch is filled up with other samples, not copies of one."""
    indices = np.arange(13, dtype=np.float32)[:, None]  # each sample is its own index

    def all_distinct(params, inputs, targets, key=None):
        distinct = jnp.sum(inputs[:, None, 0] == inputs[None, :, 0]) == len(inputs)
        return jnp.broadcast_to(distinct.astype(jnp.float32) + 0 * params["w"].sum(), (len(inputs), 1))

    config = TrainConfig(max_num_epochs=3, batch_size=4, domain_ratio=1.0, regularization_noise=0.0,
                         error_threshold=0.0)
    _, info = train(all_distinct, {"w": jnp.zeros(1)}, indices, indices, config, progress=False)
    assert [entry["error"] for entry in info["log"]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("key, value", [
    ("domain_ratio", 0.0), ("domain_ratio", 1.5), ("regularization_noise", -1.0), ("max_num_epochs", 0),
    ("error_threshold", -0.1), ("learning_rate", 0.0), ("batch_size", 0), ("optimizer", "lion"),
    ("schedule", "step"), ("max_num_epochs", 2.5), ("domain_ratio", float("nan")),
])
def test_invalid_parameters_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainConfig(**{key: value})


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="max_epochs"):
        TrainConfig.from_dict({"max_epochs": 3})


def test_inputs_may_be_a_pytree_of_rows():
    """A head can hand over several inputs per sample (efficientad: an image and a generic image);
    rows stay together: an input that does not enter the error changes nothing."""
    def error(params, inputs, targets, key):
        return linear_error(params, inputs["a"], targets) + 0.0 * jnp.mean(inputs["b"], axis=-1)

    config = TrainConfig(max_num_epochs=3, learning_rate=0.05, batch_size=4, domain_ratio=0.5,
                         regularization_noise=0.0)
    pair, info = train(error, START, {"a": INPUTS, "b": -INPUTS}, TARGETS, config, progress=False)
    single, single_info = train(linear_error, START, INPUTS, TARGETS, config, progress=False)
    np.testing.assert_array_equal(pair["w"], single["w"])
    assert info["best_error"] == single_info["best_error"]
    with pytest.raises(InputError, match=r"every input array needs one row per target \(13\)"):
        train(error, START, {"a": INPUTS, "b": INPUTS[:5]}, TARGETS, config, progress=False)


def test_the_error_draws_from_its_own_key_the_same_for_each_seed():
    """error_fn's key: the same draws for the same seed, others for another seed."""
    import jax

    def noisy_error(params, inputs, targets, key):
        return linear_error(params, inputs, targets + 0.1 * jax.random.normal(key, targets.shape))

    config = TrainConfig(max_num_epochs=2, learning_rate=0.05, batch_size=4, regularization_noise=0.0)
    first, first_info = train(noisy_error, START, INPUTS, TARGETS, config, progress=False)
    again, again_info = train(noisy_error, START, INPUTS, TARGETS, config, progress=False)
    other, _ = train(noisy_error, START, INPUTS, TARGETS, config.replace(seed=1),
                     progress=False)
    plain, _ = train(linear_error, START, INPUTS, TARGETS, config, progress=False)
    np.testing.assert_array_equal(first["w"], again["w"])
    assert first_info["log"][-1]["error"] == again_info["log"][-1]["error"]
    assert not np.array_equal(first["w"], other["w"]) and not np.array_equal(first["w"], plain["w"])
