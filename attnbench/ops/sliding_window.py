"""Sliding-window causal softmax attention.

Layouts: q `[B, TQ, H, D]`, k and v `[B, TK, H, D]` with TQ <= TK; the TQ queries are the LAST TQ of
the TK positions (query i sits at t = TK - TQ + i), so one function serves the full pass (TQ = TK) and a
prefill that continues a cache. With window W >= 1 and scale = D^(-1/2) by default, the query at t
attends to the W most recent keys, itself included:

    o_t = sum_{j = max(0, t-W+1)}^{t} softmax_j(scale q_t . k_j) v_j

With W >= t + 1 this is causal softmax attention; each query costs O(min(t + 1, W)) instead of O(t).

Three implementations:
- `swa_reference`: the definition, one query at a time (use float64 for an oracle; tests only);
- `swa_torch`: vectorised PyTorch. Up to TK = 2W keys, one masked `scaled_dot_product_attention` call
  with the band mask; beyond, the banded blocked form: queries in blocks of W, each block attending to
  its own and the previous block of keys (2W keys, band-masked), so memory and time are O(T W), never
  a T x T mask (a 16k-token evaluation holds 2W scores per query). It computes 2W keys per query where
  the algorithm needs W: `SlidingWindowAttention.flops_per_token_torch` counts what it computes;
- `sliding_window_attention`: the dispatcher. On CUDA it takes FLA's `parallel_attn(window_size=W)`
  (fla/ops/attn/parallel.py, a Triton flash-attention kernel whose forward and backward skip key
  blocks wholly outside the window, so O(T W) work; the same kernel NSA's window branch runs) for
  16-bit inputs with TQ = TK and head dim <= 256, else `swa_torch`.

Why that kernel: `scaled_dot_product_attention` has no window argument; its flash backend takes no mask,
and the efficient and cuDNN backends take a dense T x T mask and still compute every block of it, so
they are O(T^2). `flex_attention` with a sliding-window BlockMask skips blocks too, but only when
compiled (eager, it materialises the whole score matrix), with a mask built per length, and outside the
'fla' backend that the dispatch and the benchmarks' backend labels know. FLA's kernel is the project's
GPU kernel dependency at its pinned version, takes the window natively in forward and backward, and is
checked against the float64 oracle by tests/gpu/test_swa_gpu.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .backend import resolve

__all__ = ["sliding_window_attention", "swa_torch", "swa_reference", "validate_window", "torch_keys_per_query",
           "FLA_MAX_HEAD_DIM"]

FLA_MAX_HEAD_DIM = 256  # parallel_attn tiles the whole key dim in one block (it asserts NK == 1)


def validate_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"sliding-window attention needs an int window >= 1, got {window!r}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> None:
    validate_window(window)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ConfigError(f"sliding-window attention expects q [B,TQ,H,D] and k, v [B,TK,H,D]; got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, TQ, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D or k.shape[1] < TQ:
        raise ConfigError(f"sliding-window attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} "
                          f"(need the same B, H, D and TK >= TQ)")


# ----------------------------------------------------------------------------------------------------
# The oracle: one query at a time, literally.
# ----------------------------------------------------------------------------------------------------

def swa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                  scale: float | None = None) -> torch.Tensor:
    """For each query, the softmax over the last `window` keys up to its position, computed in q's dtype
    (use float64 for an oracle). Differentiable; slow: tests only."""
    _check_inputs(q, k, v, window)
    B, TQ, H, D = q.shape
    TK = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    off = TK - TQ
    rows = []
    for b in range(B):
        for i in range(TQ):
            t = off + i
            lo = max(0, t - window + 1)
            s = scale * torch.einsum("hd,jhd->hj", q[b, i], k[b, lo:t + 1])  # [H, keys]
            p = torch.softmax(s, -1)
            rows.append(torch.einsum("hj,jhd->hd", p, v[b, lo:t + 1]))
    return torch.stack(rows, 0).view(B, TQ, H, D)


# ----------------------------------------------------------------------------------------------------
# Vectorised PyTorch version.
# ----------------------------------------------------------------------------------------------------

def torch_keys_per_query(T: int, window: int) -> float:
    """Keys per query that `swa_torch` multiplies in a full pass of T tokens (padding included): T for
    the single banded call (T <= 2W), else 2W for each of ceil(T / W) * W padded queries."""
    if T <= 2 * window:
        return float(T)
    return 2.0 * window * (-(-T // window) * window) / T


def _banded_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Heads-first q `[B, H, TQ, D]`, k, v `[B, H, TK, D]` -> o `[B, H, TQ, D]`, in blocks of W queries.

    Keys before TK - TQ - (W - 1) are outside every window and dropped; the remaining `off` < W keys
    before the first query get zero queries in front (their outputs are discarded), so queries and keys
    are aligned. Block n (positions nW .. nW+W-1) attends to the keys (n-1)W .. nW+W-1, which hold the
    window of each of its queries; the band mask keeps exactly t-W < j <= t (and j >= 0)."""
    B, H, TQ, D = q.shape
    W = window
    lo = max(0, k.shape[2] - TQ - (W - 1))
    k, v = k[:, :, lo:], v[:, :, lo:]
    TK = k.shape[2]
    off = TK - TQ
    NB = -(-TK // W)
    pad = NB * W - TK
    qb = F.pad(q, (0, 0, off, pad)).reshape(B * H, NB, W, D)
    kb = F.pad(k, (0, 0, 0, pad)).reshape(B * H, NB, W, D)
    vb = F.pad(v, (0, 0, 0, pad)).reshape(B * H, NB, W, D)
    # each block's keys: the previous block (zeros before block 0, masked) then its own
    kk = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :NB], kb], 2)  # [BH, NB, 2W, D]
    vv = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :NB], vb], 2)
    n = torch.arange(NB, device=q.device)[:, None, None]
    t = n * W + torch.arange(W, device=q.device)[None, :, None]  # query positions [NB, W, 1]
    j = (n - 1) * W + torch.arange(2 * W, device=q.device)[None, None, :]  # key positions [NB, 1, 2W]
    mask = (j <= t) & (j > t - W) & (j >= 0)  # every row keeps j = t
    o = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=mask, scale=scale)  # [BH, NB, W, D]
    return o.reshape(B, H, NB * W, D)[:, :, off:off + TQ]


