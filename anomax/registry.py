"""String registries: config files name plugins, nothing imports a plugin by hand.

A registry is filled by its plugin package: on the first lookup every module in
that package is imported, and each registers itself with ``@REGISTRY.register``.
Adding a plugin is one new file in the package (plus its config file).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from anomax.errors import ConfigError


class Registry:
    def __init__(self, kind: str, plugin_package: str):
        self.kind = kind
        self.plugin_package = plugin_package
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ConfigError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.plugin_package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.plugin_package}.{module.name}")

    def get(self, name: str) -> Any:
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)


DATASET_FORMATS = Registry("dataset format", "anomax.data.formats")
BACKBONES = Registry("backbone", "anomax.backbones")
HEADS = Registry("head", "anomax.heads")
