"""The protocol every head follows: settings in, one fitting pass, state out, maps from a pure score.

A head's hyperparameters are one frozen ``Settings`` class (``Head.Config``): the Hydra schema,
the saved hyperparameters and the loader's validation all come from it. Its ``state`` is a
flat dict of numpy arrays (saved in the artifact); ``score`` is a pure function of that state
returning the upsampled, smoothed ``anomaly_image`` and the ``anomaly_score``, so the model
jits backbone -> adaptor -> head -> map in one program and a reloaded head scores bit-identically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping

import jax
import numpy as np
from tqdm import tqdm

from anomax.errors import ArtifactError, ConfigError, DatasetError, InputError
from anomax.kernels.maps import anomaly_map
from anomax.parallel import gather_valid, local_rows
from anomax.settings import Settings, setting


@dataclasses.dataclass(frozen=True)
class HeadConfig(Settings):
    """Map settings every head shares. sigma: Gaussian smoothing of the anomaly map in input
    pixels (0 = none). upsample: patch grid -> input size ('bilinear', the PatchCore and PaDiM
    papers; 'nearest', anomalib's PatchCore)."""

    section: ClassVar[str] = "model.head"
    sigma: float = setting(4.0, ge=0)
    upsample: Literal["bilinear", "nearest"] = "bilinear"


class FeatureBatches:
    """What the model hands a head's fit: re-iterable batches {'image', 'features', 'valid'} whose
    image count is known before the first batch is extracted (so a head can size its state)."""

    def __init__(self, make_batches: Callable[[], Iterator[dict[str, Any]]], num_images: int, batch_size: int,
                 num_batches: int | None = None):
        """num_batches: how many ``make_batches`` yields (default: num_images in batches of batch_size)."""
        self._make_batches = make_batches
        self.num_images = num_images
        self.batch_size = batch_size
        self.num_batches = -(-num_images // batch_size) if num_batches is None else num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._make_batches()

    def __len__(self) -> int:
        return self.num_batches


class Head:
    name: ClassVar[str] = ""
    Config: ClassVar[type[HeadConfig]] = HeadConfig
    state_keys: ClassVar[tuple[str, ...]] = ()
    uses_backbone: ClassVar[bool] = True  # False: score() needs only the images (features=None)
    wants_validation: ClassVar[bool] = False  # True: fit() also gets the validation split's good images
    trained: ClassVar[bool] = False  # True: fit() trains networks, following ``train`` (conf/train/) and its seed
    multi_process: ClassVar[bool] = True  # False: fit() does not run across processes (distributed.check_model)

    def __init__(self, config: HeadConfig | None = None, **settings: Any):
        """``Head(config)`` or ``Head(key=value, ...)``; unknown keys and bad values raise ConfigError."""
        if config is not None and settings:
            raise ConfigError(f"head '{self.name}': pass a {self.Config.__name__} or keyword settings, not both")
        if config is not None and not isinstance(config, self.Config):
            raise ConfigError(f"head '{self.name}' needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config if config is not None else self.Config.from_dict(settings)
        self._state: dict[str, np.ndarray] | None = None

    @property
    def hyperparams(self) -> dict[str, Any]:
        """JSON-able settings: ``HEADS.get(name).from_state(hyperparams, state)`` rebuilds the head."""
        return self.config.to_dict()

    # ---- state -------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        if self._state is None:
            raise ConfigError(f"head '{self.name}' has no state yet: call fit() or from_state() first")
        return self._state

    @classmethod
    def from_state(cls, hyperparams: Mapping[str, Any], state: Mapping[str, Any]) -> "Head":
        head = cls(cls.Config.from_dict(hyperparams))
        head._state = stored_state(cls.name, state, cls.state_keys)
        head.check_state(head._state)
        return head

    @staticmethod
    def check_state(state: Mapping[str, np.ndarray]) -> None:
        """Raise ArtifactError where a stored state's arrays do not fit together (from_state calls it)."""

    # ---- fit and score -----------------------------------------------------------------
    def fit(self, batches: Iterable[Mapping[str, Any]], *, train=None, validation=None,
            progress: bool = False) -> dict[str, Any]:
        """One pass over batches {'image', 'features' (B,h,w,D), 'valid' (B,)}; sets state and
        returns JSON-able fit information. ``train`` (a TrainConfig) is for trained heads;
        ``validation`` (batches of good validation images) for heads with wants_validation."""
        raise NotImplementedError

    def fit_inputs(self, model) -> dict[str, Any]:
        """Further keyword arguments of ``fit`` that only the model can make (e.g. feature batches
        of images outside the dataset); none by default."""
        return {}

    def score(self, state: Mapping[str, jax.Array], images: jax.Array, features: jax.Array | None,
              mesh=None) -> dict[str, jax.Array]:
        """Pure: -> {'anomaly_image' (B, H, W), 'anomaly_score' (B,), and any extra maps}.
        ``mesh``: the jax.sharding.Mesh to spread the work over (static; None is one device)."""
        raise NotImplementedError

    def anomaly_map(self, patch_scores: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
        """(B, h, w) -> (B, H, W) upsampled and smoothed with this head's map settings."""
        return anomaly_map(patch_scores, tuple(out_hw), self.config.sigma, self.config.upsample)

    def outputs(self, patch_scores: jax.Array, images: jax.Array, image_scores: jax.Array | None = None):
        """The result dict from patch scores; the image score defaults to the map's maximum."""
        anomaly_image = self.anomaly_map(patch_scores, images.shape[1:3])
        if image_scores is None:
            image_scores = anomaly_image.max(axis=(1, 2))
        return {"anomaly_image": anomaly_image, "anomaly_score": image_scores}

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

    def in_memory(self, batches: Iterable[Mapping[str, Any]], what: str, progress: bool,
                  need_features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """All valid images (B, H, W, C) and features of ``batches`` in memory, for heads that train
        many epochs on them. Several processes: each reads its own rows, and every process gets all
        of them in the split's order (padding travels along to the gather, which needs the same
        shapes on every process, and is dropped after)."""
        valid, images, features = [], [], []
        for batch in tqdm(batches, desc=f"{self.name}: read {what}", unit="batch", disable=not progress):
            if "image" not in batch or (need_features and "features" not in batch):
                raise InputError(f"{self.name}.fit: a batch of {what} needs 'image'"
                                 f"{' and features' if need_features else ''}, got {sorted(batch)}; "
                                 "run the backbone and FeatureAdaptor first")
            valid.append(local_rows(batch.get("valid", np.ones(len(batch["image"]), bool))).astype(bool))
            images.append(np.asarray(batch["image"], np.float32))
            if need_features:
                features.append(local_rows(batch["features"]).astype(np.float32, copy=False))
        rows = gather_valid(*(np.concatenate(x) for x in (valid, images, features) if x)) if valid else []
        if not rows or not len(rows[0]):
            raise DatasetError(f"{self.name}.fit got no valid images in {what}; check that split")
        return rows[0], (rows[1] if need_features else None)


def stored_state(head: str, state: Mapping[str, Any], keys: Iterable[str],
                 integer_keys: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a stored head state, each present, finite and float32 (``integer_keys``:
    int32): a corrupt or modified artifact is refused when it loads, naming the key, instead of
    scoring NaN, differently, or failing in apply."""
    integer_keys = tuple(integer_keys)
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ArtifactError(f"head '{head}' state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}; the "
                            "artifact is incomplete or from another head — refit the model")
    arrays = {key: np.asarray(state[key]) for key in keys}
    broken = [key for key, value in arrays.items()
              if not (np.issubdtype(value.dtype, np.number) and np.isfinite(value).all())]
    if broken:
        raise ArtifactError(f"head '{head}' state {broken[:5]} holds NaN, infinite or non-numeric values; the "
                            "artifact is corrupt or was modified — save the model again")
    # heads store float32 (int32 sizes): another type would load and score differently
    retyped = [f"{key} ({value.dtype})" for key, value in arrays.items()
               if value.dtype != (np.int32 if key in integer_keys else np.float32)]
    if retyped:
        raise ArtifactError(f"head '{head}' state {retyped[:5]} is not of the type the head saves (float32; int32 "
                            f"for {list(integer_keys)}); the artifact was modified — save the model again")
    return arrays
