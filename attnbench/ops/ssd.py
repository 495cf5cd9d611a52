"""Mamba-2's state-space duality (SSD) op: a linear recurrence with one scalar decay per head.

Per head h (heads share B and C: one group), with x_t in R^P (P = head dim), B_t, C_t in R^N
(N = d_state), dt_t > 0 and A_h < 0:

    S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T        S_t in R^{N x P}
    y_t = S_t^T C_t

(the paper lays the state out as [P, N]; [N, P] here is FLA's [K, V]). The D skip (y + D x) belongs to
the block (mixers/mamba2.py), not to this op.

Chunked ("block") form. Split the sequence into chunks of c tokens; inside a chunk, with
a_i = sum_{s<=i} dt_s A (the chunk-local cumulative log-decay, <= 0), L_ij = exp(a_i - a_j) for i >= j
(0 above the diagonal) and u_j = dt_j x_j:

    Y      = (C B^T ⊙ L) U  +  diag(exp(a)) C S_0                  (intra-chunk + from the carried state)
    S_end  = exp(a_c) S_0 + (B ⊙ exp(a_c - a))^T U                   (the state passed to the next chunk)

C B^T is one c x c product per chunk shared by every head (one group); the decay mask L is per head.
The chunk states are passed on sequentially (one elementwise step per chunk); everything else is
batched over chunks. T is zero-padded to a multiple of c: a padded row has u = 0 and a = 0, so it
changes neither the state nor the real outputs.

FLA mapping. FLA 0.6.0 has no SSD op, but its scalar-decay linear attention (fla.ops.simple_gla)
computes S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t with a per-head log-decay g
`[B, T, H]`, state `[B, H, K, V]`. The SSD recurrence is that with

    q = C (each head),  k = B (each head),  v = dt * x,  g = dt * A,  scale = 1

(`simple_gla_inputs`), i.e. `chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=S0,
output_final_state=..., chunk_size=c)` for prefill and training and `fused_recurrent_simple_gla` with the
same arguments for a decode step. tests/ops/test_ssd.py checks the mapping against the float64 SSD
recurrence through a literal simple_gla recurrence (and FLA's own naive one where fla is installed);
tests/gpu/test_mamba2_gpu.py checks FLA's kernels.

FLA's chunk backward for a gated call (chunk_bwd_dqkwg) is refused on Hopper with 3.4 <= triton < 3.7.1
(FLA issue #640), as for the gated delta rule. Where attnbench replaces that step for the gated delta
rule (backend.gated_backward_route() == TORCH_DQKWG, ops/fla_gated_bwd.py), the same PyTorch step is
routed in for simple_gla's backward (`install_simple_gla_dqkwg`); where no route exists a call that needs
a backward runs the PyTorch op under backend='auto' and raises under backend='fla'.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..errors import AttnbenchError
from . import fla_gated_bwd
from ._l2norm import needs_backward
from .backend import TORCH_DQKWG, gated_backward_route, resolve
from .delta_rule import FLA_CHUNK_SIZES, FLA_MAX_K

HOPPER_REASON = ("FLA's gated chunk backward (chunk_bwd_dqkwg, used by simple_gla) raises on Hopper with "
                 "triton < 3.7.1 (FLA issue #640) and no replacement of that step is usable here; upgrade "
                 "triton to >= 3.7.1")


def check_inputs(op: str, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 initial_state: torch.Tensor | None = None) -> None:
    """x [b, T, H, P], dt [b, T, H], A [H], B and C [b, T, N], initial_state [b, H, N, P]."""
    if x.dim() != 4:
        raise AttnbenchError(f"{op}: x must be [B, T, H, P], got shape {tuple(x.shape)}")
    b, T, H, P = x.shape
    if dt.shape != (b, T, H):
        raise AttnbenchError(f"{op}: dt must be [B, T, H] = {(b, T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise AttnbenchError(f"{op}: A must be [H] = ({H},), got {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[:2] != (b, T):
        raise AttnbenchError(f"{op}: B must be [B, T, N] = [{b}, {T}, N], got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise AttnbenchError(f"{op}: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    N = B.shape[-1]
    if initial_state is not None and initial_state.shape != (b, H, N, P):
        raise AttnbenchError(f"{op}: initial_state must be [B, H, N, P] = {(b, H, N, P)}, "
                             f"got {tuple(initial_state.shape)}")


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence token by token, literally (the oracle; float64-capable). Returns y [b, T, H, P] in
    x's dtype and the final state [b, H, N, P] (float32, float64 for float64 inputs) if asked."""
    check_inputs("ssd_recurrent", x, dt, A, B, C, initial_state)
    b, T, H, P = x.shape
    N = B.shape[-1]
    wt = _state_dtype(x)
    S = (initial_state.to(wt) if initial_state is not None else x.new_zeros(b, H, N, P, dtype=wt))
    ys = []
    for t in range(T):
        dA = torch.exp(dt[:, t].to(wt) * A.to(wt))                                 # [b, H]
        upd = dt[:, t, :, None, None].to(wt) * B[:, t, None, :, None].to(wt) * x[:, t, :, None, :].to(wt)
        S = dA[..., None, None] * S + upd                                          # [b, H, N, P]
        ys.append(torch.einsum("bn,bhnp->bhp", C[:, t].to(wt), S))
    y = torch.stack(ys, 1) if ys else x.new_zeros(b, 0, H, P, dtype=wt)
    return y.to(x.dtype), (S if output_final_state else None)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked (block) SSD form of the module docstring in differentiable PyTorch; any T. Computes in
    float32 (float64 for float64 inputs); y in x's dtype."""
    check_inputs("ssd_chunked", x, dt, A, B, C, initial_state)
    return _chunked(x, dt, A, B, C, initial_state, output_final_state, chunk_size)


