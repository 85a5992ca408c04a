"""Structured configs: every config group's schema is derived from the class or function it configures.

Heads, the feature adaptor, preprocess, train, evaluate, split and the run's top level are
``anomax.settings.Settings`` classes: their Hydra schema is made from the class's fields, so a
typo in a key or a wrong type fails at composition with Hydra's message naming the key, and the
class's own validation (ranges, choices) runs before any work. Dataset formats and backbones are
functions; their schemas come from their signatures.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

def _conf_dir() -> str:
    """The configs: inside the installed package (a wheel maps conf/ to anomax/conf), else conf/ of
    the source tree (an editable install or a checkout)."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf")


CONF_DIR = _conf_dir()
_SCALARS = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """Map a Python annotation onto the subset of types OmegaConf can validate."""
    if annotation in _SCALARS:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _omegaconf_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if len(rest) < len(args) and inner is not Any else inner
    if origin in (tuple, list, typing.Sequence) and args and args[0] in _SCALARS:
        return list[args[0]]
    if origin is typing.Literal and len({type(a) for a in args}) == 1:
        return type(args[0])
    return Any


def _field(default: Any) -> dataclasses.Field:
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default)
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: list(default) if isinstance(default, tuple) else default)
    return dataclasses.field(default=default)


def schema_of(fn: Callable, name: str, extra: dict[str, tuple[Any, Any]] | None = None,
              exclude: tuple[str, ...] = (), optional: bool = False) -> type:
    """A dataclass whose fields are ``fn``'s keyword parameters with their defaults, plus ``extra``
    fields (name -> (type, default)); ``optional`` makes every field nullable with default None."""
    hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) and not dataclasses.is_dataclass(fn) else fn)
    fields = [(key, annotation, _field(default)) for key, (annotation, default) in (extra or {}).items()]
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or pname in ("self", *exclude):
            continue
        annotation = _omegaconf_type(hints.get(pname, Any))
        if optional:
            fields.append((pname, Optional[annotation] if annotation is not Any else Any, _field(None)))
        else:
            fields.append((pname, annotation, _field(dataclasses.MISSING if param.default is param.empty
                                                      else param.default)))
    required = [f for f in fields if f[2].default is dataclasses.MISSING and f[2].default_factory is dataclasses.MISSING]
    return dataclasses.make_dataclass(name, required + [f for f in fields if f not in required])


@dataclasses.dataclass
class EvaluateAppConfig:
    """Top level of anomax-evaluate."""

    dataset: Any = None
    evaluate: Any = None
    model_dir: str = MISSING
    split: str = "test"
    split_percent: Any = None  # split.* percentages (validated as SplitConfig); None: the training run's
    seed: Optional[int] = None  # None: the training run's
    batch_size: Optional[int] = None
    cache_dir: Optional[str] = None
    progress: bool = True


@dataclasses.dataclass
class PredictAppConfig:
    """Top level of anomax-predict."""

    model_dir: str = MISSING
    inputs: Any = MISSING
    batch_size: Optional[int] = None
    colormap: str = "jet"
    overlays: bool = True
    runtime: str = "jax"  # jax | onnxruntime | openvino (the artifact's model.onnx)


def settings_schema(cls: type, name: str, extra: dict[str, tuple[Any, Any]] | None = None,
                    optional: bool = False) -> type:
    """The Hydra schema of a Settings class: its fields with OmegaConf-checkable types and their
    defaults (``optional``: every field nullable, default None), plus ``extra`` fields."""
    hints = typing.get_type_hints(cls)
    fields = [(key, annotation, _field(default)) for key, (annotation, default) in (extra or {}).items()]
    for field in dataclasses.fields(cls):
        annotation = _omegaconf_type(hints[field.name])
        if optional:
            fields.append((field.name, Optional[annotation] if annotation is not Any else Any, _field(None)))
        else:
            fields.append((field.name, annotation, _field(field.default)))
    return dataclasses.make_dataclass(name, fields)


def register_predict_schema() -> None:
    """anomax-predict's schema alone: the training ones import the whole pipeline, and with it JAX,
    which a model loaded into onnxruntime or OpenVINO never needs."""
    ConfigStore.instance().store(name="schema_predict_app", node=PredictAppConfig)


