"""The mixer contract: the one extension point of attnbench (see README, "Adding a mixer").

A mixer maps `x (B, T, C)` to `y (B, T, C)` causally. Without a state it is the full causal pass;
with a state (from `init_state`) it continues from it, for a prefill of many tokens or a decode step
of one, and updates that state in place (the state also records how many tokens it has seen).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError, did_you_mean


@dataclass
class MixerArgs:
    """Base for a mixer's own hyper-parameters. Subclasses add fields and override `validate`."""

    def validate(self, n_embd: int, n_head: int) -> None:
        """Raise ConfigError naming the key for impossible settings."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, mixer: str) -> "MixerArgs":
        d = dict(d or {})
        names = [f.name for f in fields(cls)]
        kwargs = {}
        for key, val in d.items():
            if key not in names:
                hint = did_you_mean(key, names, prefix="mixer_args.", list_all=True)
                raise ConfigError(f"unknown key model.mixer_args.{key} for mixer {mixer!r}{hint}")
            kwargs[key] = _coerce(cls, key, val, mixer)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(cls: type, key: str, val: Any, mixer: str) -> Any:
    """Coerce a TOML/CLI value to the dataclass field's type (bool/int/float/str, or Optional[...])."""
    from ..config import coerce_value, field_types  # one coercion rule for the whole config

    return coerce_value(val, field_types(cls)[key], f"model.mixer_args.{key}")


class Mixer(nn.Module):
    """Base class. Subclasses set `Args` and implement `forward` and `init_state`."""

    Args: ClassVar[type[MixerArgs]] = MixerArgs
    name: ClassVar[str] = ""
    # True when the mixer needs no position embedding from the model (it encodes order itself,
    # e.g. recurrence or its own RoPE). The model still adds the configured one; this is information.
    encodes_position: ClassVar[bool] = False

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.args = self.Args.from_dict(cfg.mixer_args, self.name)
        self.args.validate(cfg.n_embd, cfg.n_head)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Model-level combinations this mixer cannot take (e.g. a position scheme); ConfigError."""

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        """An empty state for `batch` sequences of up to `max_len` tokens."""
        raise NotImplementedError

    # Analytic accounting, implemented by every mixer (attnbench.params and attnbench.flops use them).
    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token of this mixer (projections included) at context length T."""
        raise NotImplementedError

    @classmethod
    def state_numbers(cls, cfg: Any, T: int) -> int:
        """Numbers one sequence keeps in this mixer's decoding state at context length T."""
        raise NotImplementedError
