"""The anomaly model: preprocess -> backbone -> feature adaptor -> head -> anomaly map and score.

Everything after preprocessing is one pure function of a parameter pytree
(``AnomalyModel.infer``), jit-compiled once per batch shape; ``fit`` streams the
training split through the backbone and adaptor into the head in one pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anomax.augment import AugmentConfig, mean_over_transforms, transform
from anomax.backbones import Backbone
from anomax.data.dataset import DLDataset
from anomax.errors import ConfigError, InputError
from anomax.features import FeatureAdaptor
from anomax.heads._base import FeatureBatches, Head
from anomax.distributed import local_batches, local_count
from anomax import parallel
from anomax.inference import apply_in_batches, checked_images, checked_thresholds, classified
from anomax.parallel import data_mesh, gather, mesh_size, replicate, shard_batch
from anomax.preprocess.params import PreprocessParams
from anomax.settings import is_integer
from anomax.tiling import TilingConfig, apply_tiled, fit_tiled, score_split_tiled
from anomax.training import TrainConfig


def fit_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """A fit info's scalar entries, for one log line (the per-epoch logs and nested parts left out)."""
    return {key: value for key, value in info.items() if not isinstance(value, (list, dict))}


class AnomalyModel:
    """HALCON's anomaly-detection model: preprocess parameters, a frozen backbone, a feature adaptor
    and a scoring head, with the runtime parameters (batch size, thresholds, device) of
    get_params / set_params. ``fit`` on a dataset's good images, ``score_split`` and ``apply`` for
    maps and scores; ``anomax.build_model(cfg)`` builds one from a composed config, and
    ``anomax.save_model`` / ``anomax.load_model`` keep it."""

    def __init__(self, preprocess: PreprocessParams, backbone: Backbone, adaptor: FeatureAdaptor, head: Head,
                 adaptor_params: Mapping[str, Any] | None = None, thresholds: Mapping[str, float] | None = None,
                 batch_size: int = 16, augment: AugmentConfig | None = None,
                 tiling: TilingConfig | None = None):
        self.preprocess = preprocess
        self.backbone = backbone
        self.adaptor = adaptor
        self.head = head
        self.adaptor_params = dict(adaptor.init(backbone.channels) if adaptor_params is None else adaptor_params)
        self.thresholds, self.batch_size = {}, 16  # set through set_params below, which checks them
        self.augment = augment or AugmentConfig()  # fit-time and test-time transforms (anomax.augment)
        self.augment.check_input(preprocess.height, preprocess.width)
        self.tiling = (tiling or TilingConfig()).for_backbone(backbone)  # large images tile by tile (anomax.tiling)
        if self.tiling.enabled and (self.augment.fit or self.augment.tta):
            raise ConfigError(f"augment.fit = {list(self.augment.fit)}, augment.tta = {list(self.augment.tta)}: a tiled "
                              "model fits and scores tile by tile without them (anomax.tiling); set augment=none "
                              "or tiling=off")
        if self.tiling.enabled and getattr(head.config, "image_score", "max") != "max":
            raise ConfigError(f"model.head.image_score = {head.config.image_score!r} needs tiling off: a tiled image's "
                              "score is its stitched map's maximum (anomax.tiling); set model.head.image_score=max "
                              "or tiling=off")
        self.device = jax.devices()[0]  # where apply and score_split run
        self.mesh = None  # set_params(device='all'): a 1-D 'data' mesh, batches split over all devices
        self._features = parallel.jit(self.features)
        self._infer = parallel.jit(self.infer, static_argnames=("mesh",))
        self.set_params(batch_size=batch_size, thresholds=thresholds or {})

    @property
    def description(self) -> str:
        """'patchcore + mobilenet_v2': what logs and reports call this model."""
        return f"{self.head.name} + {self.backbone.name}"

    # ---- pure functions -------------------------------------------------------------
    def features(self, backbone_params, adaptor_params, images: jax.Array) -> jax.Array:
        """Preprocessed images (B, H, W, C) -> adapted patch features (B, h, w, D)."""
        images = jnp.broadcast_to(images, images.shape[:3] + (3,)) if images.shape[-1] == 1 else images
        return self.adaptor.apply(adaptor_params, self.backbone.forward(backbone_params, images))

    def infer(self, params: Mapping[str, Any], images: jax.Array, mesh=None) -> dict[str, jax.Array]:
        """Pure: preprocessed images -> {'anomaly_image' (B, H, W), 'anomaly_score' (B,), and any
        further maps the head gives}, averaged over the augment.tta transforms. ``mesh`` (static)
        spreads the head's search over devices."""
        def score(images):
            features = (self.features(params["backbone"], params["adaptor"], images)
                        if self.head.uses_backbone else None)
            return self.head.score(params["head"], images, features, mesh=mesh)

        return mean_over_transforms(score, images, self.augment.tta)

    def output_shapes(self, height: int, width: int, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """What ``infer`` gives for preprocessed images of this size, traced without computing; a size
        the fitted head cannot score (PaDiM's per-position Gaussians fix the grid) is a ConfigError."""
        images = jax.ShapeDtypeStruct((batch_size, height, width, self.preprocess.num_channels), jnp.float32)
        try:
            return jax.eval_shape(self.infer, jax.tree.map(jnp.asarray, self.params), images)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{self.description} cannot score {height}x{width} (height x width) inputs: its "
                              f"fitted state is for {self.preprocess.height}x{self.preprocess.width} "
                              f"({str(error).splitlines()[0]})") from None

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
        if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
            raise ConfigError(f"model parameter 'batch_size' must be an integer >= 1, got {batch_size!r}")
        batch_size = int(batch_size or self.batch_size)
        mesh = self.mesh if device is None else data_mesh() if device == "all" else None
        if mesh is not None and batch_size % mesh_size(mesh):
            raise ConfigError(f"model parameter 'batch_size' ({batch_size}) must be a multiple of the "
                              f"{mesh_size(mesh)} devices of device='all'")
        self.batch_size = batch_size
        if thresholds is not None:
            self.thresholds = checked_thresholds(thresholds)
        if device is not None and mesh is None:
            self.device = device if isinstance(device, jax.Device) else _device(device)
        self.mesh = mesh

    # ---- fit and score on datasets ----------------------------------------------------------
    def fit(self, dataset: DLDataset, split: str = "train", *, train: TrainConfig | None = None,
            validation_split: str | None = "validation", cache_dir: str | None = None,
            progress: bool = True) -> dict[str, Any]:
        """One streamed pass over ``split`` (good images only) into the head; returns the fit info.
        ``train`` sets trained heads' epochs (HALCON's parameters); heads that normalise their maps
        on held-out good images also get ``validation_split``'s good images."""
        if any(s.anomaly_label != "ok" for s in dataset.samples_of(split)):
            raise InputError(f"split '{split}' holds defective ('nok') images; heads train on good images only")
        if self.tiling.enabled and getattr(self.head.config, "border", 0):  # (models fitted before load, warned of)
            raise ConfigError(border_under_tiling(self.head.config.border))
        if self.tiling.enabled:
            return fit_tiled(self, dataset, split, train=train, validation_split=validation_split, progress=progress)
        validation = None
        if self.head.wants_validation and any(s.split == validation_split and s.anomaly_label == "ok"
                                              for s in dataset.samples):
            good_only = [s for s in dataset.samples if s.split != validation_split or s.anomaly_label == "ok"]
            validation = self.feature_batches(dataclasses.replace(dataset, samples=good_only), validation_split,
                                              cache_dir)
        elif self.head.wants_validation and self.augment.fit:
            # the head would hold out some of the augmented rows, whose other transforms it trains on
            raise ConfigError(f"augment.fit = {list(self.augment.fit)} with model.head={self.head.name} needs good "
                              f"images in the '{validation_split}' split: without them the head holds out training "
                              "images for its map normalisation, and their transformed copies would be trained on; "
                              "add a validation split (e.g. dataset.validation_from_train=0.1) or set augment.fit=[]")
        return self.head.fit(self.feature_batches(dataset, split, cache_dir, self.augment.fit), train=train,
                             validation=validation, progress=progress, **self.head.fit_inputs(self))

    def feature_batches(self, dataset: DLDataset, split: str, cache_dir: str | None = None,
                        transforms: Sequence[str] = ()) -> FeatureBatches:
        """Re-iterable batches {'image', 'features', 'valid'} of a split, with their counts known up front;
        with ``transforms`` (augment.fit) each batch also comes once in each transform."""
        params = self._placed({"backbone": self.backbone.params, "adaptor": self.adaptor_params})

        def batches() -> Iterator[dict[str, Any]]:
            for batch in local_batches(dataset, split, self.preprocess, self.batch_size, cache_dir=cache_dir):
                for name in ("identity", *transforms):
                    image = np.ascontiguousarray(transform(batch["image"], name))
                    images = self._placed(image, split_batch=True)
                    yield {"image": image, "valid": self._placed(batch["valid"], split_batch=True),
                           "features": self._features(params["backbone"], params["adaptor"], images)}

        count, batch_size = local_count(len(dataset.samples_of(split))), self.batch_size // jax.process_count()
        # each transform repeats every batch, the last partial one included
        return FeatureBatches(batches, count * (1 + len(transforms)), batch_size,
                              num_batches=-(-count // batch_size) * (1 + len(transforms)))

    def score_split(self, dataset: DLDataset, split: str, *, cache_dir: str | None = None,
                    progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Batches of {'anomaly_image', 'anomaly_score', 'mask', 'label', 'index', 'valid', 'image'}; tiled:
        one image per batch, maps and mask at its ROI-cropped resolution, no 'image'."""
        if self.tiling.enabled:
            yield from score_split_tiled(self, dataset, split, progress)
            return
        params = self._placed(self.params)
        for batch in local_batches(dataset, split, self.preprocess, self.batch_size, cache_dir=cache_dir,
                                   progress=f"score {split}" if progress else None):
            out = self._infer(params, self._placed(batch["image"], split_batch=True), mesh=self.mesh)
            yield gather({**batch, **out})  # several processes: every one gets the whole batch

    # ---- new images ---------------------------------------------------------------------------
    def apply(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Raw images (H, W, C) uint8 -> one HALCON-style result dict per image: 'anomaly_image',
        'anomaly_score' (plus the head's further maps), and with thresholds 'anomaly_class',
        'anomaly_class_id', 'anomaly_region'. Images are preprocessed one batch at a time."""
        if self.tiling.enabled:  # maps at each image's ROI-cropped size
            return self._classified(apply_tiled(self, checked_images(images)))
        params = self._placed_params()

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:  # compiled once per batch shape (see pad)
            return jax.device_get(self._infer(params, self._placed(batch, split_batch=True), mesh=self.mesh))

        # a mesh splits every batch over its devices: batch_size is a multiple of their count, a bucket may not be
        return apply_in_batches(images, self.preprocess, self.batch_size, run, self.thresholds,
                                pad="batch" if self.mesh is not None else "bucket")

    def _classified(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return classified(results, self.thresholds)

    def _placed_params(self):
        """self.params on the model's device(s), placed once and reused while the model keeps the same
        arrays, device and mesh: placing them copies the head state (PaDiM's whitening: 40 MiB), which
        cost more than PaDiM's inference in an apply of one image. The cache holds the source arrays, so
        their ids cannot be reused while it stands; arrays are replaced, never changed in place."""
        sources = jax.tree.leaves((self.backbone.params, self.adaptor_params, self.head.state))
        key = (self.device, self.mesh, tuple(map(id, sources)))
        cached = getattr(self, "_params_cache", None)
        if cached is None or cached[0] != key:
            cached = self._params_cache = (key, sources, self._placed(self.params))
        return cached[2]

    def _placed(self, tree, split_batch: bool = False):
        """On self.device; or with a mesh: batches split over its devices, anything else replicated."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return shard_batch(self.mesh, tree) if split_batch else replicate(self.mesh, tree)


def border_under_tiling(border: int) -> str:
    return (f"model.head.border = {border} needs tiling off: the head sets the cells at each tile's edge to 0, so "
            "every seam inside the image would be blind; set model.head.border=0 (the tiles' blended overlap "
            "weights their edges down) or tiling=off")


def _device(name: str) -> jax.Device:
    """'cpu', 'gpu', 'cuda:1' -> that jax.Device."""
    platform, _, index = str(name).partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, ValueError, IndexError):
        available = [f"{d.platform}:{i}" for i, d in enumerate(jax.devices())]
        raise ConfigError(f"model parameter 'device' {name!r} is not available here; available: {available}") from None


