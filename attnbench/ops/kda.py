"""Kimi Delta Attention's rule (Kimi Linear, 2025): the gated delta rule with a decay per key channel.

Layouts as the rest of the delta family: q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`
(post-sigmoid), g `[B, T, H, K]` the log-decay (<= 0) of every key channel, state `[B, H, K, V]`
(key-major). Per token, with alpha_t = exp(g_t) in R^K and q̂ = scale * q (scale = K^-1/2):

    S~ = Diag(alpha_t) S_{t-1},   u_t = beta_t (v_t - S~^T k_t),   S_t = S~ + k_t u_t^T,   o_t = S_t^T q̂_t

i.e. S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T (FLA's naive_recurrent_kda:
decay the rows of S, then the delta update, then read out). Gated DeltaNet is the case alpha_t = a_t 1
(one decay per head); KDA forgets each key channel at its own data-dependent rate, as GLA does, and
keeps the delta rule's overwrite.

Chunked WY form. Inside a chunk of C rows starting from S0, let gamma_i in R^K be the cumulative sum
of g over rows <= i and Gam_i = Diag(e^{gamma_i}). Unrolling gives S_i = Gam_i (S0 + sum_{j<=i}
Gam_j^{-1} k_j u_j^T), hence, with the per-channel decayed products

    A^kk_ij = sum_d k_id k_jd e^{gamma_id - gamma_jd},   A^qk_ij = sum_d q̂_id k_jd e^{gamma_id - gamma_jd}

    L = strict_lower(diag(beta) A^kk),   (I + L) [U | W] = diag(beta) [V | K ⊙ e^gamma]
    V_new = U - W S0
    O     = (Q̂ ⊙ e^gamma) S0 + lower(A^qk) V_new
    S_C   = Diag(e^{gamma_C}) S0 + (K ⊙ e^{gamma_C - gamma})^T V_new

Unlike the scalar gate, e^{gamma_id - gamma_jd} does not factor into a row and a column matrix
without overflow (e^{-gamma_j} grows without bound over a chunk), so the products are taken in
sub-blocks of SUB rows: between two sub-blocks I > J, with r = gamma at the last row of J,
e^{gamma_i - gamma_j} = e^{gamma_i - r} e^{r - gamma_j}, both factors <= 1 (g <= 0), one matrix
product per pair; inside a diagonal sub-block the factor is formed per pair (SUB x SUB x K numbers).
Every factor is exact, so the chunked form equals the recurrence to rounding for any chunk size.

Argument order is always (q, k, v, g, beta). FLA 0.6.0's kernels (fla.ops.kda): chunk_kda for
prefill and training (chunk sizes 32 and 64), fused_recurrent_kda (forward only) for decode steps.
Their backward does not go through chunk_bwd_dqkwg, the step FLA refuses on Hopper with
3.4 <= triton < 3.7.1 (FLA #640): it has its own fused kernel (chunk_kda_bwd_wy_dqkg_fused, on
TileLang where FLA finds it installed) and FLA raises nothing on Hopper; docs/mixers.md says what a
GPU run has to confirm.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import AttnbenchError
from ._l2norm import compute_dtype, l2norm, needs_backward
from .backend import resolve
from .chunking import to_chunks
from .delta_rule import RECOMPUTE_FROM, fla_unsupported
from .delta_rule import check_inputs as delta_check_inputs

KDA_CHUNK_SIZES = (32, 64)  # chunk_kda raises for any other chunk size
SUB = 8  # rows per sub-block of the PyTorch chunked form (module docstring)


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor, initial_state: torch.Tensor | None = None) -> None:
    """The delta family's shape checks (delta_rule.check_inputs), with a log-decay per key channel."""
    delta_check_inputs(op, q, k, v, beta, None, initial_state)
    if g.shape != q.shape:
        raise AttnbenchError(f"{op}: g must be [B, T, H, K] = {tuple(q.shape)} (a log-decay per key channel), "
                             f"got {tuple(g.shape)}")


# ---------------------------------------------------------------------------------------------------
# PyTorch cores
# ---------------------------------------------------------------------------------------------------

