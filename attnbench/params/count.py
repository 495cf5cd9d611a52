"""Exact parameter counts, budgets, and the result of a match."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..counts import parse_count
from ..model import GPT

REQUIRED_TOL = 0.01  # the band every mixer must reach (and the default search band)


def parse_budget(value: str | int | float) -> int:
    """A parameter budget such as '10.7M' (attnbench.counts.parse_count)."""
    return parse_count(value, what="parameter budget")


def count_params(model_cfg: ModelConfig) -> int:
    """Trainable parameters of `GPT(model_cfg)`, tied weights once: the model is built on the meta
    device (no memory, no init cost) and `p.numel()` summed over `parameters()`, which yields a shared
    tensor once. Equal to `sum(p.numel() for p in GPT(cfg).parameters())` by construction. Built with
    backend='torch' (parameters never depend on the backend) so that kernel notices stay quiet."""
    cfg = replace(model_cfg, backend="torch")
    try:
        with torch.device("meta"):
            model = GPT(cfg)
    except (NotImplementedError, RuntimeError):  # a mixer init that needs real data: build it for real
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Match:
    """One mixer's matched shape. `deviation` = n_params / budget - 1 (signed)."""

    mixer: str
    model_cfg: ModelConfig
    n_params: int
    deviation: float
    head_dim: int
    heads: int = 0  # the mixer's (query) heads
    kv_heads: Optional[int] = None  # where the mixer has its own KV heads
    budget: int = 0
    kernel_ok: bool = True  # the mixer accepted this shape with backend='fla'
    per_mixer: Optional[dict[str, dict[str, Any]]] = None  # a hybrid's head_dim, heads, kv_heads per mixer

    @property
    def within(self) -> bool:
        return abs(self.deviation) <= REQUIRED_TOL

    def to_row(self) -> dict[str, Any]:
        c = self.model_cfg
        return {"mixer": self.mixer, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "mixer_args": dict(c.mixer_args), "params": self.n_params, "budget": self.budget,
                "deviation": self.deviation, "kernel_ok": self.kernel_ok,
                **({"per_mixer": self.per_mixer} if self.per_mixer else {})}


