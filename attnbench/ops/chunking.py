"""Splitting a sequence into chunks for the chunked (parallel-within-chunk) forms of the recurrent ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_chunks(x: torch.Tensor, dt: torch.dtype, n_chunks: int, C: int) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in dt, zero-padding T up to N*C rows.

    Zero padding is exact for the delta-rule and gated linear-attention families: a padded token has
    k = 0 and beta = 0 (no write) and a zero log-decay (no decay), and its output rows are cut off.
    """
    x = x.to(dt).transpose(1, 2)
    pad = n_chunks * C - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], n_chunks, C, *x.shape[3:])
