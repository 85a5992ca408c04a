"""A fitted model as one self-contained directory, and its inference function as StableHLO.

Layout of an artifact directory (``save_model`` / HALCON's ``write_dl_model``)::

    manifest.json          "format": "anomax-model", format version, anomax version, sha256 of every other file
    model.json             backbone (name, taps, width, published weights' name and sha256),
                           adaptor config, head name and hyperparameters, preprocess params,
                           thresholds (the chosen pair and every estimate), batch size, tiling settings
    config.json            the full resolved config the caller passed (or null)
    backbone.safetensors   backbone parameters (stored even for published weights: loads offline)
    adaptor.safetensors    feature-adaptor parameters (projection), may be empty
    head.safetensors       head state (Gaussians, memory bank, student weights)
    domain<.ext>           the preprocess domain mask, when the domain is a mask file
    model.onnx             the whole inference as ONNX, when saved with onnx=True (anomax.deploy)

A score ensemble (anomax.ensemble.ScoreEnsemble, format 2) instead holds ensemble.json (member
folders, normalisation statistics, thresholds, batch size), config.json and one folder per member,
member-0/, member-1/, ..., each a one-model artifact with its own manifest; the ensemble's manifest
lists each member folder with the sha256 of that manifest, so every byte is still checked.

Arrays are safetensors with '/'-joined pytree paths as keys, metadata is JSON: nothing is
unpickled. A save writes a staging directory and swaps it into place; it replaces only an
artifact, and the next save or load undoes a swap a kill interrupted. ``load_model`` checks
every checksum before reading a byte, reads only files inside the directory, and validates
model.json like a config: the manifest is a checksum, not a signature.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save

from anomax.errors import ArtifactError, ConfigError, OutputError
from anomax.files import check_output_folder, fsync_path, locked, output_errors, sha256_file, writing
from anomax.settings import is_integer

if TYPE_CHECKING:  # JAX is imported where arrays become a model: a model loaded into an ONNX runtime never needs it
    import jax

log = logging.getLogger("anomax")
FORMAT = "anomax-model"  # the manifest's marker: only a directory that carries it is ever replaced
FORMAT_VERSION = 2  # the newest format this anomax reads: 2 added score ensembles
MODEL_FORMAT_VERSION = 1  # one model is still written as format 1, which older anomax versions read
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"  # optional: the exported inference (anomax.deploy)
REQUIRED_FILES = ("model.json", "config.json", "backbone.safetensors", "adaptor.safetensors", "head.safetensors")
ENSEMBLE_FILES = ("ensemble.json", "config.json")


# ---- pytrees <-> flat arrays ------------------------------------------------------------------
def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unsupported pytree key {key!r}")


def flatten_arrays(tree) -> dict[str, np.ndarray]:
    """A pytree of arrays -> {'a/b/0': numpy array}."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(_key_name, path)): np.asarray(leaf) for path, leaf in leaves}


def unflatten_arrays(like, arrays: Mapping[str, np.ndarray], file: Path):
    """The pytree of ``like`` (arrays or shape structs) filled with ``arrays``; keys, shapes and dtypes
    must match, and floating values be finite."""
    import jax

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
        if arrays[key].dtype != leaf.dtype:
            raise ArtifactError(f"{file}: '{key}' is {arrays[key].dtype}, the network needs {leaf.dtype}; "
                                f"the artifact was modified — save the model again")
        if np.issubdtype(arrays[key].dtype, np.floating) and not np.isfinite(arrays[key]).all():
            raise ArtifactError(f"{file}: '{key}' holds NaN or infinite values; the artifact was modified or "
                                f"the model diverged — save a good model again")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(arrays[key]) for key in keys])


