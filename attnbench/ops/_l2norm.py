"""Helpers shared by the delta-family ops: FLA's q/k L2 norm and the compute dtype.

    l2norm(x) = x / sqrt(sum_i x_i^2 + eps),   eps = 1e-6, over the last (head) dim

Unit keys keep the delta rule's transition I - beta k k^T non-expansive for beta in [0, 2]
(ops/delta_rule.py); unit queries keep the read-out's scale independent of the input's.
"""
from __future__ import annotations

import torch

L2NORM_EPS = 1e-6  # FLA's l2norm: x / sqrt(sum(x^2) + 1e-6)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """Normalise over the last dim exactly as FLA's `use_qk_l2norm_in_kernel` does.

    Computed in float32 (float64 for float64 inputs) and returned in x's dtype, like FLA.
    """
    xf = x.to(compute_dtype(x))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, otherwise float32 (16-bit inputs are upcast)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def needs_backward(*xs: torch.Tensor | None) -> bool:
    """Will autograd ask for a backward through this call?"""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)