def register_schemas() -> None:
    """Put one schema per registry entry and per settings class into Hydra's ConfigStore."""
    from anomax.augment import AugmentConfig
    from anomax.backbones import build_backbone
    from anomax.evaluation.config import EvaluateConfig
    from anomax.features import AdaptorConfig
    from anomax.pipeline import RUN_SECTIONS, ExportConfig, RunConfig, SplitConfig
    from anomax.preprocess.params import PreprocessParams
    from anomax.registry import BACKBONES, DATASET_FORMATS, HEADS
    from anomax.distributed import DistributedConfig
    from anomax.ensemble import EnsembleConfig
    from anomax.tiling import TilingConfig
    from anomax.training import TrainConfig

    store = ConfigStore.instance()
    groups = {key: (Any, None) for key in RUN_SECTIONS if key not in ("split", "export")}
    split = settings_schema(SplitConfig, "Split")
    groups["split"] = (split, split)
    export = settings_schema(ExportConfig, "Export")
    groups["export"] = (export, export)
    store.store(name="schema", node=settings_schema(RunConfig, "AppConfig", groups))
    store.store(name="schema_evaluate_app", node=EvaluateAppConfig)
    register_predict_schema()
    adaptor = settings_schema(AdaptorConfig, "Adaptor")
    for fmt in DATASET_FORMATS.names():
        node = schema_of(DATASET_FORMATS.get(fmt), f"Dataset_{fmt}", {"format": (str, fmt), "name": (str, fmt)})
        store.store(group="dataset", name=f"schema_{fmt}", node=node)
    for backbone in BACKBONES.names():
        node = schema_of(build_backbone, f"Backbone_{backbone}")
        store.store(group="model/backbone", name=f"schema_{backbone}", node=node)
    # a backbone ensemble: members are build_backbone mappings, checked by anomax.ensemble.check_concat_members
    store.store(group="model/backbone", name="schema_concat", node=dataclasses.make_dataclass(
        "Backbone_concat", [("name", str, "concat"), ("members", List[Dict[str, Any]], dataclasses.field(default_factory=list))]))
    for head in HEADS.names():
        node = settings_schema(HEADS.get(head).Config, f"Head_{head}",
                               {"name": (str, head), "adaptor": (adaptor, adaptor)})
        store.store(group="model/head", name=f"schema_{head}", node=node)
    # null preprocess values are filled from the backbone's requirements
    store.store(group="preprocess", name="schema", node=settings_schema(PreprocessParams, "Preprocess", optional=True))
    store.store(group="train", name="schema", node=settings_schema(TrainConfig, "Train"))
    store.store(group="evaluate", name="schema", node=settings_schema(EvaluateConfig, "Evaluate"))
    store.store(group="tiling", name="schema", node=settings_schema(TilingConfig, "Tiling"))
    store.store(group="distributed", name="schema", node=settings_schema(DistributedConfig, "Distributed"))
    store.store(group="augment", name="schema", node=settings_schema(AugmentConfig, "Augment"))
    store.store(group="ensemble", name="schema", node=settings_schema(EnsembleConfig, "Ensemble"))


def compose_train_config(overrides: Sequence[str], config_name: str = "anomax_train") -> dict[str, Any]:
    """conf/anomax_train.yaml with these overrides, composed, resolved and checked (validate_config,
    the members of a score ensemble too) as anomax-train does; a wrong key or value is a ConfigError.
    Inside a running anomax app with that app's Hydra, so its --config-dir counts too; inside another
    application's Hydra, anomax's conf/ is composed on the side and that Hydra is left as it was."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from anomax.errors import ConfigError
    from anomax.pipeline import validate_config

    if isinstance(overrides, str):  # it would be read character by character
        raise ConfigError(f"compose_train_config takes a list of overrides, e.g. ['model/head=padim'], got the "
                          f"string {overrides!r}")
    register_schemas()
    try:
        cfg = _composed(list(overrides), config_name)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"the overrides {list(overrides)} do not compose: {error}") from None
    validate_config(cfg, ensemble_member_configs(cfg, overrides, config_name))
    return cfg


def _composed(overrides: list[str], config_name: str) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime
    from hydra.errors import MissingConfigException
    from hydra.version import VersionBase

    from anomax.apps._common import plain

    running = GlobalHydra.instance()
    if running.is_initialized():
        try:
            return plain(compose(config_name, overrides=overrides))
        except MissingConfigException as error:
            if f"primary config '{config_name}'" not in str(error):
                raise
        # another application's Hydra, without anomax's conf/: it, its version base and job name come back after
        saved, base, job = running.hydra, VersionBase.instance().version_base, JobRuntime.instance().get("name")
        running.clear()
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                return plain(compose(config_name, overrides=overrides))
        finally:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(saved)
            VersionBase.instance().version_base = base
            JobRuntime.instance().set("name", job)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return plain(compose(config_name, overrides=overrides))


def ensemble_member_configs(cfg: Mapping[str, Any], overrides: Sequence[str],
                            config_name: str = "anomax_train") -> list[dict[str, Any]]:
    """A score ensemble's member configs: each is the run's overrides (less its ensemble ones), then
    ensemble=off, then the member's own overrides (which win: later overrides replace earlier ones).
    An override that does not compose or check (compose_train_config) raises ConfigError naming the member and why."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from anomax.ensemble import EnsembleConfig
    from anomax.errors import ConfigError

    run = [o for o in overrides if str(o).lstrip("+~").partition("=")[0].split(".")[0] != "ensemble"]
    configs = []
    for number, member in enumerate(EnsembleConfig.from_dict(cfg.get("ensemble")).members):
        try:
            configs.append(compose_train_config([*run, "ensemble=off", *member], config_name))
        except (HydraException, OmegaConfBaseException, ConfigError) as error:
            raise ConfigError(f"ensemble.members[{number}] ({list(member)}): {error}") from None
    return configs


MAX_RUN_NAME = 120  # characters of the override part of a run directory name (file names allow 255)


def run_dir_suffix(overrides) -> str:
    """A short, command-line-safe run directory suffix from the task overrides:
    '_head-padim__seed-1'. Keys are abbreviated to their last part, path-valued overrides are left
    out (the full list is in the run's .hydra/overrides.yaml), odd characters become '_', and a name
    longer than MAX_RUN_NAME becomes a short hash of the overrides."""
    parts = []
    for override in overrides or ():
        key, _, value = str(override).lstrip("+~").partition("=")
        if key.startswith("hydra") or "/" in value or value.startswith("~"):
            continue
        name = f"{key.replace('/', '.').rsplit('.', 1)[-1]}-{value}"
        parts.append(re.sub(r"[^A-Za-z0-9._-]", "_", name))
    suffix = "__".join(parts)
    if len(suffix) > MAX_RUN_NAME:
        suffix = "overrides-" + hashlib.sha256("\n".join(map(str, overrides)).encode()).hexdigest()[:10]
    return f"_{suffix}" if suffix else ""


OmegaConf.register_new_resolver("anomax_dirname", run_dir_suffix, replace=True)