# ---- files -------------------------------------------------------------------------------------
def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def _write_arrays(path: Path, tree) -> None:
    # written by Python, not safetensors.save_file: that creates files 0600, which another account
    # (a service applying the model) could not read; this file gets the permissions the JSON beside it gets
    path.write_bytes(save(flatten_arrays(tree)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not readable JSON ({error}); the artifact is corrupt — save the model again")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors' parse errors, I/O errors, and dtypes numpy lacks (F8) alike
        raise ArtifactError(f"{path} is not a complete safetensors file ({error}); the artifact is truncated "
                            f"or corrupt — save the model again")


def _member(root: Path, name: Any, source: Path, key: str) -> Path:
    """The file ``name`` directly inside the artifact ``root``. A modified manifest or model.json must
    not make the loader read anything else: no directories in the name, no absolute paths, no links
    that leave the artifact."""
    if not isinstance(name, str) or name in ("", "..") or "\0" in name or Path(name).name != name:
        raise ArtifactError(f"{source}: '{key}' names {name!r}, which is not a file name inside the artifact; "
                            f"an artifact only reads its own files — the artifact was modified, save the model again")
    file = root / name
    if file.resolve().parent != root.resolve():
        raise ArtifactError(f"{source}: '{key}' names {file}, a link that leaves the artifact directory; an artifact "
                            f"only reads its own files — copy the file in and save the model again")
    return file


# ---- save ----------------------------------------------------------------------------------------
def _backbone_record(backbone) -> dict[str, Any]:
    from anomax.ensemble import ConcatBackbone
    from anomax.registry import BACKBONES

    if isinstance(backbone, ConcatBackbone):  # its members' parameters are stored under '0/', '1/', ...
        return {"name": "concat", "members": [_backbone_record(member) for member in backbone.members]}
    weights = BACKBONES.get(backbone.name).weights
    published = (weights is not None and backbone.weights_sha256 is not None and weights.sha256_prefix is not None
                 and backbone.weights_sha256.startswith(weights.sha256_prefix))
    return {"name": backbone.name, "taps": list(backbone.taps), "width_multiplier": backbone.width_multiplier,
            "weights_sha256": backbone.weights_sha256, "weights_file": weights.file_name if published else None}


def save_model(model, path: str | os.PathLike, *, thresholds=None, config: Mapping[str, Any] | None = None,
               overwrite: bool = False, onnx: bool = False) -> Path:
    """Write ``model`` (an AnomalyModel with a fitted head, or a normalised ScoreEnsemble of them)
    as an artifact directory at ``path``.

    thresholds: the AnomalyThresholds the model's pair was chosen from (kept for reference);
    config: the full resolved run config (JSON-able). overwrite: replace an existing artifact
    (never anything else: a directory that is not an artifact, or holds other files, is refused).
    onnx: also write the whole inference as model.onnx (anomax.export_onnx; needs anomax[deploy])
    for load_model(..., runtime='onnxruntime' | 'openvino').
    Returns ``path``. OS failures (disk full, permissions) raise OutputError naming ``path``.
    """
    from anomax.deploy.runtimes import refuse_deployed
    from anomax.ensemble import ScoreEnsemble

    refuse_deployed(model, "save_model")
    target = Path(path).absolute()
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"save_model: config must be plain JSON data ({error}); pass "
                          f"OmegaConf.to_container(cfg, resolve=True)") from None
    if thresholds is not None and not model.thresholds:  # the estimates are a record; the pair is what apply uses
        log.warning("save_model: the model has no thresholds set, so it will score without classifying; choose "
                    "from the estimates first, e.g. model.set_params(thresholds={'segmentation': t.segmentation, "
                    "'classification': t.intermediate})")
    ensemble = isinstance(model, ScoreEnsemble)
    if onnx and ensemble:
        raise ConfigError("save_model: onnx=True is not available for a score ensemble; save without onnx and "
                          "apply with the jax runtime")
    if onnx and model.tiling.enabled:  # the ONNX runtimes score whole images, not tiles
        raise ConfigError("save_model: onnx=True is not available for tiled models (tiling.tile_size is set); "
                          "save without onnx and apply with the jax runtime")
    if ensemble and model.stats is None:
        raise ConfigError("save_model: the score ensemble is not normalised; call normalise(dataset) first")
    with output_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(target.parent):  # one save (or recovery) at a time next to the target
            _recover(target)
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise OutputError(f"{target} already exists; pass overwrite=True to replace it")
                _check_replaceable(target)
            staging = _aside(target, "tmp")
            try:
                staging.mkdir()
                if ensemble:
                    _write_ensemble(staging, model, thresholds, config)
                else:
                    _write_model(staging, model, thresholds, config, onnx)
                _write_manifest(staging)
                _swap(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def _thresholds_record(model, thresholds) -> dict[str, Any]:
    """The model's threshold pair, and every estimate it was chosen from (for anomax-evaluate)."""
    return {**{key: float(value) for key, value in model.thresholds.items()},
            "estimates": None if thresholds is None else thresholds.to_dict()}


def _write_model(folder: Path, model, thresholds, config, onnx: bool) -> None:
    """One model's files (all but the manifest) into ``folder``."""
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
        "thresholds": _thresholds_record(model, thresholds),
        "batch_size": model.batch_size,
        "tiling": model.tiling.to_dict(),
        "augment": model.augment.to_dict(),
    }
    _write_json(folder / "model.json", record)
    _write_json(folder / "config.json", config)
    _write_arrays(folder / "backbone.safetensors", model.backbone.params)
    _write_arrays(folder / "adaptor.safetensors", model.adaptor_params)
    _write_arrays(folder / "head.safetensors", model.head.state)
    if domain_file is not None:
        shutil.copyfile(model.preprocess.domain, folder / domain_file)
    if onnx:
        from anomax.deploy.onnx_export import export_onnx

        export_onnx(model, folder / ONNX_FILE, domain_file=domain_file)  # the mask's copy beside model.onnx


def _write_ensemble(folder: Path, ensemble, thresholds, config) -> None:
    """A score ensemble's files: each member as a one-model artifact in its own folder, then ensemble.json."""
    names = [f"member-{number}" for number in range(len(ensemble.members))]
    for name, member in zip(names, ensemble.members):
        (folder / name).mkdir()
        _write_model(folder / name, member, None, None, onnx=False)
        _write_manifest(folder / name)
    _write_json(folder / "ensemble.json", {"members": names, "stats": ensemble.stats,
                                           "thresholds": _thresholds_record(ensemble, thresholds),
                                           "batch_size": ensemble.batch_size})
    _write_json(folder / "config.json", config)


def _write_manifest(staging: Path) -> None:
    """The manifest (written last): format marker and version, the sha256 of every other file and,
    for an ensemble, of each member folder's own manifest (written before, so the chain covers all)."""
    from anomax import __version__

    files = sorted(p.name for p in staging.iterdir() if not p.is_dir())
    members = sorted(p.name for p in staging.iterdir() if p.is_dir())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION if members else MODEL_FORMAT_VERSION,
                "anomax_version": __version__, "files": {name: sha256_file(staging / name) for name in files}}
    if members:
        manifest["members"] = {name: sha256_file(staging / name / MANIFEST) for name in members}
    _write_json(staging / MANIFEST, manifest)
    for name in files + [MANIFEST]:
        fsync_path(staging / name)
    fsync_path(staging)


