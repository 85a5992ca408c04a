"""EfficientAD (Batzner et al., WACV 2024): a local student-teacher pair plus a global autoencoder.

Three small networks on the image, none of them the big backbone at inference (but see ``teacher``):

- the teacher, a patch description network (PDN) distilled from the frozen backbone's
  adapted features on the training images (and, optionally, a folder of generic images); or,
  with ``teacher='backbone'``, those features themselves (the backbone then runs at inference);
- the student, the same PDN with twice the output channels. Its first half regresses the
  teacher with the hard-feature loss (only the errors above their q-quantile count), so it
  stays poor wherever the image is unlike the training set: the local map. With generic
  images given (``distill_images``), the student is also pushed towards zero output on them
  (the paper's penalty on pretraining images), so it does not learn to imitate the teacher
  on images unlike the training set;
- the autoencoder, which rebuilds the teacher's output from the whole image through a small
  latent vector, so it knows the typical layout but not the detail. The student's second
  half learns to predict the autoencoder; where they disagree a part is missing, extra or
  swapped though each patch looks normal: the global map (HALCON's global context).

Each map is normalised so that its 0.9 quantile on good validation images is 0 and its 0.995
quantile is 0.1; the combined map is their mean (the paper's) or, with ``combine='max'``, their
pointwise maximum, which does not halve a defect that only one branch sees. The image score is
the combined map's maximum (the paper's) or, with ``image_score='branches'``, each branch read where
its evidence lies: the local map's maximum (a defect is a spot) and the global map's mean (a broken
rule moves the whole reconstruction), each standardised on the same good images, and their maximum.

Several processes (anomax.distributed): each reads its own part of every split; every process
then holds all of it (gathered in the split's order), both phases train data-parallel over the
global mesh (each step's batch split over every device, gradients summed across processes), and
the teacher statistics and map quantiles come from all images, so every process ends with the
same state as one process would.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anomax import training
from anomax.distributed import part
from anomax.errors import ArtifactError, ConfigError, DatasetError, InputError
from anomax.heads._base import Head, HeadConfig, stored_state
from anomax.heads._pdn import PDN, AutoEncoder
from anomax.inference import padded
from anomax.parallel import data_mesh, data_parallel, replicate
from anomax.preprocess.params import PreprocessParams, pixel_scale
from anomax.registry import HEADS
from anomax.settings import setting
from anomax.training import TrainConfig


STRIDES = (4, 8, 16)
BRANCHES = ("local", "global")
# EfficientAD's map normalisation: these validation quantiles go to 0 and 0.1.
QUANTILES = (0.9, 0.995)


@dataclasses.dataclass(frozen=True)
class EfficientADConfig(HeadConfig):
    """size: the PDN of the paper, 'small' or 'medium'. width: the PDN's first-layer channels
    (the paper's 128; cost grows with width²). ae_width, latent: the autoencoder's first-layer
    channels and bottleneck length. hard_quantile: q of the hard-feature loss.
    distill_epochs, distill_learning_rate: the teacher's own budget (Adam, cosine decay).
    distill_images: a folder of generic images the teacher also learns from (null: the
    training images only). generic_penalty: weight of the student's penalty on those images,
    the mean of its squared teacher-channel outputs there (EfficientAD's L_ST = L_hard + L_P;
    0: off; nothing without distill_images). ae_jitter: EfficientAD's augmentation of the global branch:
    each step the autoencoder and the student's extra channels see every training image with its
    brightness, contrast or saturation (one at random) scaled by a factor in [1 - ae_jitter,
    1 + ae_jitter], and the autoencoder regresses the teacher's output on that image (0: off, the
    unchanged image). holdout: fraction of the training images kept back for the map
    quantiles when the model has no validation split. border: patch-grid cells at each edge of
    the local and global maps set to 0: the PDN's zero padding makes its edge outputs unreliable
    (the paper's unpadded PDN gives none there and zero-pads its maps); the map quantiles come from
    the cells inside it, and a border that leaves none is refused. combine: how the two
    normalised maps make the combined one: 'mean' (the paper's) or 'max' (pointwise; a missing
    part that only the global branch sees is not averaged with a local map at chance there).
    teacher: 'pdn', the distilled PDN (the paper's; apply runs no backbone), or 'backbone': the
    backbone's standardised adapted features themselves, undistilled (as in student-teacher
    feature matching, STPM): the student and the autoencoder regress what the backbone sees, not a
    small network's copy of it, and apply runs the backbone. No distillation then; generic
    images (``distill_images``) only feed the student's penalty (none with generic_penalty 0), and
    ae_jitter is not available (its target is the teacher's output on the jittered copy).
    image_score: 'max', the combined map's maximum (the paper's), or 'branches': the local map's
    maximum and the global map's mean (a missing or extra part leaves no single peak; the
    autoencoder's error spreads over the image), each standardised with its mean and standard
    deviation on the good images the quantiles come from, and the larger of the two; the
    branch scores are then those two readings. Untiled models only: tiling reads every
    image's score from its stitched map."""

    teacher: Literal["pdn", "backbone"] = "pdn"
    size: Literal["small", "medium"] = "small"
    width: int = setting(16, ge=1)
    ae_width: int = setting(16, ge=1)
    latent: int = setting(64, ge=1)
    hard_quantile: float = setting(0.999, ge=0, lt=1)
    distill_epochs: int = setting(10, ge=1)
    distill_learning_rate: float = setting(0.002, gt=0)
    distill_images: str | None = None
    generic_penalty: float = setting(1.0, ge=0)
    ae_jitter: float = setting(0.0, ge=0, lt=1)
    holdout: float = setting(0.1, gt=0, lt=1)
    border: int = setting(1, ge=0)
    combine: Literal["mean", "max"] = "mean"
    image_score: Literal["max", "branches"] = "max"

    def check(self) -> None:
        if self.distill_images is not None and not self.distill_images.strip():  # e.g. an empty environment variable
            self.fail("distill_images", "a folder of images, or null for none (an empty string would silently "
                                        "train without the generic images)")
        if self.teacher == "backbone" and self.ae_jitter:
            self.fail("ae_jitter", "needs model.head.teacher=pdn: the jittered copy's target is the teacher's "
                                   "output on it, and a backbone teacher is not part of the head; set ae_jitter=0")


# ---- losses and normalisation (pure, tested against numpy) --------------------------------

def quantile(values: jax.Array, q: float) -> jax.Array:
    """numpy's default (linear) q-quantile of all elements, exactly: the two order statistics it
    interpolates come from a bisection (``order_statistics``). On CPU 8-20x faster than a
    top-k or jnp.quantile, which both sort (experiments/efficientad.md)."""
    flat = values.reshape(-1)
    position = q * (flat.size - 1)
    low = math.floor(position)
    below, above = order_statistics(flat, (low, min(low + 1, flat.size - 1)))
    return below + (position - low) * (above - below)


def order_statistics(values: jax.Array, ranks: tuple[int, ...]) -> jax.Array:
    """The ranks-th smallest (0-based) of the float32 ``values`` (1-D), exactly, in 32 counting
    passes: a bisection over the floats' bit patterns, mapped to int32 keys that sort as the
    floats do (negative floats: magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
    flip = jnp.int32(0x7FFFFFFF)
    keys = jnp.where(bits < 0, bits ^ flip, bits)
    need = jnp.asarray(ranks, jnp.int32) + 1

    def halve(_, bounds):  # the answer's key stays in [low, high]
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
        enough = jnp.sum(keys[:, None] <= middle, axis=0) >= need
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    start = (jnp.full(need.shape, jnp.iinfo(jnp.int32).min), jnp.full(need.shape, jnp.iinfo(jnp.int32).max))
    _, key = jax.lax.fori_loop(0, 32, halve, start)
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ flip, key), jnp.float32)


def hard_feature_loss(squared_errors: jax.Array, q: float) -> jax.Array:
    """EfficientAD's L_hard: the mean of the elements of ``squared_errors`` at or above their
    q-quantile (q=0 is the plain mean)."""
    hard = squared_errors >= quantile(squared_errors, q)
    return jnp.sum(jnp.where(hard, squared_errors, 0.0)) / jnp.sum(hard)


def hard_feature_errors(squared_errors: jax.Array, q: float) -> jax.Array:
    """(B, h, w, C) -> (B, h, w): each position's share of L_hard, scaled so that their mean
    over all positions is exactly ``hard_feature_loss`` (the training loop averages positions)."""
    hard = squared_errors >= quantile(squared_errors, q)
    positions = math.prod(squared_errors.shape[:-1])
    return jnp.sum(jnp.where(hard, squared_errors, 0.0), axis=-1) * (positions / jnp.sum(hard))


def map_quantiles(maps: np.ndarray) -> np.ndarray:
    """The (0.9, 0.995) quantiles of all values of good images' maps, float32 (2,)."""
    return np.quantile(np.asarray(maps, np.float64), QUANTILES).astype(np.float32)


def normalise(maps: jax.Array, quantiles: jax.Array) -> jax.Array:
    """Affine: quantiles[0] -> 0, quantiles[1] -> 0.1."""
    low, high = quantiles[0], quantiles[1]
    return 0.1 * (maps - low) / jnp.maximum(high - low, 1e-12)


def colour_jitter(key: jax.Array, images: jax.Array, strength: float, scale=1.0, offset=0.0) -> jax.Array:
    """EfficientAD's autoencoder augmentation of model inputs (B, H, W, C) whose pixels are
    ``(images - offset) / scale`` in [0, 1] (anomax.preprocess.params.pixel_scale): per image one
    of brightness, contrast or saturation (torchvision's ColorJitter definitions) with a factor
    drawn from [1 - strength, 1 + strength], on the pixels clipped to [0, 1]. Grayscale: the luma
    of RGB, the channel mean otherwise (one channel: saturation changes nothing)."""
    kind_key, factor_key = jax.random.split(key)
    batch = images.shape[0]
    kind = jax.random.randint(kind_key, (batch, 1, 1, 1), 0, 3)
    factor = jax.random.uniform(factor_key, (batch, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    pixels = (images - offset) / scale
    if pixels.shape[-1] == 3:
        gray = jnp.sum(pixels * jnp.asarray([0.299, 0.587, 0.114], pixels.dtype), axis=-1, keepdims=True)
    else:
        gray = jnp.mean(pixels, axis=-1, keepdims=True)
    towards = jnp.where(kind == 1, jnp.mean(gray, axis=(1, 2, 3), keepdims=True), gray)  # contrast | saturation
    blended = jnp.where(kind == 0, factor * pixels, factor * pixels + (1 - factor) * towards)
    return jnp.clip(blended, 0.0, 1.0) * scale + offset


# ---- the head -------------------------------------------------------------------------------

class _Layout:
    """One network's structure without weights: graphdef, pytree layout, flat state keys."""

    def __init__(self, prefix: str, make):
        self.prefix, self.make = prefix, make  # make(rngs) -> the network
        self.graphdef, params = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
        self.treedef = jax.tree.structure(params)
        # to_flat_state walks the state in the same sorted order as jax.tree.leaves.
        self.keys = [f"{prefix}/" + "/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)]

    def init(self, seed: int):
        return nnx.split(self.make(nnx.Rngs(seed)))[1]

    def flatten(self, params) -> dict[str, np.ndarray]:
        return {key: np.asarray(value) for key, value in zip(self.keys, jax.tree.leaves(params))}

    def params(self, state: Mapping[str, Any]):
        return jax.tree.unflatten(self.treedef, [state[key] for key in self.keys])

    def apply(self, params, images: jax.Array) -> jax.Array:
        return nnx.merge(self.graphdef, params)(images)


@HEADS.register("efficientad")
class EfficientAD(Head):
    name = "efficientad"
    trained = True
    Config = EfficientADConfig
    wants_validation = True  # map quantiles come from good validation images

    @property
    def uses_backbone(self) -> bool:  # type: ignore[override]
        """The distilled teacher replaces the backbone at inference; teacher='backbone' is the backbone."""
        return self.config.teacher == "backbone"

    @property
    def _reads_generic(self) -> bool:
        """Whether fit needs the generic images: the PDN teacher learns from them, the student's penalty
        uses them; a backbone teacher with no penalty has no use for them."""
        config = self.config
        return bool(config.distill_images) and (config.teacher == "pdn" or config.generic_penalty > 0)

    # ---- structure ----------------------------------------------------------------------
    def _build(self, geometry: np.ndarray) -> None:
        """Networks for images (H, W, C) and teacher features of D channels at stride s."""
        height, width, channels, dim, stride = (int(v) for v in geometry)
        grid = (height // stride, width // stride)
        config = self.config
        if 2 * config.border >= min(grid):
            raise ConfigError(f"model.head.border = {config.border} zeroes every cell of the {grid[0]}x{grid[1]} "
                              f"patch grid ({height}x{width} images at stride {stride}); lower it or use larger images")
        pdn = dict(size=config.size, width=config.width, stride=stride)
        self._geometry = np.asarray(geometry, np.int32)
        self._teacher = (_Layout("teacher", lambda rngs: PDN(channels, dim, **pdn, rngs=rngs))
                         if config.teacher == "pdn" else None)
        self._student = _Layout("student", lambda rngs: PDN(channels, 2 * dim, **pdn, rngs=rngs))
        self._ae = _Layout("autoencoder", lambda rngs: AutoEncoder(channels, dim, image_hw=(height, width),
                                                                   grid_hw=grid, width=config.ae_width,
                                                                   latent=config.latent, rngs=rngs))

    @property
    def state_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        by_branch = ("score_stats",) if self.config.image_score == "branches" else ()
        teacher = self._teacher.keys if self._teacher is not None else ()
        return (*teacher, *self._student.keys, *self._ae.keys, "teacher_mean", "teacher_std",
                "quantiles_local", "quantiles_global", *by_branch, "geometry")

    @classmethod
    def from_state(cls, hyperparams: Mapping[str, Any], state: Mapping[str, Any]) -> EfficientAD:
        head = cls(cls.Config.from_dict(hyperparams))
        if "geometry" not in state:
            raise ArtifactError("the efficientad head state lacks 'geometry'; the artifact is incomplete — re-train")
        head._build(np.asarray(state["geometry"]))
        head._state = stored_state(cls.name, state, head.state_keys, integer_keys=("geometry",))
        return head

    # ---- maps ---------------------------------------------------------------------------
    def _teacher_output(self, state: Mapping[str, Any], images: jax.Array,
                        features: jax.Array | None = None) -> jax.Array:
        """The teacher's (B, h, w, D) output (the PDN's on ``images``, or the backbone's ``features``),
        standardised with its training images' statistics."""
        teacher = features if self._teacher is None else self._teacher.apply(self._teacher.params(state), images)
        return (teacher - state["teacher_mean"]) / state["teacher_std"]

    def _raw_maps(self, state: Mapping[str, Any], images: jax.Array,
                  features: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Unnormalised (B, h, w) local and global maps; ``features``: the backbone teacher's."""
        if self._teacher is None and features is None:
            raise InputError("efficientad with teacher='backbone' scores images with their backbone features; "
                             "got none")
        teacher = self._teacher_output(state, images, features)
        student = self._student.apply(self._student.params(state), images)
        autoencoder = self._ae.apply(self._ae.params(state), images)
        dim = teacher.shape[-1]
        local = jnp.mean(jnp.square(teacher - student[..., :dim]), axis=-1)
        global_ = jnp.mean(jnp.square(autoencoder - student[..., dim:]), axis=-1)
        border = self.config.border
        if border:
            rows, cols = local.shape[1:]
            inside = np.zeros((rows, cols), bool)
            inside[border:rows - border, border:cols - border] = True
            local, global_ = jnp.where(inside, local, 0.0), jnp.where(inside, global_, 0.0)
        return local, global_

    def score(self, state: Mapping[str, jax.Array], images: jax.Array, features: jax.Array | None = None,
              mesh=None) -> dict[str, jax.Array]:
        """Pure: combined, local and global maps (B, H, W) and their image scores (``image_score``)."""
        out = self._maps(state, *self._raw_maps(state, images, features), images.shape[1:3])
        if self.config.image_score == "branches":
            branch_scores = jnp.stack([out["anomaly_score_local"], out["anomaly_score_global"]], axis=-1)
            mean, std = state["score_stats"][0], state["score_stats"][1]
            out["anomaly_score"] = jnp.max((branch_scores - mean) / std, axis=-1)
        return out

    def _maps(self, state: Mapping[str, Any], local: jax.Array, global_: jax.Array,
              out_hw: tuple[int, int]) -> dict[str, jax.Array]:
        """Raw (B, h, w) maps -> the normalised, upsampled, smoothed combined / local / global maps
        and each one's maximum; with image_score='branches' the global map's score is its mean."""
        local = normalise(local, state["quantiles_local"])
        global_ = normalise(global_, state["quantiles_global"])
        combined = jnp.maximum(local, global_) if self.config.combine == "max" else 0.5 * (local + global_)
        out = {}
        for suffix, patch_scores in (("", combined), ("_local", local), ("_global", global_)):
            anomaly_image = self.anomaly_map(patch_scores, out_hw)
            out[f"anomaly_image{suffix}"] = anomaly_image
            out[f"anomaly_score{suffix}"] = anomaly_image.max(axis=(1, 2))
        if self.config.image_score == "branches":
            out["anomaly_score_global"] = out["anomaly_image_global"].mean(axis=(1, 2))
        return out

    # ---- fit ----------------------------------------------------------------------------
    def fit_inputs(self, model) -> dict[str, Any]:
        """The model's preprocessing (the colour jitter works on pixels) and the generic images of
        ``distill_images`` through its preprocessing, and through its backbone when the PDN teacher
        learns from them (the student's penalty needs only the images)."""
        config = self.config
        if not self._reads_generic:
            return {"preprocess": model.preprocess}
        return {"preprocess": model.preprocess,
                "distill": distillation_batches(model, config.distill_images, features=config.teacher == "pdn")}

    def fit(self, batches: Iterable[Mapping[str, Any]], *, train: TrainConfig | None = None,
            validation: Iterable[Mapping[str, Any]] | None = None,
            distill: Iterable[Mapping[str, Any]] | None = None, preprocess: PreprocessParams | None = None,
            progress: bool = False) -> dict[str, Any]:
        """Distil the teacher, train student and autoencoder (``train``: HALCON's parameters),
        then take the map quantiles on ``validation`` (good images) or, without it, on a
        held-out part of the training images. ``distill``: extra batches {'image', 'features'}
        of generic images (the model reads ``distill_images`` into them) for the teacher only.
        ``preprocess``: how the images were made (PreprocessParams), needed by the colour jitter."""
        config = self.config
        train = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(train)  # a mapping, as student takes
        if self._reads_generic and distill is None:
            raise ConfigError(f"model.head.distill_images = {config.distill_images!r} but fit() got no distillation "
                              "batches: pass distill=distillation_batches(model, folder) (AnomalyModel.fit does)")
        if config.ae_jitter and preprocess is None:
            raise ConfigError(f"model.head.ae_jitter = {config.ae_jitter} jitters pixels, but fit() got no preprocess: "
                              "pass preprocess=<the images' PreprocessParams> (AnomalyModel.fit does) or set ae_jitter=0")
        images, features = self.in_memory(batches, "the training split", progress)
        height, width = images.shape[1:3]
        stride = height // features.shape[1]
        if stride not in STRIDES or features.shape[1:3] != (height // stride, width // stride):
            raise InputError(f"efficientad needs teacher features {STRIDES} times smaller than the image, got "
                             f"image {height}x{width} and features {features.shape[1]}x{features.shape[2]}; "
                             "choose adaptor taps of stride 4, 8 or 16 and an image size that is a multiple of it")
        self._build(np.array([height, width, images.shape[3], features.shape[3], stride]))

        if validation is None:
            order = np.random.default_rng(train.seed).permutation(len(images))
            # image_score=branches standardises the branch scores: a standard deviation needs two images
            keep = max(2 if config.image_score == "branches" else 1, round(config.holdout * len(images)))
            if len(images) - keep < 1:
                raise DatasetError(f"efficientad needs at least {keep + 1} training images to hold {keep} out for the "
                                   f"map quantiles, got {len(images)}; add images or a validation split")
            held, order = np.sort(order[:keep]), np.sort(order[keep:])
            val_images, val_features = images[held], features[held] if self.uses_backbone else None
            images, features = images[order], features[order]
            quantile_source = f"{keep} training images held out (no validation split)"
        else:
            val_images, val_features = self.in_memory(validation, "the validation split", progress,
                                                      need_features=self.uses_backbone)
            quantile_source = f"{len(val_images)} validation images"
            self._check_calibration_images(len(val_images))  # now, not after the training

        if self._teacher is None:  # the backbone's features are the teacher's output
            state, teacher_out, distill_info = {}, features, None
            generic = (self.in_memory(distill, "the generic images", progress, need_features=False)[0]
                       if self._reads_generic else None)
        else:
            teacher_params, generic, distill_info = self._distil(images, features, distill, train, progress)
            state = self._teacher.flatten(teacher_params)
            teacher_out = _batched(jax.jit(self._teacher.apply), self._teacher.params(state), images,
                                   train.batch_size)
        state["teacher_mean"] = teacher_out.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        state["teacher_std"] = np.maximum(teacher_out.std(axis=(0, 1, 2), dtype=np.float64), 1e-6).astype(np.float32)
        targets = (teacher_out - state["teacher_mean"]) / state["teacher_std"]
        del teacher_out

        params = {"student": self._student.init(train.seed + 1), "autoencoder": self._ae.init(train.seed + 2)}
        q, penalty = config.hard_quantile, config.generic_penalty if generic is not None else 0.0
        inputs = {"image": images}
        if penalty:
            # each training image comes with one generic image (cycled in a seeded order) for L_P: with fewer
            # training than generic images, the penalty sees only that many (the paper draws one per step;
            # drawing per step would change every recipe's measured numbers)
            order = np.random.default_rng(train.seed).permutation(len(generic))
            inputs["generic"] = generic[np.resize(order, len(images))]

        jitter = config.ae_jitter
        scale, offset = pixel_scale(preprocess) if jitter else (1.0, 0.0)

        def error_fn(params, inputs, targets, key):
            inputs, targets = data_parallel((inputs, targets))  # several processes: split each batch
            images, dim = inputs["image"], targets.shape[-1]
            student = self._student.apply(params["student"], images)
            hard = hard_feature_errors(jnp.square(targets - student[..., :dim]), q)
            if jitter:  # the global branch learns on a jittered copy, against the teacher's output on it
                seen = colour_jitter(key, images, jitter, scale, offset)
                seen_targets = self._teacher_output(state, seen)
                student_global = self._student.apply(params["student"], seen)[..., dim:]
            else:
                seen, seen_targets, student_global = images, targets, student[..., dim:]
            autoencoder = self._ae.apply(params["autoencoder"], seen)
            reconstruction = jnp.mean(jnp.square(seen_targets - autoencoder), axis=-1)
            imitation = jnp.mean(jnp.square(autoencoder - student_global), axis=-1)
            errors = hard + reconstruction + imitation
            if penalty:  # per position, so that the mean over positions is L_P
                on_generic = self._student.apply(params["student"], inputs["generic"])[..., :dim]
                errors = errors + penalty * jnp.mean(jnp.square(on_generic), axis=-1)
            return errors

        params, info = _train(error_fn, params, inputs, targets, train, "train efficientad student+autoencoder",
                              progress)
        state.update(self._student.flatten(params["student"]))
        state.update(self._ae.flatten(params["autoencoder"]))
        state["geometry"] = self._geometry

        self._state = state
        self.calibrate(val_images, train.batch_size, val_features)
        return {**info, "distillation": distill_info, "quantiles_from": quantile_source,
                "num_train_images": len(images), "generic_penalty": penalty, "ae_jitter": jitter}

    def calibrate(self, images: np.ndarray, batch_size: int = 8, features: np.ndarray | None = None) -> None:
        """Set the map quantiles from good images (B, H, W, C), preprocessed (and, with
        teacher='backbone', their adapted ``features``): EfficientAD's normalisation (fit does this on
        the validation or held-out images); with ``image_score='branches'`` also the two branch
        scores' mean and standard deviation there."""
        self._check_calibration_images(len(images))
        state = {**self.state, **{f"quantiles_{branch}": np.zeros(2, np.float32) for branch in BRANCHES}}
        raw = jax.jit(self._raw_maps)
        maps = [raw(state, images[i:i + batch_size], None if features is None else features[i:i + batch_size])
                for i in range(0, len(images), batch_size)]
        # the quantiles of the cells the networks score: the zeroed border ring is not part of the maps'
        # distribution (the paper's unpadded PDN has no cells there)
        inner = slice(self.config.border, -self.config.border or None)
        for index, branch in enumerate(BRANCHES):
            state[f"quantiles_{branch}"] = map_quantiles(np.concatenate([np.asarray(m[index])[:, inner, inner]
                                                                         for m in maps]))
            if not np.isfinite(state[f"quantiles_{branch}"]).all():  # saved, the model would not load
                raise ConfigError(f"efficientad: the {branch} map of the good calibration images is not finite "
                                  f"(quantiles {state[f'quantiles_{branch}'].tolist()}): the networks diverged; "
                                  f"lower train.learning_rate")
        if self.config.image_score == "branches":  # the branch scores of the same raw maps
            read = jax.jit(self._maps, static_argnums=3)
            scores = np.concatenate([np.stack([np.asarray(out["anomaly_score_local"]),
                                               np.asarray(out["anomaly_score_global"])], axis=-1)
                                     for out in (read(state, local, global_, images.shape[1:3])
                                                 for local, global_ in maps)])
            state["score_stats"] = np.stack([scores.mean(0, dtype=np.float64),
                                             np.maximum(scores.std(0, dtype=np.float64), 1e-6)]).astype(np.float32)
        self._state = state

    def _check_calibration_images(self, count: int) -> None:
        if self.config.image_score == "branches" and count < 2:
            raise DatasetError(f"model.head.image_score = branches standardises the branch scores on the good "
                               f"calibration images, which needs at least 2, got {count}; add good validation "
                               f"images or use image_score=max")

    def _distil(self, images: np.ndarray, features: np.ndarray, extra, train: TrainConfig, progress: bool):
        """The teacher regresses the standardised backbone features (training images + extra).
        Returns its params, the extra (generic) images or None, and the training info."""
        more_images = None
        if extra is not None:
            more_images, more_features = self.in_memory(extra, "the distillation images", progress)
            if more_images.shape[1:] != images.shape[1:] or more_features.shape[1:] != features.shape[1:]:
                raise InputError(f"efficientad: distillation images {more_images.shape[1:]} / features "
                                 f"{more_features.shape[1:]} differ from the training ones {images.shape[1:]} / "
                                 f"{features.shape[1:]}; preprocess them the same way")
            images, features = np.concatenate([images, more_images]), np.concatenate([features, more_features])
        mean = features.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
        std = np.maximum(features.std(axis=(0, 1, 2), dtype=np.float64), 1e-6).astype(np.float32)
        targets = (features - mean) / std

        def error_fn(params, images, targets, key):
            images, targets = data_parallel((images, targets))  # several processes: split each batch
            return jnp.mean(jnp.square(self._teacher.apply(params, images) - targets), axis=-1)

        config = dataclasses.replace(train, max_num_epochs=self.config.distill_epochs, error_threshold=0.0,
                                     domain_ratio=1.0, regularization_noise=0.0, optimizer="adam",
                                     learning_rate=self.config.distill_learning_rate, schedule="cosine")
        params, info = _train(error_fn, self._teacher.init(train.seed), images, targets, config,
                              "distil efficientad teacher", progress, rate_key="model.head.distill_learning_rate")
        info["num_images"] = len(images)
        return params, more_images, info


def distillation_batches(model, folder: str, *, features: bool = True) -> Iterable[dict[str, Any]]:
    """Batches {'image', 'features', 'valid'} of the images under ``folder`` (recursively), put
    through ``model``'s preprocessing, backbone and adaptor (``features=False``: preprocessing only,
    no 'features'): what ``fit(distill=...)`` takes for the head config's ``distill_images``. The
    generic images are not the part, so the region of interest is not applied to them; with tiling
    the teacher learns from tiles, so they come at the tile size. Several processes: each reads its
    own part of the files, in batches of ``batch_size // process_count``, and all yield the same
    number of batches. The folder is listed and every file's header read when this is called, so a
    wrong folder fails before the training split is read, not when the batches are."""
    from anomax.data.images import IMAGE_SUFFIXES, image_shape, list_files

    key = f"model.head.distill_images = {folder!r}"
    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: {'not a folder' if Path(folder).exists() else 'no such folder'}; point it "
                          f"to a folder of images or set it to null")
    files = list_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{key}: no images found there; point it to a folder of images "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))}) or set it to null")
    for file in files:
        image_shape(file)  # an unreadable one is named now
    return _distillation_batches(model, files, features)


def _distillation_batches(model, files: list, features: bool) -> Iterator[dict[str, Any]]:
    from anomax.data.images import read_image
    from anomax.preprocess.params import preprocess_image

    preprocess = model.preprocess.replace(domain_handling="full_domain", domain=None)
    if model.tiling.enabled:
        preprocess = preprocess.replace(width=model.tiling.tile_size, height=model.tiling.tile_size)
    params = (model.backbone.params, model.adaptor_params)
    size, mine = model.batch_size // jax.process_count(), files[part(len(files))]
    count = -(-(-(-len(files) // jax.process_count())) // size)  # batches of the largest part
    blank = np.zeros((1, preprocess.height, preprocess.width, preprocess.num_channels), np.float32)
    for start in range(0, count * size, size):
        names = mine[start:start + size]
        # blank: this process's part has run out, the batch is padding only
        chunk = np.stack([preprocess_image(preprocess, read_image(f)) for f in names]) if names else blank
        valid = np.arange(size) < len(names)
        images = padded(chunk, size)
        yield {"image": images, "valid": valid,
               **({"features": np.asarray(model._features(*params, images))} if features else {})}


def _train(error_fn, params, inputs, targets: np.ndarray, config: TrainConfig, desc: str, progress: bool,
           rate_key: str = "train.learning_rate"):
    """training.train; with several processes, on one copy per process of everything the loop reads
    (``error_fn`` splits each batch over the global mesh with data_parallel)."""
    if jax.process_count() > 1:
        params, inputs, targets = replicate(data_mesh(), (params, inputs, targets))
    return training.train(error_fn, params, inputs, targets, config, desc=desc, progress=progress, rate_key=rate_key)


def _batched(fn, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """fn(params, images) over fixed-size chunks (the last padded), so it compiles once."""
    outs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        outs.append(np.asarray(fn(params, padded(chunk, batch_size)))[: len(chunk)])
    return np.concatenate(outs)
