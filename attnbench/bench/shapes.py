"""The models the benchmarks measure: one shape per mixer, its benchmark variant, and its construction.

Shapes are the trained ones: `configs/<mixer>.toml`'s [model] section (softmax: shakespeare_char.toml),
whose widths are parameter-matched (n_embd = "match", resolved by attnbench.params). For another
--budget, `attnbench.params.match_shape` re-matches with the config's mixer args held fixed. Without
a config file: the ModelConfig defaults. A hybrid ("gated_deltanet*3+softmax") takes the softmax
config's model section with each of its mixers' [model.mixer_args] from that mixer's config file, and
the smallest n_layer the pattern fits from the softmax config's 6 up (the bakeoff-all preset's choice:
8 for a 4-layer pattern), matched to the budget. `--set key=value` overrides apply on top (tests use them for tiny shapes).

Position embeddings: benchmark models use pos_emb='none' where the config says 'learned'. The learned
table costs one lookup and add per token (negligible time) but its parameters grow with the context
(1M tokens x 384 = 384M parameters, which would dominate a memory measurement), and its host-side
position index would keep a decode step out of a CUDA graph. Every row says which pos_emb ran.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import mixers as registry
from .. import params
from ..config import CONFIGS_DIR, ModelConfig, coerce_value, field_types, read_toml, set_nested
from ..counts import parse_count
from ..errors import ConfigError, did_you_mean
from ..model import GPT
from ..resolve import load_config
from .options import DEFAULT_BUDGET

log = logging.getLogger("attnbench.bench")


@dataclass
class BenchShape:
    """One mixer's model for benchmarking: its config and where the shape came from."""

    mixer: str
    cfg: ModelConfig
    source: str  # e.g. "configs/deltanet.toml (matched to 10.7M)", "ModelConfig defaults"
    n_params_matched: int | None = None  # params.count_params of the trained shape (learned pos table included)


def _configs_dirs() -> list[Path]:
    """A ./configs folder of the user's own first, then the bundled configs."""
    return [Path.cwd() / "configs", CONFIGS_DIR]


def _config_file_shape(mixer: str) -> tuple[ModelConfig, str]:
    if registry.is_hybrid(mixer):
        return _hybrid_shape(mixer)
    names = [f"{mixer}.toml"] + (["shakespeare_char.toml"] if mixer == "softmax" else [])
    for d in _configs_dirs():
        for name in names:
            p = d / name
            if p.is_file():
                cfg = load_config(p).model
                if cfg.mixer == mixer:
                    return cfg, f"configs/{name}"
    return ModelConfig(mixer=mixer), "ModelConfig defaults"


