"""A fitted model as one self-contained directory, and its inference function as StableHLO.

Layout of an artifact directory (``save_model`` / HALCON's ``write_dl_model``)::

    manifest.json          format version, anomax version, sha256 of every other file
    model.json             backbone (name, taps, width, published weights' name and sha256),
                           adaptor config, head name and hyperparameters, preprocess params,
                           thresholds (the chosen pair and every estimate), batch size
    config.json            the full resolved config the caller passed (or null)
    backbone.safetensors   backbone parameters (stored even for published weights: loads offline)
    adaptor.safetensors    feature-adaptor parameters (projection), may be empty
    head.safetensors       head state (Gaussians, memory bank, student weights)
    domain<.ext>           the preprocess domain mask, when the domain is a mask file

Arrays are safetensors with '/'-joined pytree paths as keys, metadata is JSON: nothing is
unpickled. Writes are atomic (a temporary sibling directory renamed into place), and
``load_model`` checks every checksum before reading a byte of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from anomax.errors import ArtifactError, ConfigError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.json", "config.json", "backbone.safetensors", "adaptor.safetensors", "head.safetensors")


# ---- pytrees <-> flat arrays ------------------------------------------------------------------
def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unsupported pytree key {key!r}")


def flatten_arrays(tree) -> dict[str, np.ndarray]:
    """A pytree of arrays -> {'a/b/0': numpy array}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(_key_name, path)): np.asarray(leaf) for path, leaf in leaves}


