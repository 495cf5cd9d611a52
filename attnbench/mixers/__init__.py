"""Mixer registry. A mixer is one module in this package that decorates its class with
`@register("name")`; every module here is imported on first use, so adding a file is enough."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError, did_you_mean
from .base import Mixer, MixerArgs

_REGISTRY: dict[str, type[Mixer]] = {}
_loaded = False


def register(name: str):
    def deco(cls: type[Mixer]) -> type[Mixer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"mixer {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Mixer]:
    _load_all()
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"unknown mixer {name!r} (model.mixer){hint} available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


__all__ = ["Mixer", "MixerArgs", "register", "available", "get"]
