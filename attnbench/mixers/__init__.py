"""Mixer registry. A mixer is one module in this package that decorates its class with
`@register("name")`; every module here is imported on first use, so adding a file is enough.

Hybrids: `model.mixer` may also be a layer pattern, `"gated_deltanet*3+softmax"`: items joined by `+`,
each a registered name or `name*count`, repeated over `n_layer` (which must be a multiple of the
pattern's length). Each layer's mixer reads its arguments from its own sub-table
`[model.mixer_args.<name>]`; a plain mixer keeps `[model.mixer_args]`. `layer_groups(cfg)` gives each
distinct mixer's layer config and layer count, which is all the model, the parameter search and the
FLOP/state accounting need (docs/hybrids.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from typing import Any

from ..errors import ConfigError, did_you_mean
from .base import Mixer, MixerArgs

_REGISTRY: dict[str, type[Mixer]] = {}
_loaded = False
# The hybrids that `mixers = ["all"]` in a sweep compares beside every registered mixer: Gated DeltaNet and
# softmax 3:1 (the interleave of Qwen3-Next, Kimi Linear, MiniMax-01) and Mamba-2 with sliding-window
# attention 1:1 (as Samba). docs/hybrids.md.
PATTERNS = ("gated_deltanet*3+softmax", "mamba2+swa")


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


def everything() -> list[str]:
    """Every registered mixer, then the PATTERNS hybrids: what a sweep's `all` stands for."""
    return available() + [p for p in PATTERNS if p not in _REGISTRY]


def get(name: str) -> type[Mixer]:
    _load_all()
    if name not in _REGISTRY and is_hybrid(name):
        raise ConfigError(f"{name!r} is a layer pattern (a hybrid), not one mixer: its layers' mixers come from "
                          "mixers.layer_groups(cfg)")
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"unknown mixer {name!r} (model.mixer){hint} available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# ---------------------------------------------------------------- hybrids: layer patterns

_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\*([0-9]+))?$")


def is_hybrid(spec: str) -> bool:
    """Whether `spec` is a layer pattern ("a*3+b") rather than one mixer's name."""
    return "+" in spec or "*" in spec


def parse_pattern(spec: str) -> list[tuple[str, int]]:
    """`"gated_deltanet*3+softmax"` -> [("gated_deltanet", 3), ("softmax", 1)]; a plain name -> [(name, 1)].
    ConfigError for bad syntax or an unknown mixer (with the nearest registered name)."""
    spec = str(spec).strip()
    items = []
    for raw in spec.replace(" ", "").split("+"):
        m = _ITEM.match(raw)
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(f"model.mixer = {spec!r}: {raw!r} is not a mixer name or NAME*COUNT (COUNT >= 1); "
                              "a hybrid is written like \"gated_deltanet*3+softmax\"")
        name = m.group(1)
        if name not in available():
            raise ConfigError(f"unknown mixer {name!r} in the layer pattern {spec!r} (model.mixer)"
                              f"{did_you_mean(name, available())} available: {', '.join(available())}")
        items.append((name, int(m.group(2) or 1)))
    return items


def components(spec: str) -> list[str]:
    """The distinct mixers of a pattern, in order of first appearance."""
    return list(dict.fromkeys(name for name, _ in parse_pattern(spec)))


def pattern_length(spec: str) -> int:
    """Layers in one repeat of a pattern ("gated_deltanet*3+softmax": 4; a plain mixer: 1)."""
    return sum(count for _, count in parse_pattern(spec))


def layer_names(spec: str, n_layer: int) -> list[str]:
    """Each layer's mixer: the pattern repeated over n_layer layers; ConfigError naming the depths that
    work when n_layer is not a multiple of the pattern's length."""
    one = [name for name, count in parse_pattern(spec) for _ in range(count)]
    if n_layer % len(one):
        ok = ", ".join(str(len(one) * k) for k in range(1, 4))
        raise ConfigError(f"model.n_layer = {n_layer} does not fit the layer pattern {spec!r} ({len(one)} layers "
                          f"long): n_layer must be a multiple of {len(one)}, e.g. {ok}")
    return one * (n_layer // len(one))


def check_mixer_args(spec: str, mixer_args: dict[str, Any]) -> None:
    """A hybrid's mixer_args hold one sub-table per mixer of its pattern, and nothing else."""
    if not is_hybrid(spec):
        return
    names = components(spec)
    for key, val in (mixer_args or {}).items():
        if key in names and isinstance(val, dict):
            continue
        if key in names:
            raise ConfigError(f"model.mixer_args.{key} must be a table of {key}'s arguments "
                              f"([model.mixer_args.{key}]), got {val!r}")
        if isinstance(val, dict) or key in available():
            raise ConfigError(f"model.mixer_args.{key}: {key!r} is not a mixer of the layer pattern {spec!r}; "
                              f"its sub-tables are {', '.join(names)}{did_you_mean(key, names)}")
        raise ConfigError(f"model.mixer_args.{key}: the hybrid {spec!r} takes each mixer's arguments from its own "
                          f"sub-table: " + " or ".join(f"model.mixer_args.{n}.{key}" for n in names))


def layer_config(cfg: Any, name: str) -> Any:
    """The config one of `cfg`'s layers of mixer `name` is built with: `cfg` itself for a plain mixer;
    for a hybrid, `cfg` with `mixer = name` and that mixer's sub-table as its mixer_args."""
    if not is_hybrid(cfg.mixer):
        return cfg
    return dataclasses.replace(cfg, mixer=name, mixer_args=dict((cfg.mixer_args or {}).get(name) or {}))


def layer_groups(cfg: Any) -> list[tuple[Any, int]]:
    """(layer config, number of layers) for each distinct mixer of `cfg` (one entry for a plain mixer):
    parameter counts, FLOPs and decode state are sums over these."""
    names = layer_names(cfg.mixer, cfg.n_layer)
    check_mixer_args(cfg.mixer, cfg.mixer_args)
    return [(layer_config(cfg, n), names.count(n)) for n in dict.fromkeys(names)]


def check_model(cfg: Any) -> None:
    """Every mixer of `cfg` accepts its arguments and the model settings (Args.validate, check_config);
    a hybrid's errors name the layer's mixer."""
    for lc, _ in layer_groups(cfg):
        cls = get(lc.mixer)
        try:
            cls.Args.from_dict(lc.mixer_args, lc.mixer).validate(lc.n_embd, lc.n_head)
            cls.check_config(lc)
        except ConfigError as e:
            if not is_hybrid(cfg.mixer):
                raise
            raise ConfigError(f"{e} (the {lc.mixer} layers of {cfg.mixer!r}: model.mixer_args.{lc.mixer})") from None


def file_safe(spec: str) -> str:
    """A mixer or pattern name in the characters of a portable file name: `*` -> `_x`, `+` -> `-`
    ("gated_deltanet*3+softmax" -> "gated_deltanet_x3-softmax"); plain names are unchanged."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(spec).replace(" ", "").replace("*", "_x").replace("+", "-"))


__all__ = ["Mixer", "MixerArgs", "PATTERNS", "register", "available", "everything", "get", "is_hybrid",
           "parse_pattern", "components", "pattern_length", "layer_names", "check_mixer_args", "layer_config",
           "layer_groups", "check_model", "file_safe"]