def unflatten_arrays(like, arrays: Mapping[str, np.ndarray], file: Path):
    """The pytree of ``like`` (arrays or shape structs) filled with ``arrays``; keys and shapes must match."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = ["/".join(map(_key_name, path)) for path, _ in leaves]
    missing, extra = sorted(set(keys) - set(arrays)), sorted(set(arrays) - set(keys))
    if missing or extra:
        raise ArtifactError(f"{file}: arrays do not fit the network (missing {missing[:5]}, unexpected {extra[:5]}); "
                            f"the artifact was written by an incompatible anomax — save the model again")
    for key, (_, leaf) in zip(keys, leaves):
        if tuple(arrays[key].shape) != tuple(leaf.shape):
            raise ArtifactError(f"{file}: '{key}' has shape {arrays[key].shape}, the network needs {leaf.shape}; "
                                f"save the model again with this anomax")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[key]) for key in keys])


# ---- files -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not readable JSON ({error}); the artifact is corrupt — save the model again")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{path} is not a complete safetensors file ({error}); the artifact is truncated "
                            f"or corrupt — save the model again")


# ---- save ----------------------------------------------------------------------------------------
def _backbone_record(backbone) -> dict[str, Any]:
    from anomax.registry import BACKBONES

    weights = BACKBONES.get(backbone.name).weights
    published = (weights is not None and backbone.weights_sha256 is not None and weights.sha256_prefix is not None
                 and backbone.weights_sha256.startswith(weights.sha256_prefix))
    return {"name": backbone.name, "taps": list(backbone.taps), "width_multiplier": backbone.width_multiplier,
            "weights_sha256": backbone.weights_sha256, "weights_file": weights.file_name if published else None}


def save_model(model, path: str | os.PathLike, *, thresholds=None, config: Mapping[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` (an AnomalyModel with a fitted head) as an artifact directory at ``path``.

    thresholds: the AnomalyThresholds the model's pair was chosen from (kept for reference);
    config: the full resolved run config (JSON-able). Returns ``path``.
    """
    target = Path(path).absolute()
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"save_model: config must be plain JSON data ({error}); pass "
                          f"OmegaConf.to_container(cfg, resolve=True)") from None
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; pass overwrite=True to replace it")
    preprocess = model.preprocess.to_dict()
    domain_file = None
    if isinstance(model.preprocess.domain, str):  # a mask file: copied in, so the artifact loads anywhere
        domain_file = "domain" + Path(model.preprocess.domain).suffix
        preprocess["domain"] = domain_file
    record = {
        "backbone": _backbone_record(model.backbone),
        "adaptor": model.adaptor.config,
        "head": {"name": model.head.name, "hyperparams": model.head.hyperparams},
        "preprocess": preprocess,
        "thresholds": {**{key: float(value) for key, value in model.thresholds.items()},
                       "estimates": None if thresholds is None else thresholds.to_dict()},
        "batch_size": model.batch_size,
    }
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    try:
        _write_json(staging / "model.json", record)
        _write_json(staging / "config.json", config)
        save_file(flatten_arrays(model.backbone.params), staging / "backbone.safetensors")
        save_file(flatten_arrays(model.adaptor_params), staging / "adaptor.safetensors")
        save_file(flatten_arrays(model.head.state), staging / "head.safetensors")
        if domain_file is not None:
            shutil.copyfile(model.preprocess.domain, staging / domain_file)
        files = sorted(p.name for p in staging.iterdir())
        from anomax import __version__

        _write_json(staging / MANIFEST, {"format_version": FORMAT_VERSION, "anomax_version": __version__,
                                         "files": {name: _sha256(staging / name) for name in files}})
        for name in files + [MANIFEST]:
            _fsync(staging / name)
        _fsync(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target is moved aside first and removed after."""
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        target.rename(previous)
    staging.rename(target)
    _fsync(target.parent)
    if previous is not None:
        shutil.rmtree(previous)


# ---- load ----------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Verify the artifact at ``path`` and return its metadata: model.json's content plus
    'config', 'format_version' and 'anomax_version'."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} is not an anomax model artifact: {MANIFEST} is missing")
    manifest = _read_json(manifest_path)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{manifest_path} lacks 'format_version' or 'files'; the artifact is corrupt")
    if version > FORMAT_VERSION:
        from anomax import __version__

        raise ArtifactError(f"{root} has artifact format {version} (written by anomax "
                            f"{manifest.get('anomax_version')}); anomax {__version__} reads formats up to "
                            f"{FORMAT_VERSION} — upgrade anomax (pip install -U anomax)")
    unlisted = [name for name in REQUIRED_FILES if name not in manifest["files"]]
    if unlisted:
        raise ArtifactError(f"{manifest_path} does not list {unlisted}; the artifact is incomplete — save it again")
    for name, checksum in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing from the artifact; copy the whole directory or save it again")
        if _sha256(file) != checksum:
            raise ArtifactError(f"{file} does not match its sha256 in {MANIFEST}: it is corrupt, truncated or "
                                f"was modified — restore it or save the model again")
    return {**_read_json(root / "model.json"), "config": _read_json(root / "config.json"),
            "format_version": version, "anomax_version": manifest.get("anomax_version")}


def load_model(path: str | os.PathLike):
    """The AnomalyModel saved at ``path``: no training data, no Hydra, no network access."""
    from anomax.backbones import build_backbone
    from anomax.features import FeatureAdaptor
    from anomax.model import AnomalyModel
    from anomax.preprocess.params import PreprocessParams
    from anomax.registry import HEADS

    root = Path(path).absolute()
    meta = read_metadata(root)
    spec = meta["backbone"]
    # Random init is numpy (no compilation); only the structure is used, the stored arrays replace it.
    backbone = build_backbone(spec["name"], taps=spec["taps"], pretrained=None,
                              width_multiplier=spec["width_multiplier"])
    backbone.params = unflatten_arrays(backbone.params, _read_arrays(root / "backbone.safetensors"),
                                       root / "backbone.safetensors")
    backbone.weights_sha256 = spec["weights_sha256"]
    adaptor = FeatureAdaptor(**meta["adaptor"])
    adaptor_params = {key: jnp.asarray(value) for key, value in
                      _read_arrays(root / "adaptor.safetensors").items()}
    head = HEADS.get(meta["head"]["name"]).from_state(meta["head"]["hyperparams"],
                                                     _read_arrays(root / "head.safetensors"))
    preprocess = dict(meta["preprocess"])
    if isinstance(preprocess.get("domain"), str):
        preprocess["domain"] = str(root / preprocess["domain"])
    thresholds = {key: value for key, value in meta["thresholds"].items() if key != "estimates"}
    return AnomalyModel(PreprocessParams.from_dict(preprocess), backbone, adaptor, head, adaptor_params=adaptor_params,
                        thresholds=thresholds, batch_size=meta["batch_size"])


# HALCON's names.
write_dl_model = save_model
read_dl_model = load_model


# ---- serialized inference function ----------------------------------------------------------------
EXPORTED_FUNCTION = "__function__"  # the npz member holding the serialized jax.export.Exported


def export_inference(model, path: str | os.PathLike, batch_size: int, height: int, width: int, *,
                     platforms: Sequence[str] | None = None) -> Path:
    """Serialize ``model``'s inference (backbone -> adaptor -> head -> map and score) as StableHLO for
    preprocessed float32 images (batch_size, height, width, channels), into one ``.npz`` file.

    The file holds the serialized ``jax.export`` function under '__function__' and its parameters
    as arrays ('/'-joined keys): parameters are arguments, not constants, so XLA compiles the same
    program as the library (constant folding would change the last bits) and the function stays
    small. Loading needs only numpy and jax. Preprocessing (resize, normalisation, see
    ``model.preprocess``) stays with the caller. ``platforms`` e.g. ('cpu', 'cuda'); default: this one.
    """
    from jax import export

    params = model.params
    flat = flatten_arrays(params)

    def infer(flat_params, images):
        return model.infer(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                                        [flat_params[key] for key in flat]), images)

    images = jax.ShapeDtypeStruct((batch_size, height, width, model.preprocess.num_channels), np.float32)
    shapes = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in flat.items()}
    exported = export.export(jax.jit(infer), platforms=platforms)(shapes, images)
    function = np.frombuffer(exported.serialize(), np.uint8)
    target = Path(path)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(staging, "wb") as file:
            np.savez(file, **{EXPORTED_FUNCTION: function}, **flat)
        _fsync(staging)
        staging.replace(target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target


def load_exported(path: str | os.PathLike) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The function written by ``export_inference``: images -> {'anomaly_image', 'anomaly_score'}."""
    from jax import export

    try:
        with np.load(path, allow_pickle=False) as bundle:
            arrays = {key: bundle[key] for key in bundle.files}
        function = export.deserialize(bytearray(arrays.pop(EXPORTED_FUNCTION).tobytes()))
    except OSError as error:
        raise ArtifactError(f"cannot read the exported function {path}: {error}")
    except Exception as error:  # zip, flatbuffer and MLIR errors have no common type
        raise ArtifactError(f"{path} is not an exported anomax function ({error}); export it again")
    params = {key: jnp.asarray(value) for key, value in arrays.items()}
    return lambda images: function.call(params, images)