def recurrent_core(q, k, v, g, beta, scale, initial_state, output_final_state):
    """The literal recurrence, one token at a time (the oracle)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    q = q * scale
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]                                  # Diag(alpha_t) S
        kt = k[:, t].unsqueeze(-2)                                        # [B, H, 1, K]
        u = beta[:, t, :, None, None] * (v[:, t].unsqueeze(-2) - kt @ S)  # [B, H, 1, V]
        S = S + kt.transpose(-1, -2) @ u
        outs.append((q[:, t].unsqueeze(-2) @ S).squeeze(-2))              # read after the update
    o = torch.stack(outs, dim=1)
    return o, (S if output_final_state else None)


def decayed_products(rows: tuple[torch.Tensor, ...], k: torch.Tensor, gam: torch.Tensor,
                     sub: int) -> list[torch.Tensor]:
    """For each a in rows: M_ij = sum_d a_id k_jd e^{gam_id - gam_jd} for j <= i, 0 above: [..., C, C].

    a, k, gam `[..., C, K]`, gam non-increasing along C (a cumulative log-decay), C a multiple of sub.
    Off the diagonal sub-blocks each factor is <= 1 (module docstring); inside them the factor is formed
    per pair with the exponent masked before exp, so nothing overflows. The decay factors are formed once
    for all the row tensors (K K^T and Q K^T share them).
    """
    *lead, C, K = k.shape
    nb = C // sub
    gb = gam.reshape(*lead, nb, sub, K)
    ref = gb[..., -1, :]                                                  # [..., nb, K]: last row of each block
    # between blocks: rows i of every block against block J, through the reference point of J
    row_block = torch.arange(C, device=k.device) // sub
    later = row_block[:, None] > torch.arange(nb, device=k.device)[None, :]  # [C, nb]: block(i) > J
    row_dec = (gam[..., :, None, :] - ref[..., None, :, :]).masked_fill(~later[..., None], float("-inf")).exp()
    k_dec = k.reshape(*lead, nb, sub, K) * (ref[..., None, :] - gb).exp()  # [..., nb, sub, K]
    # inside each diagonal block: the exact per-pair factor [..., nb, sub, sub, K]
    keep = torch.ones(sub, sub, dtype=torch.bool, device=k.device).tril()
    e = (gb[..., :, None, :] - gb[..., None, :, :]).masked_fill(~keep[..., None], float("-inf")).exp()
    ke = e * k.reshape(*lead, nb, 1, sub, K)
    eye = torch.eye(nb, dtype=k.dtype, device=k.device)[:, None, :, None]  # [I, 1, J, 1]: I == J
    out = []
    for a in rows:
        M = torch.einsum("...iJd,...Jjd->...iJj", a[..., :, None, :] * row_dec, k_dec)
        diag = (a.reshape(*lead, nb, sub, 1, K) * ke).sum(-1)            # [..., nb, sub, sub]
        # the diagonal blocks of M are zero (masked above): add each one in place
        out.append((M.reshape(*lead, nb, sub, nb, sub) + diag.unsqueeze(-2) * eye).reshape(*lead, C, C))
    return out


def chunked_core(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    """Chunkwise WY form (module docstring): all chunks' local terms at once, a short loop for S."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    T_sub = -(-T // SUB) * SUB
    C = min(chunk_size, T_sub)
    sub = SUB if C % SUB == 0 else C
    N = -(-T // C)
    q, k, v, g = (to_chunks(x, dt, N, C) for x in (q, k, v, g))
    beta = to_chunks(beta, dt, N, C)
    q = q * scale
    gam = g.cumsum(-2)                                                    # [B, H, N, C, K]

    Akk, P = decayed_products((k, q), k, gam, sub)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    L = (Akk * beta[..., None]).masked_fill(~strict, 0)
    eg = gam.exp()
    rhs = torch.cat([v, k * eg], dim=-1) * beta[..., None]
    eye = torch.eye(C, dtype=dt, device=q.device)
    UW = torch.linalg.solve_triangular(L + eye, rhs, upper=False, unitriangular=True)
    U, W = UW.split([V, K], dim=-1)
    g_last = gam[..., -1:, :]                                             # [B, H, N, 1, K]
    k_out = k * (g_last - gam).exp()
    decay = g_last.transpose(-1, -2).exp()                                # [B, H, N, K, 1]

    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    starts, v_new = [], []
    # unbind, not x[:, :, n]: each select's backward would write a full-size gradient (quadratic in T)
    Us, Ws, Ks, Ds = U.unbind(2), W.unbind(2), k_out.transpose(-1, -2).unbind(2), decay.unbind(2)
    for n in range(N):  # only the state recurrence is sequential
        starts.append(S)
        vn = Us[n] - Ws[n] @ S
        v_new.append(vn)
        S = S * Ds[n] + Ks[n] @ vn
    o = (q * eg) @ torch.stack(starts, dim=2) + P @ torch.stack(v_new, dim=2)  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def lean_chunked_core(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    """chunked_core for the dispatcher: from RECOMPUTE_FROM tokens under autograd it keeps only its inputs
    and recomputes the chunk matrices in the backward (as delta_rule.lean_chunked_core, for the same
    reason: the per-chunk matrices of every head would otherwise dominate memory at long context)."""
    if q.shape[1] >= RECOMPUTE_FROM and needs_backward(q, k, v, g, beta, initial_state):
        return checkpoint(chunked_core, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                          use_reentrant=False)
    return chunked_core(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def kda_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token KDA (the oracle); float32 compute for 16-bit inputs, float64 for float64."""
    check_inputs("kda_recurrent", q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = recurrent_core(q, k, v, g, beta, scale, initial_state, output_final_state)
    return o.to(q.dtype), S


def kda_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                scale: float | None = None, initial_state: torch.Tensor | None = None,
                output_final_state: bool = False, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) KDA in differentiable PyTorch; any T, any chunk size."""
    check_inputs("kda_chunked", q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = chunked_core(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def kda_fla_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int) -> list[str]:
    """Reasons FLA's KDA kernels cannot take these inputs (empty when they can)."""
    reasons = fla_unsupported(q, k, v, None)
    if chunk_size not in KDA_CHUNK_SIZES:
        reasons.append(f"chunk_size={chunk_size} (FLA's chunk_kda takes {KDA_CHUNK_SIZES})")
    return reasons


def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
        scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
        qk_l2norm: bool = True, backend: str = "auto",
        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA op: FLA's kernels on CUDA (bf16/fp16), the PyTorch chunked/recurrent form otherwise.

    qk_l2norm normalises q and k over the head dim as FLA does. Returns o `[B, T, H, V]` in q's dtype and,
    if asked, the final state `[B, H, K, V]` in float32 (float64 for float64 inputs on the PyTorch path).
    """
    check_inputs("kda", q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    reasons = kda_fla_unsupported(q, k, v, chunk_size)
    if resolve(backend, q, "kda", "; ".join(reasons) or None) == "fla":
        return _fla_kda(q, k, v, g, beta, scale, initial_state, output_final_state, qk_l2norm, chunk_size)
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if q.shape[1] == 1:  # decode step: the recurrence is cheapest
        o, S = recurrent_core(q, k, v, g, beta, scale, initial_state, output_final_state)
    else:
        o, S = lean_chunked_core(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def _fla_kda(q, k, v, g, beta, scale, initial_state, output_final_state, qk_l2norm, chunk_size):
    from fla.ops.kda import chunk_kda, fused_recurrent_kda  # optional dependency (CUDA only)

    h0 = initial_state.float() if initial_state is not None else None
    g, beta = g.float(), beta.to(q.dtype)
    # the gate arrives computed (use_gate_in_kernel=False) and beta post-sigmoid, as on the PyTorch path
    if q.shape[1] == 1 and not needs_backward(q, k, v, g, beta, initial_state):
        o, S = fused_recurrent_kda(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0,
                                   output_final_state=output_final_state, use_qk_l2norm_in_kernel=qk_l2norm)
    else:
        o, S = chunk_kda(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0,
                         output_final_state=output_final_state, use_qk_l2norm_in_kernel=qk_l2norm,
                         chunk_size=chunk_size)
    return o.to(q.dtype), (S.float() if S is not None else None)


# fused_recurrent_kda (the decode kernel) is not compiler-disabled in FLA 0.6.0 (chunk_kda is): keep Dynamo
# out of its Triton launch, as ops/gated_delta_rule.py does
_fla_kda = torch.compiler.disable(_fla_kda)
