"""Gated Linear Attention (Yang, Wang, Shen, Panda & Kim 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"): linear attention whose state decays at a data-dependent rate per key channel.

Layouts as the delta family's (FLA's): q, k, gk `[B, T, H, K]`, v `[B, T, H, V]`, state `[B, H, K, V]`
(key-major). gk is the log-decay (<= 0), per token, head and key channel. Per token, with
q̂ = scale * q (scale = K^-1/2 by default):

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T,     o_t = S_t^T q̂_t

Row c of S (what key channel c has written) forgets at its own rate exp(gk_t[c]); Gated DeltaNet and
Mamba-2 decay a whole head's state by one scalar, GLA each key channel separately, and it only adds (no
delta-rule correction).

Chunked form. Split the sequence into chunks of C tokens; inside a chunk let b_i = sum_{j<=i} gk_j (per
channel, <= 0 and non-increasing in i). Unrolled from the chunk's start state S0:

    o_i = (q̂_i ⊙ e^{b_i})^T S0 + sum_{j<=i} A_ij v_j,     A_ij = sum_c q̂_ic k_jc e^{b_ic - b_jc}
    S_C = diag(e^{b_C}) S0 + sum_j (k_j ⊙ e^{b_C - b_j}) v_j^T

Every exponent is <= 0 except in the intra-chunk weights A written as one product
(q̂ ⊙ e^{b}) (k ⊙ e^{-b})^T: e^{-b_j} overflows float32 once a chunk's cumulative log-decay passes ~88 in
a channel (1.4 per token at C = 64; with GLA's gate normaliser 16 that is a gate logit below about -22,
which training can reach for a channel that learns to forget fast), and e^{b_i} underflows to 0 there,
giving 0 * inf. So A is built from sub-chunks of c = 16 rows, as FLA's kernels do (secondary chunking):

  * queries of sub-chunk I against keys of earlier sub-chunks: with r_I = b at I's first row,
        A_ij = (q̂_i ⊙ e^{b_i - r_I}) . (k_j ⊙ e^{r_I - b_j})
    where both exponents are <= 0 (b is non-increasing and j comes before I): one matrix product per
    sub-chunk;
  * the diagonal sub-chunk: A_ij = sum_c q̂_ic k_jc e^{b_ic - b_jc} for j <= i, elementwise
    (a [c, c, K] tensor per sub-chunk), every exponent <= 0.

No exponent is ever positive, so the form is stable in float32 for any gate, and it is the recurrence's
sum reordered (exact to it in float64). The state recurrence runs over chunks only.

The FLA path calls `fla.ops.gla.chunk_gla` (training, prefill) and `fused_recurrent_gla` (a decode step
without autograd) with the same layouts, the key-major state (`state_v_first=False`) and the log-decay in
float32; chunk_gla picks its own chunk size (64, or the next power of two >= 16 below 64 tokens), so
`chunk_size` here sets the PyTorch path's only.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import AttnbenchError
from ._l2norm import compute_dtype, needs_backward
from .backend import resolve
from .chunking import to_chunks
from .delta_rule import FLA_MAX_K, RECOMPUTE_FROM, check_state

SUB_CHUNK = 16  # rows per sub-chunk of the intra-chunk weights (FLA's BC)
GLA_CHUNK_SIZES = (16, 32, 64)  # multiples of SUB_CHUNK; 64 is FLA's


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
                 initial_state: torch.Tensor | None = None) -> None:
    """Shape checks; raise AttnbenchError naming the tensor."""
    if q.dim() != 4:
        raise AttnbenchError(f"{op}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise AttnbenchError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if gk.shape != q.shape:
        raise AttnbenchError(f"{op}: gk must have q's shape {tuple(q.shape)} (a log-decay per key channel), "
                             f"got {tuple(gk.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise AttnbenchError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    check_state(op, initial_state, B, H, K, v.shape[-1])


def recurrent_core(q, k, v, gk, scale, initial_state, output_final_state):
    """The literal recurrence, one token at a time: the oracle, and the decode step."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, gk, initial_state)
    q, k, v, gk = (x.to(dt) for x in (q, k, v, gk))
    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        S = S * gk[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(((q[:, t] * scale).unsqueeze(-2) @ S).squeeze(-2))  # read after the update
    o = torch.stack(outs, dim=1)
    return o, (S if output_final_state else None)


def chunk_len(T: int, chunk_size: int) -> int:
    """The chunk the PyTorch path uses: chunk_size, or fewer whole sub-chunks when T is shorter."""
    return min(chunk_size, SUB_CHUNK * -(-T // SUB_CHUNK))


def chunked_core(q, k, v, gk, scale, initial_state, output_final_state, chunk_size):
    """The chunked form of the module docstring: all chunks' local terms at once, a loop over chunks for S."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, gk, initial_state)
    C = chunk_len(T, chunk_size)
    c, N = SUB_CHUNK, -(-T // C)
    n = C // c
    q, k, v, gk = (to_chunks(x, dt, N, C) for x in (q, k, v, gk))
    q = q * scale
    b = gk.cumsum(-2)                                                # [B, H, N, C, K]

    # inter-chunk terms: read of the start state and the state update (exponents <= 0)
    b_last = b[..., -1:, :]                                          # [B, H, N, 1, K]
    q_in = q * b.exp()
    k_out = k * (b_last - b).exp()
    decay = b_last.exp().transpose(-1, -2)                           # [B, H, N, K, 1]: rows of S

    # intra-chunk weights, sub-chunk I against earlier sub-chunks, reference r_I = b at I's first row
    bs = b.view(B, H, N, n, c, K)
    r = bs[..., :1, :]                                               # [B, H, N, n, 1, K]
    qs = q.view(B, H, N, n, c, K) * (bs - r).exp()
    sub = torch.arange(C, device=q.device) // c
    earlier = sub[None, :] < torch.arange(n, device=q.device)[:, None]  # [n, C]: key j before sub-chunk I
    # mask before exp: for keys in or after sub-chunk I the exponent r_I - b_j is >= 0 and could overflow
    k_rel = k.unsqueeze(3) * (r - b.unsqueeze(3)).masked_fill(~earlier[..., None], float("-inf")).exp()
    A = qs @ k_rel.transpose(-1, -2)                                 # [B, H, N, n, c, C]
    # the diagonal sub-chunks, elementwise
    incl = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    E = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill(~incl[..., None], float("-inf")).exp()
    A_diag = (q.view(B, H, N, n, c, 1, K) * E * k.view(B, H, N, n, 1, c, K)).sum(-1)  # [B, H, N, n, c, c]
    eye = torch.eye(n, dtype=dt, device=q.device)
    A = A + (A_diag.unsqueeze(-2) * eye[:, None, :, None]).reshape(B, H, N, n, c, C)
    A = A.reshape(B, H, N, C, C)

    S = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V)
    starts = []
    # per-chunk views by unbind, not x[:, :, n]: the backward of N selects writes N full-size gradients
    Ks, Vs, Ds = k_out.transpose(-1, -2).unbind(2), v.unbind(2), decay.unbind(2)
    for i in range(N):  # only the state recurrence is sequential
        starts.append(S)
        S = S * Ds[i] + Ks[i] @ Vs[i]
    o = q_in @ torch.stack(starts, dim=2) + A @ v                    # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def lean_chunked_core(q, k, v, gk, scale, initial_state, output_final_state, chunk_size):
    """chunked_core for the dispatcher's PyTorch path: at long context under autograd it keeps only its
    inputs for the backward and recomputes the rest there (as FLA's kernels do), instead of every chunk's
    [C, C] weights and [c, c, K] diagonal factors. Same numbers either way."""
    if q.shape[1] >= RECOMPUTE_FROM and needs_backward(q, k, v, gk, initial_state):
        return checkpoint(chunked_core, q, k, v, gk, scale, initial_state, output_final_state, chunk_size,
                          use_reentrant=False)
    return chunked_core(q, k, v, gk, scale, initial_state, output_final_state, chunk_size)


def chunked_gla_flops(T: int, H: int, K: int, V: int, chunk_size: int) -> float:
    """Forward FLOPs (multiply-add = 2) of chunked_core for T tokens; T is padded to whole chunks.

    Per chunk of C rows and head: the start-state read (Q ⊙ e^b) S0 and the update (K ⊙ ..)^T V, 2 x 2CKV;
    the sub-chunk products against the keys, n x 2cCK = 2C^2K; A V, 2C^2V; the diagonal sub-chunks,
    2CcK (elementwise, so FlopCounterMode does not see it: < 0.2% of a layer at the bake-off shapes).
    The exps and masks are elementwise and left out.
    """
    C = chunk_len(T, chunk_size)
    N = -(-T // C)
    per_chunk = 4 * C * K * V + 2 * C * C * K + 2 * C * C * V + 2 * C * SUB_CHUNK * K
    return float(H * N * per_chunk)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float | None = None,
                  initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA (the oracle). float32 compute for 16-bit inputs, float64 for float64."""
    check_inputs("gla_recurrent", q, k, v, gk, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = recurrent_core(q, k, v, gk, scale, initial_state, output_final_state)
    return o.to(q.dtype), S


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float | None = None,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA (secondary chunking) in differentiable PyTorch; any T."""
    check_inputs("gla_chunked", q, k, v, gk, initial_state)
    check_chunk_size("gla_chunked", chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = chunked_core(q, k, v, gk, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def check_chunk_size(op: str, chunk_size: int) -> None:
    if chunk_size not in GLA_CHUNK_SIZES:
        raise AttnbenchError(f"{op}: chunk_size must be one of {GLA_CHUNK_SIZES}, got {chunk_size}")


def fla_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons attnbench does not hand these inputs to FLA's GLA kernels (empty when it does)."""
    reasons = []
    if q.dtype not in (torch.bfloat16, torch.float16):
        # FLA's kernels take float32 too, but Triton's float32 dots default to TF32: float32 runs are
        # attnbench's accuracy references, so they stay on the PyTorch path
        reasons.append(f"{q.dtype} inputs (attnbench runs FLA's GLA kernels in bfloat16/float16)")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"mixed q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[-1] > FLA_MAX_K:
        reasons.append(f"key head dim {q.shape[-1]} > {FLA_MAX_K}")
    return reasons


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, scale: float | None = None,
        initial_state: torch.Tensor | None = None, output_final_state: bool = False, backend: str = "auto",
        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA op: FLA's Triton kernels on CUDA (bf16/fp16), the PyTorch chunked/recurrent form otherwise.

    Returns o `[B, T, H, V]` in q's dtype and, if asked, the final state `[B, H, K, V]` in float32
    (float64 for float64 inputs on the PyTorch path). A T == 1 call is one recurrent step.
    """
    check_inputs("gla", q, k, v, gk, initial_state)
    check_chunk_size("gla", chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    reasons = fla_unsupported(q, k, v)
    if resolve(backend, q, "gla", "; ".join(reasons) or None) == "fla":
        return _fla_gla(q, k, v, gk, scale, initial_state, output_final_state,
                        needs_backward(q, k, v, gk, initial_state))
    if q.shape[1] == 1:  # decode step: the recurrence is cheapest
        o, S = recurrent_core(q, k, v, gk, scale, initial_state, output_final_state)
    else:
        o, S = lean_chunked_core(q, k, v, gk, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def _fla_gla(q, k, v, gk, scale, initial_state, output_final_state, backward):
    from fla.ops.gla import chunk_gla, fused_recurrent_gla  # optional dependency (CUDA only)

    h0 = initial_state.float() if initial_state is not None else None  # chunk_gla asserts a float32 state
    gk = gk.float()
    if q.shape[1] == 1 and not backward:
        # the gate is `gk` here (its `g` is a per-head scalar decay) and `g` in chunk_gla: by keyword
        o, S = fused_recurrent_gla(q, k, v, gk=gk, scale=scale, initial_state=h0,
                                   output_final_state=output_final_state)
    else:
        o, S = chunk_gla(q, k, v, g=gk, scale=scale, initial_state=h0, output_final_state=output_final_state)
    return o.to(q.dtype), (S.float() if S is not None else None)


# fused_recurrent_gla (the decode kernel) is not compiler-disabled in FLA 0.6.0 (chunk_gla is): keep
# Dynamo out of its Triton launch (e.g. a torch.compile'd decode step), as ops/gated_delta_rule.py does.
_fla_gla = torch.compiler.disable(_fla_gla)
