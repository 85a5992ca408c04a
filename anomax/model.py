"""The anomaly model: preprocess -> backbone -> feature adaptor -> head -> anomaly map and score.

Everything after preprocessing is one pure function of a parameter pytree
(``AnomalyModel.infer``), jit-compiled once per batch shape; ``fit`` streams the
training split through the backbone and adaptor into the head in one pass.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.backbones import Backbone
from anomax.data.dataset import DLDataset
from anomax.errors import ConfigError, InputError
from anomax.features import FeatureAdaptor
from anomax.heads._base import Head
from anomax.parallel import data_mesh, mesh_size, replicate, shard_batch
from anomax.preprocess.cache import iterate_batches
from anomax.preprocess.params import PreprocessParams, preprocess_image


class AnomalyModel:
    def __init__(self, preprocess: PreprocessParams, backbone: Backbone, adaptor: FeatureAdaptor, head: Head,
                 adaptor_params: Mapping[str, Any] | None = None, thresholds: Mapping[str, float] | None = None,
                 batch_size: int = 16):
        self.preprocess = preprocess
        self.backbone = backbone
        self.adaptor = adaptor
        self.head = head
        self.adaptor_params = dict(adaptor.init(backbone.channels) if adaptor_params is None else adaptor_params)
        self.thresholds = dict(thresholds or {})
        self.batch_size = batch_size
        self.device = jax.devices()[0]  # where apply and score_split run
        self.mesh = None  # set_params(device='all'): a 1-D 'data' mesh, batches split over all devices
        self._features = jax.jit(self.features)
        self._infer = jax.jit(self.infer)

    # ---- pure functions -------------------------------------------------------------
    def features(self, backbone_params, adaptor_params, images: jax.Array) -> jax.Array:
        """Preprocessed images (B, H, W, C) -> adapted patch features (B, h, w, D)."""
        images = jnp.broadcast_to(images, images.shape[:3] + (3,)) if images.shape[-1] == 1 else images
        return self.adaptor.apply(adaptor_params, self.backbone.forward(backbone_params, images))

    def infer(self, params: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        """Pure: preprocessed images -> {'anomaly_image' (B, H, W), 'anomaly_score' (B,)}."""
        features = self.features(params["backbone"], params["adaptor"], images)
        patch_scores, image_scores = self.head.score(params["head"], images, features)
        return {"anomaly_image": self.head.anomaly_map(patch_scores, images.shape[1:3]),
                "anomaly_score": image_scores}

    @property
    def params(self) -> dict[str, Any]:
        return {"backbone": self.backbone.params, "adaptor": self.adaptor_params,
                "head": {key: jnp.asarray(value) for key, value in self.head.state.items()}}

    # ---- runtime parameters (HALCON's get_dl_model_param / set_dl_model_param) ----------------
    def get_params(self) -> dict[str, Any]:
        platform_devices = jax.devices(self.device.platform)
        device = "all" if self.mesh else f"{self.device.platform}:{platform_devices.index(self.device)}"
        return {"batch_size": self.batch_size, "thresholds": dict(self.thresholds), "device": device}

    def set_params(self, *, batch_size: int | None = None, thresholds: Mapping[str, float] | None = None,
                   device: str | jax.Device | None = None) -> None:
        """batch_size >= 1; thresholds {'segmentation', 'classification'} (or {} for scores only);
        device 'cpu', 'gpu', 'cuda:1', ... or a jax.Device, or 'all': data-parallel over all
        local devices (batch_size must then be a multiple of the device count)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ConfigError(f"model parameter 'batch_size' must be an integer >= 1, got {batch_size!r}")
        batch_size = int(batch_size or self.batch_size)
        mesh = self.mesh if device is None else data_mesh() if device == "all" else None
        if mesh is not None and batch_size % mesh_size(mesh):
            raise ConfigError(f"model parameter 'batch_size' ({batch_size}) must be a multiple of the "
                              f"{mesh_size(mesh)} devices of device='all'")
        self.batch_size = batch_size
        if thresholds is not None:
            if not (set(thresholds) in (set(), {"segmentation", "classification"})
                    and all(_is_finite(v) for v in thresholds.values())):
                raise ConfigError(f"model parameter 'thresholds' must be {{}} or finite 'segmentation' and "
                                  f"'classification' values, got {thresholds!r}")
            self.thresholds = {key: float(value) for key, value in thresholds.items()}
        if device is not None and mesh is None:
            self.device = device if isinstance(device, jax.Device) else _device(device)
        self.mesh = self.head.mesh = mesh

    # ---- fit and score on datasets ----------------------------------------------------------
    def fit(self, dataset: DLDataset, split: str = "train", *, cache_dir: str | None = None,
            progress: bool = True) -> dict[str, Any]:
        """One streamed pass over ``split`` (good images only) into the head; returns the fit info."""
        if any(s.anomaly_label != "ok" for s in dataset.samples_of(split)):
            raise InputError(f"split '{split}' holds defective ('nok') images; heads train on good images only")

        params = self._placed({"backbone": self.backbone.params, "adaptor": self.adaptor_params})

        def batches() -> Iterator[dict[str, Any]]:
            for batch in iterate_batches(dataset, split, self.preprocess, self.batch_size, cache_dir=cache_dir):
                images = self._placed(batch["image"], split_batch=True)
                yield {"image": batch["image"], "valid": batch["valid"],
                       "features": self._features(params["backbone"], params["adaptor"], images)}

        return self.head.fit(batches(), progress=progress)

    def score_split(self, dataset: DLDataset, split: str, *, cache_dir: str | None = None,
                    progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Batches of {'anomaly_image', 'anomaly_score', 'mask', 'label', 'index', 'valid', 'image'}."""
        params = self._placed(self.params)
        for batch in iterate_batches(dataset, split, self.preprocess, self.batch_size, cache_dir=cache_dir,
                                     progress=f"score {split}" if progress else None):
            out = jax.device_get(self._infer(params, self._placed(batch["image"], split_batch=True)))
            yield {**batch, **{key: np.asarray(value) for key, value in out.items()}}

    # ---- new images ---------------------------------------------------------------------------
    def apply(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Raw images (H, W, C) uint8 -> one HALCON-style result dict per image."""
        from anomax.evaluation import threshold_dl_anomaly_results

        inputs = np.stack([preprocess_image(self.preprocess, np.asarray(image)) for image in images])
        params = self._placed(self.params)
        outs = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
            out = jax.device_get(self._infer(params, self._placed(padded, split_batch=True)))  # compiled once
            outs.append({key: np.asarray(value)[: len(chunk)] for key, value in out.items()})
        maps = np.concatenate([o["anomaly_image"] for o in outs])
        scores = np.concatenate([o["anomaly_score"] for o in outs])
        results = [{"anomaly_image": m, "anomaly_score": float(s)} for m, s in zip(maps, scores)]
        if {"segmentation", "classification"} <= set(self.thresholds):
            applied = threshold_dl_anomaly_results(maps, scores, self.thresholds["segmentation"],
                                                   self.thresholds["classification"])
            for result, extra in zip(results, applied):
                result.update(extra)
        return results

    def _placed(self, tree, split_batch: bool = False):
        """On self.device; or with a mesh: batches split over its devices, anything else replicated."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return shard_batch(self.mesh, tree) if split_batch else replicate(self.mesh, tree)


def _device(name: str) -> jax.Device:
    """'cpu', 'gpu', 'cuda:1' -> that jax.Device."""
    platform, _, index = str(name).partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, ValueError, IndexError):
        available = [f"{d.platform}:{i}" for i, d in enumerate(jax.devices())]
        raise ConfigError(f"model parameter 'device' {name!r} is not available here; available: {available}") from None


def _is_finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
