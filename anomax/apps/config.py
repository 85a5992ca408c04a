"""Structured configs: every config group's schema is derived from the function it configures.

A head's hyper-parameters live in one place, its constructor's signature; the Hydra schema
is made from that signature, so a typo in a key or a wrong type fails at composition,
before any work starts, with Hydra's message naming the key.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
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
class SplitConfig:
    """Percentages for datasets that bring no split of their own (the rest is test)."""

    training_percent: float = 70.0
    validation_percent: float = 15.0


@dataclasses.dataclass
class AppConfig:
    """Top level of anomax-train; the groups below are validated by their own schemas."""

    dataset: Any = None
    preprocess: Any = None
    model: Any = None
    train: Any = None
    evaluate: Any = None
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    seed: int = 0
    batch_size: int = 16
    cache_dir: Optional[str] = None
    progress: bool = True


@dataclasses.dataclass
class EvaluateAppConfig:
    """Top level of anomax-evaluate."""

    dataset: Any = None
    evaluate: Any = None
    model_dir: str = MISSING
    split: str = "test"
    split_percent: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    seed: int = 0
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


def register_schemas() -> None:
    """Put one schema per registry entry into Hydra's ConfigStore (``schema_<name>`` in its group)."""
    from anomax.backbones import build_backbone
    from anomax.features import FeatureAdaptor
    from anomax.pipeline import EvaluateConfig
    from anomax.preprocess.params import PreprocessParams
    from anomax.registry import BACKBONES, DATASET_FORMATS, HEADS
    from anomax.training import TrainConfig

    store = ConfigStore.instance()
    store.store(name="schema", node=AppConfig)
    store.store(name="schema_evaluate_app", node=EvaluateAppConfig)
    store.store(name="schema_predict_app", node=PredictAppConfig)
    adaptor = schema_of(FeatureAdaptor, "Adaptor")
    for fmt in DATASET_FORMATS.names():
        node = schema_of(DATASET_FORMATS.get(fmt), f"Dataset_{fmt}", {"format": (str, fmt), "name": (str, fmt)})
        store.store(group="dataset", name=f"schema_{fmt}", node=node)
    for backbone in BACKBONES.names():
        node = schema_of(build_backbone, f"Backbone_{backbone}")
        store.store(group="model/backbone", name=f"schema_{backbone}", node=node)
    for head in HEADS.names():
        node = schema_of(HEADS.get(head), f"Head_{head}", {"name": (str, head), "adaptor": (adaptor, adaptor)},
                         exclude=("train",))  # trained heads get the train/ group
        store.store(group="model/head", name=f"schema_{head}", node=node)
    # null preprocess values are filled from the backbone's requirements
    store.store(group="preprocess", name="schema", node=schema_of(PreprocessParams, "Preprocess", optional=True))
    store.store(group="train", name="schema", node=schema_of(TrainConfig, "Train"))
    store.store(group="evaluate", name="schema", node=EvaluateConfig)


def _run_dir_suffix(override_dirname: str) -> str:
    """Readable run directory names from the overrides: '_model.head-padim__seed-1' (no '/' in a name)."""
    return f"_{override_dirname.replace('/', '.')}" if override_dirname else ""


OmegaConf.register_new_resolver("anomax_dirname", _run_dir_suffix, replace=True)
