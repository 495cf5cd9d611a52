"""A run's configuration made ready to train: parsed (attnbench.config), `n_embd = "match"` resolved by
the parameter search (attnbench.params), validated, and the mixer's own arguments checked by its Args
dataclass. A task other than language modelling (task.kind) is checked here too and sets the model's
block_size and vocab_size. Everything that builds a model from a config file goes through `load_config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import mixers
from .config import RunConfig, check_match_request, parse_config, validate
from .params import resolve_match
from .tasks import task_config


def resolve(cfg: RunConfig) -> RunConfig:
    """Resolve `n_embd = "match"` in place (a resolved config has concrete values, so a saved
    config.json never searches again), then validate; returns cfg."""
    m = cfg.model
    if cfg.task.kind == "mqar":  # settings checked (ConfigError) before anything is written
        mq = task_config(cfg.task)
        m.block_size, m.vocab_size = mq.seq_len, mq.vocab_size
    check_match_request(m)
    if isinstance(m.n_embd, str):
        r = resolve_match(m)
        m.n_embd, m.n_head, m.mixer_args = r.n_embd, r.n_head, dict(r.mixer_args)
    validate(cfg)
    mixers.check_model(m)  # each mixer's Args and check_config (every mixer of a hybrid's pattern)
    return cfg


def load_config(path: str | Path | dict | RunConfig | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Build, resolve and validate a RunConfig from a TOML file (or dict, or RunConfig) plus overrides."""
    return resolve(parse_config(path, overrides))
