"""The protocol every head follows: hyperparameters in, one fitting pass, state out.

A head's `state` is a flat dict of numpy arrays (saved in the artifact); `score` is a
pure function of that state, so the model can jit backbone -> adaptor -> head in one
program and a reloaded head scores bit-identically.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np
from tqdm import tqdm

from anomax.errors import ArtifactError, ConfigError, InputError
from anomax.kernels.maps import anomaly_map


class Head:
    name: str = ""
    state_keys: tuple[str, ...] = ()
    # Runtime, not a hyperparameter: the jax.sharding.Mesh that score() spreads its work over
    # (set by AnomalyModel.set_params(device='all')); None is one device.
    mesh = None

    def __init__(self, sigma: float = 4.0):
        self.check(isinstance(sigma, (int, float)) and sigma >= 0, "sigma", sigma, "a number >= 0")
        self.sigma = float(sigma)
        self._state: dict[str, np.ndarray] | None = None

    # ---- hyperparameters -------------------------------------------------------------
    @property
    def hyperparams(self) -> dict[str, Any]:
        """JSON-able constructor arguments: HEADS.get(name)(**hyperparams) rebuilds the head."""
        raise NotImplementedError

    def check(self, ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"head '{self.name}': {key} must be {expected}, got {value!r} "
                              f"(set it in conf/model/head/{self.name}.yaml or on the command line)")

    def check_count(self, key: str, value: Any, optional: bool = False) -> None:
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        self.check(valid or (optional and value is None), key, value,
                   "null or an integer >= 1" if optional else "an integer >= 1")

    # ---- state -------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        if self._state is None:
            raise ConfigError(f"head '{self.name}' has no state yet: call fit() or from_state() first")
        return self._state

    @classmethod
    def from_state(cls, hyperparams: Mapping[str, Any], state: Mapping[str, Any]) -> "Head":
        head = cls(**hyperparams)
        missing = sorted(set(cls.state_keys) - set(state))
        if missing:
            raise ArtifactError(f"head '{cls.name}' state lacks {missing}; the artifact is incomplete or "
                                f"from another head — refit the model")
        head._state = {key: np.asarray(state[key]) for key in cls.state_keys}
        return head

    # ---- fit and score -----------------------------------------------------------------
    def fit(self, batches: Iterable[Mapping[str, Any]], progress: bool = False) -> dict[str, Any]:
        """One pass over batches {'image', 'features' (B,h,w,D), 'valid' (B,)}; sets state and
        returns JSON-able fit information."""
        raise NotImplementedError

    def score(self, state: Mapping[str, jax.Array], images: jax.Array, features: jax.Array):
        """Pure: -> (patch_scores (B, h, w), image_scores (B,))."""
        raise NotImplementedError

    def anomaly_map(self, patch_scores: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
        """(B, h, w) -> (B, H, W) upsampled and smoothed with this head's sigma."""
        return anomaly_map(patch_scores, tuple(out_hw), self.sigma)

    def feature_batches(self, batches: Iterable[Mapping[str, Any]], progress: bool):
        """Yield (features (B,h,w,D) float32, valid (B,) bool) per batch, with a progress bar."""
        for batch in tqdm(batches, desc=f"fit {self.name}", unit="batch", disable=not progress):
            if "features" not in batch:
                raise InputError(f"head '{self.name}'.fit: batch lacks 'features' (has {sorted(batch)}); "
                                 f"run the backbone and FeatureAdaptor first")
            features = batch["features"]
            if features.ndim != 4:
                raise InputError(f"head '{self.name}'.fit: features must be (B, h, w, D), got {features.shape}")
            valid = batch.get("valid")
            yield features, (np.ones(features.shape[0], bool) if valid is None else valid)
