"""Rotary position embedding (GPT-NeoX half rotation) for attention-type mixers.

For a head of dim D, frequencies theta_i = base^(-2i/D), i < D/2, and position p, the pairs (x_i, x_{i+D/2})
are rotated by the angle p * theta_i:

    x'_i = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i),   x'_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)

Rotating q at position p and k at position s makes q . k depend on p - s only: attention scores see
relative positions, and no position table bounds the context.
"""
from __future__ import annotations

import torch


def rotary_tables(head_dim: int, positions: torch.Tensor, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim // 2] for integer `positions` [T] (float64 on request, for references)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    ang = positions.to(dtype)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] (D even) by the tables [T, D/2]; computed in float32 (float64 for float64
    inputs), returned in x's dtype."""
    d = x.shape[-1] // 2
    xf = x if x.dtype == torch.float64 else x.float()
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf[..., :d], xf[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