def _hybrid_shape(pattern: str) -> tuple[ModelConfig, str]:
    """A hybrid's shape: the softmax config's model section, each mixer's args from its own config file."""
    base, source = _config_file_shape("softmax")
    args, used = {}, []
    for name in registry.components(pattern):
        f = next((d / f"{name}.toml" for d in _configs_dirs() if (d / f"{name}.toml").is_file()), None)
        model = read_toml(f, "mixer config")[1].get("model", {}) if f is not None else {}
        args[name] = {k: v for k, v in model.get("mixer_args", {}).items() if k not in params.SEARCHED_ARGS}
        used += [f"configs/{f.name}"] if f is not None else []
    period = registry.pattern_length(pattern)
    cfg = dataclasses.replace(base, mixer=pattern, mixer_args=args, n_layer=-(-base.n_layer // period) * period)
    return cfg, f"{pattern}: {source}" + (f" with the args of {', '.join(used)}" if used else "")


def _match(mixer: str, budget: int, budget_text: str, cfg: ModelConfig, source: str
           ) -> tuple[ModelConfig, int, str] | None:
    """The trained shape at `budget`: the config file's own when it was matched to that budget, else
    params.match_shape with the config's mixer args held fixed. None when the search fails (logged):
    the config file's shape is used then."""
    try:
        if cfg.param_budget is not None and parse_count(cfg.param_budget) == budget:
            return cfg, params.count_params(cfg), f"{source} (matched to {cfg.param_budget})"
        m = params.match_shape(mixer, budget, cfg.n_layer, base=cfg)
        return m.model_cfg, int(m.n_params), f"params.match_shape({budget_text}, mixer_args of {source})"
    except Exception as e:  # noqa: BLE001 - one mixer's search must not stop the benchmark
        log.warning("parameter matching failed for %s (%s); using %s", mixer, e, source)
        return None


def parse_sets(items: list[str] | None, mixers: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`--set n_layer=2 --set nsa.block_size=4` -> ({'n_layer': 2}, {'nsa': {'block_size': '4'}}).

    Bare keys are ModelConfig fields (coerced to the field's type); `<mixer>.<key>` goes to that
    mixer's mixer_args (the mixer's Args validates it when the model is built).
    """
    model_fields = field_types(ModelConfig)
    glob: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set n_layer=2 or --set nsa.block_size=16")
        key, val = item.split("=", 1)
        key = key.strip().removeprefix("model.")
        if "." in key:
            mixer, arg = key.split(".", 1)  # a hybrid's: "<pattern>.<mixer>.<arg>" (patterns hold no ".")
            arg = arg.removeprefix("mixer_args.")
            if mixer not in mixers:
                raise ConfigError(f"--set {item!r}: {mixer!r} is not one of the benchmarked mixers {mixers}")
            set_nested(per.setdefault(mixer, {}), arg.split("."), _literal(val))
        elif key in model_fields and key not in ("mixer", "mixer_args"):
            glob[key] = coerce_value(val, model_fields[key], f"--set {key}")
        else:
            hint = did_you_mean(key, model_fields)
            raise ConfigError(f"--set {item!r}: unknown model key {key!r}{hint} (use MIXER.ARG for mixer_args)")
    return glob, per


def _literal(val: str) -> Any:
    """TOML-ish scalar from a CLI string (the mixer's Args coerces it to the field type anyway)."""
    low = val.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(val)
        except ValueError:
            pass
    return val


def resolve_shapes(mixers: list[str] | None = None, budget: str | int = DEFAULT_BUDGET, match: bool = True,
                   sets: list[str] | None = None) -> list[BenchShape]:
    """The models to benchmark, one per mixer (default: every registered mixer)."""
    names = list(mixers) if mixers else registry.available()
    for n in names:
        registry.parse_pattern(n)  # ConfigError naming the nearest mixer for a typo
    budget_n = parse_count(budget)
    glob, per = parse_sets(sets, names)
    shapes = []
    for n in names:
        cfg, source = _config_file_shape(n)
        n_matched = None
        got = _match(n, budget_n, str(budget), cfg, source) if match else None
        if got is not None:
            cfg, n_matched, source = got
        if glob or n in per:
            args = copy.deepcopy(cfg.mixer_args)
            for k, v in per.get(n, {}).items():  # a hybrid's sub-tables merge key by key
                set_nested(args, [k], v)
            cfg = dataclasses.replace(cfg, **glob, mixer_args=args)
            source += " + --set"
        shapes.append(BenchShape(n, dataclasses.replace(cfg, dropout=0.0), source, n_matched))
    return shapes


def bench_config(cfg: ModelConfig, block_size: int) -> ModelConfig:
    """The benchmark variant of a config: no dropout; learned position table dropped (see module doc)."""
    pos = "none" if cfg.pos_emb == "learned" else cfg.pos_emb
    return dataclasses.replace(cfg, dropout=0.0, pos_emb=pos, block_size=max(cfg.block_size, block_size))


def build_model(cfg: ModelConfig, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        return GPT(cfg)


def shape_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "mixer_args": dict(cfg.mixer_args),
            "vocab_size": cfg.vocab_size, "pos_emb": cfg.pos_emb, "block_size": cfg.block_size}
