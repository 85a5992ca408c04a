"""The optax training loop of trained heads, controlled by HALCON's training parameters.

A head hands over what it regresses (inputs and targets held in memory) and a pure
``error_fn(params, inputs, targets, key) -> per-position errors (B, ...)``; ``inputs`` may be a
pytree of arrays that share their first axis (one sample = one row of each); ``key`` is a PRNG
key of the step's own, for what the error draws at random (efficientad's colour jitter). Each epoch is
one compiled ``lax.scan`` over fixed-shape batches, so nothing recompiles between epochs: the last batch
is filled up with the epoch's first samples (distinct, real rows), whose errors are masked out.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from anomax import parallel
from anomax.errors import ConfigError, DatasetError, InputError
from anomax.settings import MAX_SEED, Settings, setting


logger = logging.getLogger("anomax")

@dataclasses.dataclass(frozen=True)
class TrainConfig(Settings):
    """HALCON's training parameters (with its defaults) plus the optimiser settings."""

    section: ClassVar[str] = "train"
    max_num_epochs: int = setting(30, ge=1)
    error_threshold: float = setting(0.001, ge=0)  # stop as soon as an epoch's mean error falls below it
    domain_ratio: float = setting(0.1, gt=0, le=1)  # fraction of positions per image entering the loss each step
    regularization_noise: float = setting(0.0001, ge=0)  # std of Gaussian noise added to the inputs
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = setting(0.001, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = setting(0.0001, ge=0)  # adamw only
    momentum: float = setting(0.9, ge=0, lt=1)  # sgd only
    batch_size: int = setting(8, ge=1)
    seed: int = setting(0, ge=0, le=MAX_SEED)

    def optimizer_for(self, steps_per_epoch: int) -> optax.GradientTransformation:
        learning_rate = self.learning_rate
        if self.schedule == "cosine":
            learning_rate = optax.cosine_decay_schedule(self.learning_rate, self.max_num_epochs * steps_per_epoch)
        if self.optimizer == "adamw":
            return optax.adamw(learning_rate, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            return optax.sgd(learning_rate, momentum=self.momentum or None)
        return optax.adam(learning_rate)


ErrorFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]


def train(error_fn: ErrorFn, params: Any, inputs: np.ndarray, targets: np.ndarray, config: TrainConfig,
          *, desc: str = "train", progress: bool = True,
          rate_key: str = "train.learning_rate") -> tuple[Any, dict[str, Any]]:
    """Minimise the mean of ``error_fn``'s per-position errors over (inputs, targets).

    Returns the params of the epoch with the lowest training error and HALCON's
    DLTrainResult ``{best_error, best_epoch}`` with a per-epoch ``log`` of
    ``{epoch, error, seconds}`` (seconds exclude the one-off compilation).

    An epoch's error is its training curve's value: the mean of its steps' losses, each taken on the
    positions ``domain_ratio`` drew, with the input noise, before that step's update. The params
    returned are those at the end of the best epoch, so they differ from the ones the error was
    averaged over: in a converging run they are a little better than ``best_error`` says; in one
    that diverges (too high a learning rate) they can be worse. When the best epoch is the last one,
    nothing has evaluated its final update yet, so the error of the returned params on the first batch
    is taken once: a network that blew up in that update raises like one that blew up earlier.
    ``rate_key``: the setting a divergence error tells the user to lower.
    """
    inputs, targets = jax.tree.map(jnp.asarray, inputs), jnp.asarray(targets)
    num_samples = len(targets)
    if any(len(leaf) != num_samples for leaf in jax.tree.leaves(inputs)):
        raise InputError(f"{desc}: every input array needs one row per target ({num_samples}), got "
                          f"{[len(leaf) for leaf in jax.tree.leaves(inputs)]}")
    if num_samples == 0:
        raise DatasetError(f"{desc}: cannot train on {num_samples} inputs and {len(targets)} targets; "
                          "the training split must hold at least one image")
    batch_size = min(config.batch_size, num_samples)  # a batch larger than the data would only be padding
    steps = -(-num_samples // batch_size)
    optimizer = config.optimizer_for(steps)

    def epoch_fn(params, opt_state, inputs, targets, key):
        order_key, step_key = jax.random.split(key)
        # the last batch is filled up with the epoch's first samples, masked out of the loss: real and
        # distinct images, so an error that looks across its batch (efficientad's hard-feature quantile)
        # sees a batch like any other there
        order = jnp.pad(jax.random.permutation(order_key, num_samples), (0, steps * batch_size - num_samples),
                        mode="wrap")
        valid = jnp.arange(steps * batch_size) < num_samples
        xs = (order.reshape(steps, batch_size), valid.reshape(steps, batch_size), jax.random.split(step_key, steps))

        def step(carry, batch):
            params, opt_state = carry
            index, valid, key = batch
            noise_key, domain_key = jax.random.split(key)
            error_key = jax.random.fold_in(key, 1)  # a third stream: the first two keep their draws
            x, y = jax.tree.map(lambda a: a[index], inputs), targets[index]
            if config.regularization_noise > 0:
                leaves, treedef = jax.tree.flatten(x)
                # one array keeps the key it always had: earlier runs reproduce bit for bit
                keys = jax.random.split(noise_key, len(leaves)) if len(leaves) > 1 else [noise_key]
                x = jax.tree.unflatten(treedef, [a + config.regularization_noise * jax.random.normal(k, a.shape, a.dtype)
                                                 for a, k in zip(leaves, keys)])

            def loss_fn(params):
                errors = error_fn(params, x, y, error_key).reshape(batch_size, -1)
                keep = _domain_mask(domain_key, errors.shape, config.domain_ratio) & valid[:, None]
                total = jnp.sum(jnp.where(keep, errors, 0.0))
                count = jnp.sum(keep)
                return total / count, (total, count)

            (_, (total, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (total, count)

        (params, opt_state), (totals, counts) = jax.lax.scan(step, (params, opt_state), xs)
        return params, opt_state, jnp.sum(totals) / jnp.sum(counts)

    opt_state = optimizer.init(params)
    base_key = jax.random.key(config.seed)
    started = time.perf_counter()
    run_epoch = jax.jit(epoch_fn).lower(params, opt_state, inputs, targets, base_key).compile()
    compile_seconds = time.perf_counter() - started

    best_params, best_error, best_epoch, log = params, math.inf, 0, []
    with tqdm(range(1, config.max_num_epochs + 1), desc=desc, unit="epoch", disable=not progress) as bar:
        for epoch in bar:
            started = time.perf_counter()
            # settled: reading the error waits for one device's copy only; the next epoch's program
            # must not start beside this one's collectives (see parallel.jit)
            params, opt_state, error = parallel.settled(run_epoch(params, opt_state, inputs, targets,
                                                                  jax.random.fold_in(base_key, epoch)))
            error = float(error)
            log.append({"epoch": epoch, "error": error, "seconds": time.perf_counter() - started})
            bar.set_postfix(error=f"{error:.4g}")
            logger.info("%s epoch %d/%d: error %.5g (%.1f s)", desc, epoch, config.max_num_epochs, error,
                        log[-1]["seconds"])
            if not math.isfinite(error):
                raise ConfigError(f"{desc}: the training error became {error} in epoch {epoch}; lower {rate_key}")
            if error < best_error:
                best_params, best_error, best_epoch = params, error, epoch
            if error < config.error_threshold:
                break
    if best_epoch == len(log):  # the best epoch's last update is evaluated by no later epoch
        error = float(parallel.settled(jax.jit(lambda p, x, y: jnp.mean(error_fn(p, x, y, base_key)))(
            best_params, jax.tree.map(lambda a: a[:batch_size], inputs), targets[:batch_size])))
        if not math.isfinite(error):
            raise ConfigError(f"{desc}: the trained network's error became {error} in the last update of epoch "
                              f"{best_epoch}; lower {rate_key}")
    info = {"best_error": best_error, "best_epoch": best_epoch, "log": log, "compile_seconds": compile_seconds}
    return best_params, info


def _domain_mask(key: jax.Array, shape: tuple[int, int], ratio: float) -> jax.Array:
    """Exactly round(ratio * positions) random positions per row (at least one)."""
    if ratio >= 1:
        return jnp.ones(shape, bool)
    keep = max(1, round(ratio * shape[1]))
    draws = jax.random.uniform(key, shape)
    return draws <= jnp.sort(draws, axis=1)[:, keep - 1 : keep]
