"""One frozen, typed dataclass per configurable thing: the single source of truth of a setting.

A ``Settings`` subclass declares each setting once, as a typed field with its default and,
where it has one, its range (``setting(0.01, gt=0, le=1)``); choices are ``Literal[...]``.
From that one declaration come the Hydra schema (``anomax.apps.config``), the validation
(``validate``, run on construction, so a wrong value fails before any image is read), the
hyperparameters saved with a model (``to_dict``) and the loader's check (``from_dict``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, ClassVar, Literal, Mapping

import numpy as np

from anomax.errors import ConfigError

__all__ = ["Settings", "setting"]


# Seeds are 32-bit (jax.random.key(2**32) is key(0)); efficientad derives seed + 1 and seed + 2.
MAX_SEED = 2**32 - 3


def setting(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, odd: bool = False) -> Any:
    """A dataclass field with bounds: ge/gt/le/lt for numbers; odd for integers that must be odd."""
    bounds = {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    metadata = {"bounds": bounds, "odd": odd}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class _Invalid(Exception):
    """A value does not fit a type; carries the rule to print."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# For the arguments of public functions that are not Settings (their messages stay at the call sites)
def is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """An int or float, numpy's too, not a bool, and finite."""
    return _is_number(value) and math.isfinite(float(value))


def _rule(annotation: Any) -> str:
    """What a value of ``annotation`` must be, in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a finite number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rules = ["null" if a is type(None) else _rule(a) for a in args]
        return " or ".join(rules)
    if origin is tuple:
        if not args:
            return "a list"
        inner = _rule(args[0])  # 'a list of strings' inside: 'a list of lists of strings'
        return "a list of " + (inner.replace("a list", "lists", 1) if inner.startswith("a list")
                               else f"{inner.removeprefix('a ').removeprefix('an ')}s")
    return "a value"


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` and normalised (numpy scalars -> Python, lists -> tuples)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is int:
        if _is_number(value) and float(value).is_integer() and not isinstance(value, (float, np.floating)):
            return int(value)
    elif annotation is float:
        if _is_number(value) and math.isfinite(float(value)):
            return float(value)
    elif annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        for choice in args:  # type must match too: True is not 1
            if type(value) is type(choice) and value == choice:
                return choice
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option)
            except _Invalid:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            element = args[0] if args else Any
            return tuple(_coerce(v, element) for v in value)
    raise _Invalid(_rule(annotation))


def _bounds_rule(bounds: Mapping[str, float]) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[key]} {value}" for key, value in bounds.items())


def _bounded_rule(annotation: Any, bounds: Mapping[str, float]) -> str:
    """'an integer >= 1', 'null or a finite number > 0 and <= 1'."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    rule = f"{' or '.join(_rule(a) for a in options)} {_bounds_rule(bounds)}"
    return f"null or {rule}" if len(options) < len(typing.get_args(annotation)) else rule


def _within(value: float, bounds: Mapping[str, float]) -> bool:
    checks = {"ge": value >= bounds.get("ge", -math.inf), "gt": value > bounds.get("gt", -math.inf),
              "le": value <= bounds.get("le", math.inf), "lt": value < bounds.get("lt", math.inf)}
    return all(checks[key] for key in bounds)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every settings class. ``section`` is the config path its keys live under
    ('model.head', 'train', ...), used in messages so a wrong key is named as the user types it."""

    section: ClassVar[str] = "settings"

    def __post_init__(self):
        self.validate()

    @classmethod
    @functools.cache
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {field.name: hints[field.name] for field in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Types, ranges and choices of every field, then the class's cross-field ``check``."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                value = _coerce(value, self.field_types()[field.name])
            except _Invalid as invalid:
                self.fail(field.name, invalid.rule)
            bounds = field.metadata.get("bounds", {})
            if bounds and _is_number(value) and not _within(value, bounds):
                self.fail(field.name, _bounded_rule(self.field_types()[field.name], bounds))
            if field.metadata.get("odd") and isinstance(value, int) and value % 2 == 0:
                self.fail(field.name, "an odd integer")
            object.__setattr__(self, field.name, value)
        self.check()

    def check(self) -> None:
        """Rules that tie several fields together; raise through ``self.fail``."""

    def fail(self, key: str, rule: str) -> typing.NoReturn:
        raise ConfigError(f"{self.section}.{key} = {getattr(self, key, None)!r} is invalid: it must be {rule} "
                          f"(set it in conf/ or on the command line: {self.section}.{key}=...)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any):
        """Build from a mapping (a config group, saved hyperparameters); unknown keys are refused."""
        values = {**dict(values or {}), **overrides}
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(f'{cls.section}.{key}' for key in unknown)}; "
                              f"known keys: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able values (tuples as lists): from_dict(to_dict()) gives an equal object."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value