def _check_replaceable(target: Path) -> None:
    """overwrite=True replaces an anomax artifact holding only its own files, nothing else: a user's folder
    that happens to be at the target is never deleted."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if (target.is_symlink() or not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise OutputError(f"refusing to replace {target}: it is not an anomax model artifact (no {MANIFEST} saying "
                          f"\"format\": \"{FORMAT}\"); save to another path, or move it away yourself")
    foreign = sorted({entry.name for entry in target.iterdir()} - {MANIFEST, *manifest["files"],
                                                                   *(manifest.get("members") or ())})
    if foreign:
        raise OutputError(f"refusing to replace {target}: besides the artifact it holds {', '.join(foreign[:5])}; "
                          f"move those files away or save to another path")


# A save writes a staging sibling (.NAME.tmp-*), moves the old artifact aside (.NAME.old-*), renames the
# staging directory into place, then deletes the old one. A kill can stop it between any two steps.
def _aside(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex}")


def _swap(staging: Path, target: Path) -> None:
    previous = None
    if target.exists():
        previous = _aside(target, "old")
        os.rename(target, previous)
    try:
        os.rename(staging, target)
    except BaseException:
        if previous is not None:  # an error, not a kill: put the old artifact back at once
            os.rename(previous, target)
        raise
    fsync_path(target.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)  # what is left is removed by the next save


def _recover(target: Path) -> None:
    """Undo what a killed save left next to ``target`` (call with its parent locked): when the target
    is missing, the artifact it had moved aside goes back in place; leftover copies are removed."""
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    leftovers = [entry for entry in target.parent.iterdir()
                 if entry.name.startswith(prefixes) and entry.is_dir() and not entry.is_symlink()]
    moved_aside = [entry for entry in leftovers if entry.name.startswith(prefixes[1])]
    if moved_aside and not (target.exists() or target.is_symlink()):
        previous = max(moved_aside, key=lambda entry: entry.stat().st_mtime_ns)
        os.rename(previous, target)
        log.warning("%s: restored the artifact an interrupted save had moved aside to %s", target, previous.name)
        leftovers.remove(previous)
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Verify the artifact at ``path`` and return its metadata: model.json's content plus
    'config', 'format_version', 'anomax_version' and 'files' (the names its manifest lists)."""
    root = Path(path).absolute()
    if not root.exists() and root.parent.is_dir():  # perhaps a save was killed while it swapped
        with output_errors(root), locked(root.parent):
            _recover(root)
    manifest_path = root / MANIFEST
    if not root.exists():
        raise ArtifactError(f"no model artifact at {root}: the folder does not exist")
    if not manifest_path.is_file():
        inside = root / "model"  # anomax-train's run directory holds the artifact in model/
        hint = f"; the run directory's model is {inside}" if (inside / MANIFEST).is_file() else ""
        raise ArtifactError(f"{root} is not an anomax model artifact: {MANIFEST} is missing{hint}")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object; the artifact is corrupt — save the model again")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:  # not bool, not float, not a string
        raise ArtifactError(f"{manifest_path}: 'format_version' must be an integer >= 1, got {version!r}; "
                            f"the artifact is corrupt — save the model again")
    if version > FORMAT_VERSION:
        from anomax import __version__

        raise ArtifactError(f"{root} has artifact format {version} (written by anomax "
                            f"{manifest.get('anomax_version')}); anomax {__version__} reads formats up to "
                            f"{FORMAT_VERSION} — upgrade anomax (pip install -U anomax)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(checksum, str) for checksum in files.values()):
        raise ArtifactError(f"{manifest_path}: 'files' must map file names to sha256 strings; the artifact is "
                            f"corrupt — save the model again")
    members = manifest.get("members", {})  # an ensemble's member folders -> sha256 of their manifests
    if not isinstance(members, dict) or not all(isinstance(checksum, str) for checksum in members.values()):
        raise ArtifactError(f"{manifest_path}: 'members' must map folder names to sha256 strings; the artifact is "
                            f"corrupt — save the model again")
    unlisted = [name for name in (ENSEMBLE_FILES if members else REQUIRED_FILES) if name not in files]
    if unlisted:
        raise ArtifactError(f"{manifest_path} does not list {unlisted}; the artifact is incomplete — save it again")
    for name, checksum in files.items():
        _check_file(_member(root, name, manifest_path, f"files.{name}"), checksum)
    for name, checksum in members.items():  # each member's own manifest checks its files when it loads
        _check_file(_member(root, name, manifest_path, f"members.{name}") / MANIFEST, checksum)
    if members:
        record = _read_json(root / "ensemble.json")
        with _checked(root / "ensemble.json"):
            _exactly(record, ENSEMBLE_KEYS)
            if not isinstance(record["members"], list) or sorted(record["members"], key=str) != sorted(members):
                raise ValueError(f"'members' must list the member folders {sorted(members)} of {MANIFEST}, "
                                 f"got {record['members']!r}")
    else:
        record = _read_json(root / "model.json")
        with _checked(root / "model.json"):
            record = {"tiling": None, "augment": None, **record}  # older artifacts: untiled, no test-time augmentation
            _exactly(record, MODEL_KEYS)
    return {**record, "config": _read_json(root / "config.json"), "format_version": version,
            "anomax_version": manifest.get("anomax_version"), "files": sorted(files)}


def _check_file(file: Path, checksum: str) -> None:
    """``file`` exists and has the sha256 its manifest lists."""
    try:
        present = file.is_file()
        matches = present and sha256_file(file) == checksum
    except OSError as error:
        raise ArtifactError(f"cannot read {file}: {error.strerror or error}") from None
    if not present:
        raise ArtifactError(f"{file} is missing from the artifact; copy the whole directory or save it again")
    if not matches:
        raise ArtifactError(f"{file} does not match its sha256 in {MANIFEST}: it is corrupt, truncated or "
                            f"was modified — restore it or save the model again")


def load_model(path: str | os.PathLike, runtime: str = "jax", **options):
    """The AnomalyModel saved at ``path``: no training data, no Hydra, no network access.

    runtime 'onnxruntime' or 'openvino': the artifact's model.onnx (saved with onnx=True) in that
    runtime, behind the same apply, preprocessing, thresholds and result dicts; ``options`` go to
    it (see anomax.deploy.runtimes: threads; OpenVINO precision='f32' | 'default')."""
    from anomax.deploy.runtimes import check_runtime

    check_runtime(runtime)  # a mistyped name is what is wrong, whatever the artifact holds
    root = Path(path).absolute()
    meta = read_metadata(root)
    ensemble = "stats" in meta  # ensemble.json's, never model.json's
    if runtime == "jax":
        if options:
            raise ConfigError(f"runtime 'jax' takes no options, got {sorted(options)}; they are for "
                              "runtime='onnxruntime' or 'openvino'")
        return (_build_ensemble if ensemble else _build_model)(root, meta)
    if ensemble:
        raise ConfigError(f"{root} is a score ensemble: it runs with runtime='jax' only (no model.onnx)")
    if isinstance(meta["tiling"], dict) and meta["tiling"].get("tile_size") is not None:
        raise ConfigError(f"{root} is a tiled model: it runs with runtime='jax' only (no model.onnx)")
    from anomax.deploy.runtimes import load_runtime

    if ONNX_FILE not in meta["files"]:  # a model.onnx the manifest does not list is no part of this artifact
        raise ArtifactError(f"{root} was saved without {ONNX_FILE}: runtime '{runtime}' needs the exported model; "
                            f"save the model with anomax.save_model(..., onnx=True) (anomax-train ... export.onnx=true)")
    onnx_file = _member(root, ONNX_FILE, root / MANIFEST, f"files.{ONNX_FILE}")  # checked by read_metadata
    # The graph holds backbone, head and test-time augmentation: the JAX model is not built (it would
    # take longer to load than the runtime); only what runs around the graph is read and checked.
    deployed = load_runtime(onnx_file, _preprocess_params(root, meta), None, 1, runtime, **options)
    return _with_runtime_params(deployed, meta, root / "model.json")


MODEL_KEYS = ("backbone", "adaptor", "head", "preprocess", "thresholds", "batch_size", "tiling", "augment")
ENSEMBLE_KEYS = ("members", "stats", "thresholds", "batch_size")


def _build_model(root: Path, meta: Mapping[str, Any]):
    """The AnomalyModel that model.json describes, each section checked by the class that checks its config.

    The manifest is a checksum, not a signature: whoever edits model.json can rehash it. So nothing
    in it is trusted: every bad value (wrong type, NaN, unknown name, missing key) becomes an
    ArtifactError naming model.json and the key, and only files inside the artifact are read.
    """
    from anomax.features import AdaptorConfig, FeatureAdaptor
    from anomax.model import AnomalyModel
    from anomax.registry import HEADS
    from anomax.tiling import TilingConfig, load_head
    from anomax.augment import AugmentConfig

    source = root / "model.json"
    with _checked(source, "backbone"):
        backbone = _load_backbone(meta["backbone"], root / "backbone.safetensors")
    with _checked(source, "adaptor"):
        adaptor = FeatureAdaptor(AdaptorConfig.from_dict(meta["adaptor"]))
        adaptor_params = unflatten_arrays(adaptor.init(backbone.channels), _read_arrays(root / "adaptor.safetensors"),
                                          root / "adaptor.safetensors")
    with _checked(source, "tiling"):
        saved = meta["tiling"] or {}
        # untiled: settings left beside a null tile_size (accepted before they were refused) change nothing
        tiling = TilingConfig.from_dict(saved if saved.get("tile_size") is not None else {}).for_backbone(backbone)
    with _checked(source, "augment"):
        augment = AugmentConfig.from_dict(meta["augment"] or {})
    with _checked(source, "head"):
        head = _exactly(meta["head"], ("name", "hyperparams"))
        head_class = HEADS.get(head["name"])
    try:
        head = load_head(head_class, head["hyperparams"], _read_arrays(root / "head.safetensors"), tiling)
    except ArtifactError as error:  # the head's own check names the array; this names the file
        raise ArtifactError(f"{root / 'head.safetensors'}: {error}") from None
    except (ConfigError, TypeError, ValueError) as error:  # the hyperparameters of model.json
        raise ArtifactError(f"{source}: 'head' is invalid: {error}; the artifact was modified or written by an "
                            "incompatible anomax — save the model again") from None
    preprocess = _preprocess_params(root, meta)
    with _checked(source):
        model = AnomalyModel(preprocess, backbone, adaptor, head, adaptor_params=adaptor_params, tiling=tiling,
                             augment=augment)
    if tiling.enabled and getattr(head.config, "border", 0):
        log.warning("%s: a tiled model fitted with model.head.border = %s: each tile seam inside an image is blind to "
                    "defects; fit it again with model.head.border=0", root, head.config.border)
    if not tiling.enabled:  # the sections fit together: the head's arrays take the preprocess size's features
        with _checked(source, "preprocess"):
            model.output_shapes(preprocess.height, preprocess.width)
    return _with_runtime_params(model, meta, source)


def _preprocess_params(root: Path, meta: Mapping[str, Any]):
    """model.json's preprocess section, checked; a domain mask names the artifact's own copy."""
    from anomax.preprocess.params import PreprocessParams

    source = root / "model.json"
    with _checked(source, "preprocess"):
        preprocess = dict(meta["preprocess"])
        if isinstance(preprocess.get("domain"), str):  # a mask file the artifact holds and its manifest lists
            if preprocess["domain"] not in meta["files"]:
                raise ValueError(f"the domain mask {preprocess['domain']!r} is not a file of the artifact")
            preprocess["domain"] = str(_member(root, preprocess["domain"], source, "preprocess.domain"))
        return PreprocessParams.from_dict(preprocess)


def _build_ensemble(root: Path, meta: Mapping[str, Any]):
    """The ScoreEnsemble that ensemble.json describes: each member folder loads as a one-model
    artifact (its manifest checked), then the normalisation statistics, thresholds and batch size."""
    from anomax.ensemble import ScoreEnsemble

    members = []
    for name in meta["members"]:
        member = read_metadata(root / name)
        if "stats" in member:
            raise ArtifactError(f"{root / name}: an ensemble's member must be one model, not an ensemble")
        members.append(_build_model(root / name, member))
    source = root / "ensemble.json"
    with _checked(source, "stats"):
        ensemble = ScoreEnsemble(members, meta["stats"])
    return _with_runtime_params(ensemble, meta, source)


def _with_runtime_params(model, meta: Mapping[str, Any], source: Path):
    """``model`` with the saved thresholds and batch size, each checked as set_params checks them."""
    from anomax.evaluation.thresholds import AnomalyThresholds

    with _checked(source, "thresholds"):
        thresholds = dict(meta["thresholds"])
        estimates = thresholds.pop("estimates", None)
        if estimates is not None:  # not used by the model, but anomax-evaluate reads them
            AnomalyThresholds.from_dict(estimates)
        model.set_params(thresholds=thresholds)
    with _checked(source, "batch_size"):
        if meta["batch_size"] is None:  # None would mean 'unchanged' to set_params
            raise TypeError("batch_size must be an integer >= 1, got None")
        model.set_params(batch_size=meta["batch_size"])
    return model


def _load_backbone(spec: Mapping[str, Any], file: Path):
    """The backbone with the stored parameters (a backbone ensemble: each member's, from its prefix)."""
    from anomax.ensemble import ConcatBackbone

    arrays = _read_arrays(file)
    if not (isinstance(spec, dict) and spec.get("name") == "concat"):
        return _load_member(spec, arrays, file)
    members = _exactly(spec, ("name", "members"))["members"]
    if not isinstance(members, list) or len(members) < 2:
        raise ValueError(f"a backbone ensemble lists at least two members, got {members!r}")
    prefixes = [f"{i}/" for i in range(len(members))]
    stray = sorted(key for key in arrays if not key.startswith(tuple(prefixes)))
    if stray:
        raise ValueError(f"arrays {stray[:5]} belong to no member of the backbone ensemble")
    return ConcatBackbone([_load_member(member, {key[len(prefix):]: value for key, value in arrays.items()
                                                 if key.startswith(prefix)}, file)
                           for member, prefix in zip(members, prefixes)])


def _load_member(spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray], file: Path):
    """One backbone with the stored parameters. Its structure is built as shapes only and checked
    against the file first, so an absurd width in model.json cannot allocate more than the file holds."""
    from flax import nnx

    from anomax.backbones import Backbone
    from anomax.registry import BACKBONES

    spec = _exactly(spec, ("name", "taps", "width_multiplier", "weights_sha256", "weights_file"))
    registered = BACKBONES.get(spec["name"])
    width = spec["width_multiplier"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise ValueError(f"width_multiplier must be a number > 0, got {width!r}")
    if not all(value is None or isinstance(value, str) for value in (spec["weights_sha256"], spec["weights_file"])):
        raise TypeError("weights_sha256 and weights_file must be strings or null")
    network = nnx.eval_shape(lambda: registered.network(width_multiplier=width, rngs=nnx.Rngs(0)))
    try:
        nnx.update(network, unflatten_arrays(nnx.state(network), arrays, file))
    except ArtifactError as error:
        raise ValueError(f"{spec['name']} with width_multiplier {width} does not fit the stored arrays: "
                         f"{error}") from None
    return Backbone(spec["name"], network, spec["taps"], registered.requirements, spec["weights_sha256"], width)


def _exactly(values: Any, keys: Sequence[str]) -> Mapping[str, Any]:
    """``values``, a JSON object with exactly ``keys``."""
    if not isinstance(values, dict):
        raise TypeError(f"expected an object with keys {list(keys)}, got {values!r}")
    missing, unknown = [k for k in keys if k not in values], sorted(set(values) - set(keys))
    if missing:
        raise KeyError(missing[0])
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; known: {list(keys)}")
    return values


@contextlib.contextmanager
def _checked(source: Path, key: str | None = None) -> Iterator[None]:
    """Any invalid value met in the block becomes an ArtifactError naming ``source`` and ``key``."""
    where = f"{source}: '{key}'" if key else str(source)
    try:
        yield
    except KeyError as error:
        missing = f"{key}.{error.args[0]}" if key else error.args[0]
        raise ArtifactError(f"{source}: '{missing}' is missing; the artifact is incomplete or was modified "
                            f"— save the model again") from None
    except (ConfigError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise ArtifactError(f"{where} is invalid: {error}; the artifact was modified or written by an "
                            f"incompatible anomax — save the model again") from None


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
    import jax
    from jax import export

    from anomax.deploy.runtimes import refuse_deployed

    refuse_deployed(model, "export_inference")
    for key, value in (("batch_size", batch_size), ("height", height), ("width", width)):
        if not is_integer(value) or value < 1:
            raise ConfigError(f"export_inference: {key} must be an integer >= 1, got {value!r}")
    if getattr(getattr(model, "tiling", None), "enabled", False):
        raise ConfigError("export_inference: tiled models are not exportable (the function would score one tile, "
                          "not the whole image); export an untiled model")
    params = model.params
    flat = flatten_arrays(params)

    def infer(flat_params, images):
        return model.infer(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                                        [flat_params[key] for key in flat]), images)

    model.output_shapes(height, width)  # a size the head cannot score, named before tracing the export
    check_output_folder(path)
    images = jax.ShapeDtypeStruct((batch_size, height, width, model.preprocess.num_channels), np.float32)
    shapes = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in flat.items()}
    exported = export.export(jax.jit(infer), platforms=platforms)(shapes, images)
    function = np.frombuffer(exported.serialize(), np.uint8)
    target = Path(path)
    with writing(target) as temporary, open(temporary, "wb") as file:
        np.savez(file, **{EXPORTED_FUNCTION: function}, **flat)
    return target