def swa_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              scale: float | None = None) -> torch.Tensor:
    """Vectorised sliding-window attention in PyTorch, in q's dtype, differentiable; `[B, TQ, H, D]`."""
    _check_inputs(q, k, v, window)
    TQ, TK, D = q.shape[1], k.shape[1], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    if TK <= 2 * window:
        t = torch.arange(TK - TQ, TK, device=q.device)[:, None]
        j = torch.arange(TK, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=(j <= t) & (j > t - window), scale=scale)
    else:
        o = _banded_blocks(qh, kh, vh, window, scale)
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------

def _fla_call_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        # tl.dot on float32 inputs rounds through TF32: a 16-bit kernel dtype is the exact contract
        reasons.append(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (FLA's parallel_attn takes one 16-bit "
                       f"dtype; use bf16 autocast)")
    if q.shape[1] != k.shape[1]:
        reasons.append(f"TQ={q.shape[1]} != TK={k.shape[1]} (a prefill continuing a cache)")
    if q.shape[3] > FLA_MAX_HEAD_DIM:
        reasons.append(f"head_dim={q.shape[3]} > {FLA_MAX_HEAD_DIM}")
    return "; ".join(reasons) or None


def _fla_swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    from fla.ops.attn import parallel_attn  # optional dependency (CUDA only)

    # keys j with 0 <= t - j < window_size, causal (fla/ops/attn/parallel.py), forward and backward
    return parallel_attn(q, k, v, scale=scale, window_size=window).to(q.dtype)


# FLA's entry points are not compiler-disabled; keep Dynamo out of the Triton launches.
_fla_swa = torch.compiler.disable(_fla_swa)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Sliding-window attention with backend 'auto' | 'torch' | 'fla'; maths and layouts in the module
    docstring. Returns `[B, TQ, H, D]` in q's dtype."""
    _check_inputs(q, k, v, window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    unsupported = _fla_call_unsupported(q, k, v) if q.is_cuda else None
    if resolve(backend, q, "swa", unsupported) == "fla":
        return _fla_swa(q, k, v, window, scale)
    return swa_torch(q, k, v, window, scale)
