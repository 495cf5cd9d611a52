"""Gated DeltaProduct: n Householder-like delta steps per token, one decay, one read.

Per token t:  S <- exp(g_t) S;  for j < n: S <- S + beta_tj k_tj (v_tj - S^T k_tj)^T;  o_t = S^T q̂_t.

The token's state transition is the product of n generalised Householder matrices,
exp(g_t) prod_j (I - beta_tj k_tj k_tj^T): with n >= 2 and beta in [0, 2] (reflections) the product can
be a rotation, which a single delta step (one reflection at most) cannot express, so more
state-tracking tasks become solvable at n times the recurrence's work.

Shapes as FLA: q `[B, T, H, K]`; k `[B, T*n, H, K]`, v `[B, T*n, H, V]`, beta `[B, T*n, H]`, interleaved
token-major (index t*n + j); g `[B, T, H]` or None (None = ungated DeltaProduct).
The chunked form is the gated delta rule on the length-T*n interleaved sequence with g at sub-step 0,
q at sub-step n-1 (zero elsewhere) and the outputs read at sub-step n-1.
"""
from __future__ import annotations

import torch

from ..errors import AttnbenchError
from ._l2norm import compute_dtype, l2norm, needs_backward
from .backend import resolve
from .delta_rule import check_state, fla_unsupported, lean_chunked_core
from .gated_delta_rule import gated_backward_check