def _chunked(x, dt, A, B, C, initial_state, output_final_state, chunk_size):
    b, T, H, P = x.shape
    N = B.shape[-1]
    wt = _state_dtype(x)
    c = max(1, min(chunk_size, T))
    n = -(-T // c)
    pad = n * c - T
    u = x.to(wt) * dt.to(wt)[..., None]                                            # [b, T, H, P]
    a = dt.to(wt) * A.to(wt)                                                        # [b, T, H] log-decay
    Bw, Cw = B.to(wt), C.to(wt)
    if pad:  # padded rows: u = 0, a = 0 (no decay, no update), B = C = 0
        u, Bw, Cw = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (u, Bw, Cw))
        a = F.pad(a, (0, 0, 0, pad))
    u = u.view(b, n, c, H, P)
    Bc, Cc = Bw.view(b, n, c, N), Cw.view(b, n, c, N)
    acum = a.view(b, n, c, H).cumsum(2).transpose(2, 3)                             # [b, n, H, c]
    causal = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
    # masked before exp: above the diagonal a_i - a_j > 0 can overflow
    L = (acum[..., :, None] - acum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [b, n, H, c, c]
    CB = torch.einsum("bnis,bnjs->bnij", Cc, Bc)                                    # [b, n, c, c], all heads
    y = torch.einsum("bnhij,bnjhp->bnihp", CB[:, :, None] * L, u)                   # intra-chunk
    # each chunk's own contribution to its end state, then the states passed from chunk to chunk
    a_last = acum[..., -1]                                                          # [b, n, H]
    u_end = u * (a_last[..., None] - acum).exp().transpose(2, 3)[..., None]        # decayed to the chunk end
    local = torch.einsum("bnjs,bnjhp->bnhsp", Bc, u_end)                            # [b, n, H, N, P]
    S = initial_state.to(wt) if initial_state is not None else x.new_zeros(b, H, N, P, dtype=wt)
    starts = []
    decay = a_last.exp()
    for i in range(n):
        starts.append(S)
        S = decay[:, i, :, None, None] * S + local[:, i]
    S0 = torch.stack(starts, 1)                                                     # [b, n, H, N, P]
    y = y + torch.einsum("bnis,bnhsp->bnihp", Cc, S0) * acum.exp().transpose(2, 3)[..., None]
    y = y.reshape(b, n * c, H, P)[:, :T]
    return y.to(x.dtype), (S if output_final_state else None)


def simple_gla_inputs(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SSD inputs as FLA's simple_gla takes them (module docstring): q = C and k = B on every head
    `[b, T, H, N]`, v = dt * x `[b, T, H, P]` (x's dtype), g = dt * A `[b, T, H]` (float32 at least); scale 1."""
    H = x.shape[2]
    q = C[:, :, None, :].expand(-1, -1, H, -1).to(x.dtype)
    k = B[:, :, None, :].expand(-1, -1, H, -1).to(x.dtype)
    v = (x * dt[..., None]).to(x.dtype)  # one rounding to x's dtype, after the product
    g = dt.to(_state_dtype(dt)) * A.to(_state_dtype(dt))
    return q, k, v, g


def fla_unsupported(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> list[str]:
    """Reasons FLA's simple_gla kernels cannot take this call (empty when they can)."""
    reasons = []
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"{x.dtype} inputs (FLA's simple_gla kernels take bfloat16/float16)")
    if B.shape[-1] > FLA_MAX_K:
        reasons.append(f"d_state {B.shape[-1]} > {FLA_MAX_K}")
    if chunk_size not in FLA_CHUNK_SIZES:
        reasons.append(f"chunk_size={chunk_size} (FLA takes {FLA_CHUNK_SIZES})")
    return reasons


def backward_check(backward: bool, cuda: bool) -> tuple[list[str], str]:
    """For an FLA call: why FLA cannot take it ([] when it can) and the backend label to record."""
    if not (backward and cuda):
        return [], "fla"
    route = gated_backward_route()
    if route == "torch":
        return [HOPPER_REASON], "fla"
    if route == TORCH_DQKWG:
        if not install_simple_gla_dqkwg():
            return [HOPPER_REASON], "fla"
        return [], TORCH_DQKWG
    return [], "fla"  # 'fla', or 'tilelang': FLA's own backend takes the step


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, backend: str = "auto",
        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SSD op: FLA's simple_gla kernels on CUDA (bf16/fp16), the PyTorch form otherwise (the chunked
    form for T > 1, one recurrent step for T == 1). Returns y [b, T, H, P] in x's dtype and, if asked,
    the final state [b, H, N, P] in float32 (float64 for float64 inputs on the PyTorch path)."""
    check_inputs("ssd", x, dt, A, B, C, initial_state)
    backward = needs_backward(x, dt, A, B, C, initial_state)
    refused, label = backward_check(backward, x.is_cuda)
    reasons = fla_unsupported(x, B, chunk_size) + refused
    if resolve(backend, x, "ssd", "; ".join(reasons) or None, fla_label=label) == "fla":
        return _fla_ssd(x, dt, A, B, C, initial_state, output_final_state, chunk_size, backward)
    if x.shape[1] == 1:
        return _step(x, dt, A, B, C, initial_state, output_final_state)
    return _chunked(x, dt, A, B, C, initial_state, output_final_state, chunk_size)


def _step(x, dt, A, B, C, initial_state, output_final_state):
    """One token (T == 1): the recurrence's step, no chunk padding (the decode path; graph-safe)."""
    b, _, H, P = x.shape
    N = B.shape[-1]
    wt = _state_dtype(x)
    S = initial_state.to(wt) if initial_state is not None else x.new_zeros(b, H, N, P, dtype=wt)
    dA = torch.exp(dt[:, 0].to(wt) * A.to(wt))[..., None, None]                     # [b, H, 1, 1]
    u = x[:, 0].to(wt) * dt[:, 0, :, None].to(wt)                                  # [b, H, P]
    S = dA * S + B[:, 0, None, :, None].to(wt) * u[:, :, None, :]
    y = torch.einsum("bn,bhnp->bhp", C[:, 0].to(wt), S)[:, None]
    return y.to(x.dtype), (S if output_final_state else None)


def _fla_ssd(x, dt, A, B, C, initial_state, output_final_state, chunk_size, backward):
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla  # optional dependency (CUDA only)

    q, k, v, g = simple_gla_inputs(x, dt, A, B, C)
    h0 = initial_state.float() if initial_state is not None else None
    g = g.float()
    if x.shape[1] == 1 and not backward:
        o, S = fused_recurrent_simple_gla(q, k, v, g=g, scale=1.0, initial_state=h0,
                                          output_final_state=output_final_state)
    else:
        o, S = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=h0, output_final_state=output_final_state,
                                chunk_size=chunk_size)
    return o.to(x.dtype), (S.float() if S is not None else None)


# FLA's fused_recurrent_simple_gla (the decode kernel) is not compiler-disabled in FLA 0.6.0: keep Dynamo
# out of its Triton launch, as gated_delta_rule.py does.
_fla_ssd = torch.compiler.disable(_fla_ssd)


def install_simple_gla_dqkwg() -> bool:
    """Route simple_gla's gated chunk_bwd_dqkwg (the step FLA refuses on Hopper with triton < 3.7.1) to
    attnbench's PyTorch version (fla_gated_bwd.dqkwg, with zero w and dv: simple_gla has no WY part, so
    dw is dropped). True when installed (or already); False when FLA's step has another signature."""
    import fla.ops.simple_gla.chunk as sg_chunk  # optional dependency (CUDA only)

    original = sg_chunk.chunk_bwd_dqkwg
    if getattr(original, fla_gated_bwd._MARK, False):
        return True
    if tuple(inspect.signature(original).parameters) != fla_gated_bwd._SIGNATURE:
        return False

    def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
        if g is None or w is not None or dv is not None or g_gamma is not None or state_v_first \
                or cu_seqlens is not None or v.shape[2] != k.shape[2]:
            return original(q, k, v, do, h, dh, w=w, g=g, g_gamma=g_gamma, dv=dv, scale=scale,
                            state_v_first=state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                            chunk_indices=chunk_indices)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dq, dk, _, dg = fla_gated_bwd.dqkwg(q, k, v, do, h, dh, k, g, torch.zeros_like(v), scale, chunk_size)
        return dq, dk, None, dg

    setattr(chunk_bwd_dqkwg, fla_gated_bwd._MARK, True)
    sg_chunk.chunk_bwd_dqkwg = chunk_bwd_dqkwg
    return True
