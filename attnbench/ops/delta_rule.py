"""DeltaNet's delta rule: a token-by-token oracle, a chunked WY form, a dispatcher.

Layouts: q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]` (post-sigmoid), state `[B, H, K, V]`
(key-major, as FLA). Per token, with q̂ = scale * q (scale = K^-1/2 by default):

    u_t = beta_t (v_t - S_{t-1}^T k_t),   S_t = S_{t-1} + k_t u_t^T,   o_t = S_t^T q̂_t

S is a fast-weight memory from keys to values, and each token takes one gradient step of size beta_t on
||S^T k_t - v_t||^2 / 2: S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, so it overwrites what
S held for k_t instead of only adding to it (linear attention is the same without the `- S^T k_t`).
The mixers L2-normalise q and k (`qk_l2norm`, as FLA's `use_qk_l2norm_in_kernel`); with ||k|| = 1 the
transition I - beta k k^T has eigenvalues 1 (orthogonal to k) and 1 - beta (along k): beta in [0, 1]
(sigmoid) keeps them in [0, 1], and beta in [0, 2] (allow_neg_eigval) in [-1, 1], which admits reflections.

Chunked WY form (FLA's chunk kernels, and `chunked_core` here). Split the sequence into chunks of C
tokens; inside a chunk, starting from S0, unrolling the recurrence gives for row i

    u_i = beta_i (v_i - S0^T k_i - sum_{j<i} (k_i . k_j) u_j)

a unit lower-triangular system (I + L) U = diag(beta) (V - K S0), L = strict_lower(diag(beta) K K^T).
It is linear in S0, so it splits into two solves that do not depend on S0,
(I + L) [U | W] = diag(beta) [V | K], and the chunk's corrected values are V_new = U - W S0. Then

    O   = Q̂ S0 + (Q̂ K^T ⊙ M) V_new        (M: the causal mask, j <= i)
    S_C = S0 + K^T V_new

Everything but the S0 -> S_C recurrence over chunks is batched matrix products over all chunks at
once; the sequential part is one C x K by K x V product per chunk. The gated rule (gated_delta_rule.py)
only adds a decay S <- exp(g_t) S before each update; with gamma the cumulative sum of g inside the
chunk, the decays become the factors exp(gamma_i - gamma_j) on the intra-chunk products (see
`chunked_core`), so the two cores below take an optional log-decay `g` and serve both families
(g=None is DeltaNet).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import AttnbenchError
from ._l2norm import compute_dtype, l2norm, needs_backward
from .backend import resolve
from .chunking import to_chunks

FLA_CHUNK_SIZES = (16, 32, 64)
RECOMPUTE_FROM = 2048  # tokens (per sequence, interleaved for DeltaProduct): see lean_chunked_core
FLA_MAX_K = 256  # chunk_delta_h.py asserts K <= 256


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                 g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None) -> None:
    """Shape checks shared by the delta-family ops; raise AttnbenchError naming the tensor."""
    if q.dim() != 4:
        raise AttnbenchError(f"{op}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise AttnbenchError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise AttnbenchError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise AttnbenchError(f"{op}: beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if g is not None and g.shape != q.shape[:3]:
        raise AttnbenchError(f"{op}: g must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    check_state(op, initial_state, B, H, K, v.shape[-1])


def check_state(op: str, s: torch.Tensor | None, B: int, H: int, K: int, V: int) -> None:
    if s is not None and s.shape != (B, H, K, V):
        raise AttnbenchError(f"{op}: initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(s.shape)}")


# ---------------------------------------------------------------------------------------------------
# Cores shared with the gated rule (g: log-decay [B, T, H] or None)
# ---------------------------------------------------------------------------------------------------

def recurrent_core(q, k, v, beta, g, scale, initial_state, output_final_state):
    """The literal recurrence, one token at a time; the oracle the chunked form is tested against."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    q, k, v, beta = (x.to(dt) for x in (q, k, v, beta))
    q = q * scale
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(dt).exp()[..., None, None]
        kt = k[:, t].unsqueeze(-2)                                   # [B, H, 1, K]
        u = beta[:, t, :, None, None] * (v[:, t].unsqueeze(-2) - kt @ S)  # [B, H, 1, V]
        S = S + kt.transpose(-1, -2) @ u
        outs.append((q[:, t].unsqueeze(-2) @ S).squeeze(-2))          # read after the update
    o = torch.stack(outs, dim=1)
    return o, (S if output_final_state else None)