def load_exported(path: str | os.PathLike) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """The function written by ``export_inference``: images -> {'anomaly_image', 'anomaly_score'}."""
    import jax
    from jax import export

    try:
        with np.load(path, allow_pickle=False) as bundle:
            arrays = {key: bundle[key] for key in bundle.files}
        function = export.deserialize(bytearray(arrays.pop(EXPORTED_FUNCTION).tobytes()))
    except OSError as error:
        raise ArtifactError(f"cannot read the exported function {path}: {error}")
    except Exception as error:  # zip, flatbuffer and MLIR errors have no common type
        raise ArtifactError(f"{path} is not an exported anomax function ({error}); export it again")
    (wanted, _), _ = jax.tree_util.tree_unflatten(function.in_tree, function.in_avals)  # ((params, images), {})
    wanted = wanted if isinstance(wanted, dict) else {}
    if sorted(arrays) != sorted(wanted):
        raise ArtifactError(f"{path}: the parameters do not fit the exported function (missing "
                            f"{sorted(set(wanted) - set(arrays))[:5]}, unexpected {sorted(set(arrays) - set(wanted))[:5]}); "
                            f"the file was modified — export it again")
    for key, aval in wanted.items():
        if arrays[key].shape != aval.shape or arrays[key].dtype != aval.dtype:
            raise ArtifactError(f"{path}: '{key}' is {arrays[key].dtype} {arrays[key].shape}, the function takes "
                                f"{aval.dtype} {aval.shape}; the file was modified — export it again")
    params = {key: jax.numpy.asarray(value) for key, value in arrays.items()}
    return lambda images: function.call(params, images)