def _check(op: str, q, k, v, g, beta, n, initial_state) -> None:
    if not isinstance(n, int) or n < 1:
        raise AttnbenchError(f"{op}: num_householder must be an int >= 1, got {n!r}")
    if q.dim() != 4:
        raise AttnbenchError(f"{op}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != (B, T * n, H, K):
        raise AttnbenchError(f"{op}: k must be [B, T*n, H, K] = {(B, T * n, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T * n, H):
        raise AttnbenchError(f"{op}: v must be [B, T*n, H, V] = {(B, T * n, H)} + (V,), got {tuple(v.shape)}")
    if beta.shape != (B, T * n, H):
        raise AttnbenchError(f"{op}: beta must be [B, T*n, H] = {(B, T * n, H)}, got {tuple(beta.shape)}")
    if g is not None and g.shape != (B, T, H):
        raise AttnbenchError(f"{op}: g must be [B, T, H] = {(B, T, H)} or None, got {tuple(g.shape)}")
    check_state(op, initial_state, B, H, K, v.shape[-1])


def _recurrent(q, k, v, g, beta, n, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    q = q * scale
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None, None]
        for j in range(n):
            i = t * n + j
            kt = k[:, i].unsqueeze(-2)                                        # [B, H, 1, K]
            u = beta[:, i, :, None, None] * (v[:, i].unsqueeze(-2) - kt @ S)  # [B, H, 1, V]
            S = S + kt.transpose(-1, -2) @ u
        outs.append((q[:, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, dim=1), (S if output_final_state else None)


def _interleave(q: torch.Tensor, g: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaProduct as a delta rule over T*n steps: token t's query sits on its last entry (zeros before:
    an output read there is discarded), its decay on its first (zeros after: no further decay)."""
    B, T, H, K = q.shape
    q_il = torch.cat([q.new_zeros(B, T, n - 1, H, K), q.unsqueeze(2)], dim=2).reshape(B, T * n, H, K)
    g_il = None
    if g is not None:
        g_il = torch.cat([g.unsqueeze(2), g.new_zeros(B, T, n - 1, H)], dim=2).reshape(B, T * n, H)
    return q_il, g_il


def _chunked(q, k, v, g, beta, n, scale, initial_state, output_final_state, chunk_size):
    B, T, H, K = q.shape
    q_il, g_il = _interleave(q, g, n)
    o, S = lean_chunked_core(q_il, k, v, beta, g_il, scale, initial_state, output_final_state, chunk_size)
    return o.reshape(B, T, n, H, -1)[:, :, n - 1], S


@torch.compiler.disable  # FLA's recurrent kernel is not compiler-disabled in FLA 0.6.0 (see gated_delta_rule.py)
def _fla_decode(q, k, v, g, beta, n, scale, initial_state, output_final_state, qk_l2norm):
    """One decode step on FLA: its gated delta rule recurrence over the n interleaved entries (l2-norm in
    the kernel: per entry, as here; a zero query stays zero). g=None is no decay (log-decay 0)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule  # optional dependency (CUDA only)

    B, T, H, _ = q.shape
    q_il, g_il = _interleave(q, g if g is not None else q.new_zeros(B, T, H, dtype=torch.float32), n)
    o, S = fused_recurrent_gated_delta_rule(
        q_il, k, v, g=g_il.float(), beta=beta.to(q.dtype), scale=scale,
        initial_state=initial_state.float() if initial_state is not None else None,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=qk_l2norm)
    return o.reshape(B, T, n, H, -1)[:, :, n - 1].to(q.dtype), (S.float() if S is not None else None)


def gated_delta_product_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                                  beta: torch.Tensor, num_householder: int, scale: float | None = None,
                                  initial_state: torch.Tensor | None = None,
                                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token, sub-step-by-sub-step definition (the oracle); float64-capable."""
    _check("gated_delta_product_recurrent", q, k, v, g, beta, num_householder, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = _recurrent(q, k, v, g, beta, num_householder, scale, initial_state, output_final_state)
    return o.to(q.dtype), S


def gated_delta_product_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                                beta: torch.Tensor, num_householder: int, scale: float | None = None,
                                initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form: the gated delta rule's WY form on the interleaved length-T*n sequence."""
    _check("gated_delta_product_chunked", q, k, v, g, beta, num_householder, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = _chunked(q, k, v, g, beta, num_householder, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def gated_delta_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        beta: torch.Tensor, num_householder: int, scale: float | None = None,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                        qk_l2norm: bool = True, backend: str = "auto",
                        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaProduct op: FLA's chunk kernel on CUDA (bf16/fp16, T > 1), PyTorch otherwise.

    With qk_l2norm each of the n keys of a token is normalised on its own. FLA has no DeltaProduct
    recurrent kernel: a T == 1 decode step on the FLA backend runs FLA's gated delta rule recurrence over
    the token's n interleaved Householder entries (_fla_decode), one launch instead of a PyTorch loop.
    `chunk_size` applies to the PyTorch path only (FLA's is fixed at 64).
    """
    op = "gated_delta_product"
    _check(op, q, k, v, g, beta, num_householder, initial_state)
    n = num_householder
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    refused, label = gated_backward_check(g is not None and needs_backward(q, k, v, g, beta, initial_state),
                                          q.is_cuda)
    reasons = fla_unsupported(q, k, v, chunk_size=None) + refused
    use_fla = resolve(backend, q, op, "; ".join(reasons) or None, fla_label=label) == "fla"
    if use_fla and q.shape[1] == 1 and not needs_backward(q, k, v, g, beta, initial_state):
        return _fla_decode(q, k, v, g, beta, n, scale, initial_state, output_final_state, qk_l2norm)
    if use_fla and q.shape[1] > 1:
        from fla.ops.gated_delta_product import chunk_gated_delta_product  # optional dependency (CUDA only)

        o, S = chunk_gated_delta_product(
            q, k, v, g.float() if g is not None else None, beta.to(q.dtype), num_householder=n, scale=scale,
            initial_state=initial_state.float() if initial_state is not None else None,
            output_final_state=output_final_state, use_qk_l2norm_in_kernel=qk_l2norm)
        return o.to(q.dtype), (S.float() if S is not None else None)
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if q.shape[1] == 1:
        o, S = _recurrent(q, k, v, g, beta, n, scale, initial_state, output_final_state)
    else:
        o, S = _chunked(q, k, v, g, beta, n, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S