def chunked_core(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size):
    """Chunkwise WY form (module docstring), all chunks' local terms at once, a short loop for S.

    Within a chunk (rows i, j; gamma = cumsum of g inside the chunk, Gam_ij = exp(gamma_i - gamma_j) for i >= j):
        L = strict_lower(diag(beta) (K K^T * Gam)),   (I + L) [U | W] = diag(beta) [V | K e^gamma]
        V_new = U - W S0
        O     = (Q̂ e^gamma) S0 + (Q̂ K^T * Gam) V_new
        S_C   = e^{gamma_C} S0 + (K e^{gamma_C - gamma})^T V_new
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    q, k, v, beta = (to_chunks(x, dt, N, C) for x in (q, k, v, beta))
    q = q * scale

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    kk = k @ k.transpose(-1, -2)                                     # [B, H, N, C, C]
    qk = q @ k.transpose(-1, -2)
    if g is None:
        L = (beta[..., None] * kk).masked_fill(~strict, 0)
        rhs = torch.cat([v, k], dim=-1) * beta[..., None]
        P = qk.masked_fill(~incl, 0)
        q_in, k_out, decay = q, k, None
    else:
        gam = to_chunks(g, dt, N, C).cumsum(-1)                     # [B, H, N, C]
        # mask before exp: above the diagonal gamma_i - gamma_j > 0 could overflow
        Gam = (gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf")).exp()
        L = (beta[..., None] * kk * Gam).masked_fill(~strict, 0)
        eg = gam.exp()[..., None]
        rhs = torch.cat([v, k * eg], dim=-1) * beta[..., None]
        P = qk * Gam
        g_last = gam[..., -1:]                                       # [B, H, N, 1]
        q_in = q * eg
        k_out = k * (g_last - gam).exp()[..., None]
        decay = g_last.exp()[..., None]                              # [B, H, N, 1, 1]
    eye = torch.eye(C, dtype=dt, device=q.device)
    UW = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True)
    U, W = UW.split([V, K], dim=-1)

    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    starts, v_new = [], []
    # per-chunk views by unbind, not x[:, :, n]: the backward of N selects writes N full-size gradient
    # tensors (quadratic in T); unbind's backward is one stack
    Us, Ws, Ks = U.unbind(2), W.unbind(2), k_out.transpose(-1, -2).unbind(2)
    Ds = decay.unbind(2) if decay is not None else None
    for n in range(N):  # only the state recurrence is sequential
        starts.append(S)
        vn = Us[n] - Ws[n] @ S
        v_new.append(vn)
        S = (S if Ds is None else S * Ds[n]) + Ks[n] @ vn
    o = q_in @ torch.stack(starts, dim=2) + P @ torch.stack(v_new, dim=2)  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def lean_chunked_core(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size):
    """chunked_core for the dispatchers' PyTorch path. At long context under autograd it keeps only its
    inputs for the backward and recomputes the rest there (torch.utils.checkpoint), as FLA's kernels
    recompute their chunk matrices: otherwise the float32 [C, C] matrices of every chunk and head are
    kept, ~2 KB per token and head in each layer (tens of GB for a small model at batch 4 and 64k tokens).
    Same numbers either way; short training contexts keep the faster path."""
    if q.shape[1] >= RECOMPUTE_FROM and needs_backward(q, k, v, beta, g, initial_state):
        return checkpoint(chunked_core, q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size,
                          use_reentrant=False)
    return chunked_core(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)


# ---------------------------------------------------------------------------------------------------
# Public DeltaNet API
# ---------------------------------------------------------------------------------------------------

def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         scale: float | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token delta rule (the oracle). float32 compute for 16-bit inputs, float64 for float64."""
    check_inputs("delta_rule_recurrent", q, k, v, beta, None, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = recurrent_core(q, k, v, beta, None, scale, initial_state, output_final_state)
    return o.to(q.dtype), S


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       scale: float | None = None, initial_state: torch.Tensor | None = None,
                       output_final_state: bool = False,
                       chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) delta rule in differentiable PyTorch; any T, loops only over chunks."""
    check_inputs("delta_rule_chunked", q, k, v, beta, None, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = chunked_core(q, k, v, beta, None, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def fla_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = 64) -> list[str]:
    """Reasons FLA's chunk kernels cannot take these inputs (empty when they can)."""
    reasons = []
    if q.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"{q.dtype} inputs (FLA's delta-family chunk kernels take bfloat16/float16)")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"mixed q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[-1] > FLA_MAX_K:
        reasons.append(f"key head dim {q.shape[-1]} > {FLA_MAX_K}")
    if chunk_size is not None and chunk_size not in FLA_CHUNK_SIZES:
        reasons.append(f"chunk_size={chunk_size} (FLA takes {FLA_CHUNK_SIZES})")
    return reasons


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               scale: float | None = None, initial_state: torch.Tensor | None = None,
               output_final_state: bool = False, qk_l2norm: bool = True, backend: str = "auto",
               chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet op: FLA's Triton kernels on CUDA (bf16/fp16), the PyTorch chunked/recurrent form otherwise.

    qk_l2norm normalises q and k over the head dim as FLA does (x / sqrt(sum x^2 + 1e-6)).
    Returns o `[B, T, H, V]` in q's dtype and, if asked, the final state `[B, H, K, V]` in float32
    (float64 for float64 inputs on the PyTorch path).
    """
    check_inputs("delta_rule", q, k, v, beta, None, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    reasons = fla_unsupported(q, k, v, chunk_size)
    if resolve(backend, q, "delta_rule", "; ".join(reasons) or None) == "fla":
        return _fla_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, qk_l2norm, chunk_size)
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if q.shape[1] == 1:  # decode step: the recurrence is cheapest
        o, S = recurrent_core(q, k, v, beta, None, scale, initial_state, output_final_state)
    else:
        o, S = lean_chunked_core(q, k, v, beta, None, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def _fla_delta_rule(q, k, v, beta, scale, initial_state, output_final_state, qk_l2norm, chunk_size):
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule  # optional dependency (CUDA only)

    h0 = initial_state.float() if initial_state is not None else None
    beta = beta.to(q.dtype)
    if q.shape[1] == 1 and not needs_backward(q, k, v, beta, initial_state):
        o, S = fused_recurrent_delta_rule(q, k, v, beta=beta, scale=scale, initial_state=h0,
                                          output_final_state=output_final_state,
                                          use_qk_l2norm_in_kernel=qk_l2norm)
    else:
        o, S = chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=h0,
                                output_final_state=output_final_state,
                                use_qk_l2norm_in_kernel=qk_l2norm, chunk_size=chunk_size)
    return o.to(q.dtype), (S.float() if S is not None else None)
