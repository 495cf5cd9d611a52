"""FLA's gated chunk backward on Hopper with triton 3.4-3.7.0: one chunk-local step in PyTorch.

FLA 0.6.0 refuses `chunk_bwd_dqkwg` with a gate on Hopper when 3.4 <= triton < 3.7.1 (FLA issue #640:
Triton miscompiles a transpose in that kernel there; dbeta and dg come out wrong), and with it the whole
backward of Gated DeltaNet and Gated DeltaProduct. That step is local to each chunk once the chunk-start
states h and the gradients dh of the chunk-end states are known, so it is a handful of batched matmuls.
`install()` puts `dqkwg` below where FLA's gated backward looks the step up
(`fla.ops.gated_delta_rule.chunk`, which Gated DeltaProduct's backward calls too), for gated calls only;
the forward, both state recurrences and the WY backward stay on FLA's kernels.

The maths, per chunk with positions i, j, G the chunk-local cumsum of the log-decay (FLA passes it in
log2 units), L the chunk's last position, h the chunk-start state [K, V], dh the gradient of the
chunk-end state, v the corrected values (v_new = u - w h) and dv their gradient:

    o_i   = scale (e^{G_i} q_i h + sum_{j<=i} (q_i . k_j) e^{G_i - G_j} v_j)
    h_end = e^{G_L} h + sum_j e^{G_L - G_j} k_j v_j^T

    ds_ij = scale (do_i . v_j) e^{G_i - G_j}  (j <= i)
    dq_i  = scale e^{G_i} h do_i + sum_j ds_ij k_j
    dk_j  = e^{G_L - G_j} dh v_j + sum_i ds_ij q_i
    dw_i  = -h dv_i
    dG_i  = q_i . dq_i - k_i . dk_i,  and at i = L also + e^{G_L} <h, dh> + sum_j e^{G_L - G_j} k_j . (dh v_j)

(dG is the gradient of the cumsum values; FLA adds the WY part and reverse-cumsums it afterwards.)
"""
from __future__ import annotations

import inspect
import logging
import math

import torch

log = logging.getLogger("attnbench.ops")

# the signature of fla.ops.common.chunk_o.chunk_bwd_dqkwg in the FLA versions this replacement was
# written against (0.6.0); any other signature means another contract, and nothing is installed
_SIGNATURE = ("q", "k", "v", "do", "h", "dh", "w", "g", "g_gamma", "dv", "scale", "state_v_first", "cu_seqlens",
              "chunk_size", "chunk_indices")
_MARK = "_attnbench_dqkwg"


def dqkwg(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, h: torch.Tensor,
          dh: torch.Tensor, w: torch.Tensor, g: torch.Tensor, dv: torch.Tensor, scale: float,
          chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dw, dg of FLA's gated chunk step (module docstring), all chunks at once, in float32 (float64 for
    float64 inputs).

    Layouts as FLA's: q, k, w, do-sized `[B, T, H, K]` / `[B, T, H, V]` (time-major), g `[B, T, H]`
    (chunk-local cumsum, log2 units), h and dh `[B, N, H, K, V]` with N = ceil(T / chunk_size).
    Returns dq, dk in q's dtype, dw in w's dtype, dg float32 `[B, T, H]`.
    """
    B, T, H, K = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    dt = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # FLA's backward re-enters the forward's autocast
        def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, N, C, H, D] in dt, zero-padded
            x = x.to(dt)
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
            return x.view(B, N, C, H, x.shape[-1])

        qc, kc, vc, doc, dvc = (chunks(x) for x in (q, k, v, do, dv))
        G = g.to(dt) * math.log(2.0)
        if pad:  # repeat the last real value: then G[:, :, -1] is each chunk's G_L, and padded rows add 0
            G = torch.cat([G, G[:, -1:].expand(B, pad, H)], 1)
        G = G.view(B, N, C, H)
        hf, dhf = h.to(dt), dh.to(dt)                              # [B, N, H, K, V]
        G_last = G[:, :, -1:]                                         # [B, N, 1, H]

        # intra-chunk scores' gradient, masked before exp (above the diagonal G_i - G_j can overflow)
        Gh = G.transpose(2, 3)                                        # [B, N, H, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay = (Gh[..., :, None] - Gh[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        ds = torch.einsum("bnihv,bnjhv->bnhij", doc, vc) * decay * scale

        dq = torch.einsum("bnchv,bnhkv->bnchk", doc, hf) * (G.exp() * scale)[..., None]
        dq = dq + torch.einsum("bnhij,bnjhk->bnihk", ds, kc)
        dk_state = torch.einsum("bnchv,bnhkv->bnchk", vc, dhf) * (G_last - G).exp()[..., None]
        dk = dk_state + torch.einsum("bnhij,bnihk->bnjhk", ds, qc)
        dw = -torch.einsum("bnchv,bnhkv->bnchk", dvc, hf)

        dg = (qc * dq).sum(-1) - (kc * dk).sum(-1)                    # [B, N, C, H]
        dg_last = G_last[:, :, 0].exp() * (hf * dhf).sum((-1, -2)) + (kc * dk_state).sum((2, 4))  # [B, N, H]
        dg[:, :-1, -1] += dg_last[:, :-1]  # every chunk but the last ends at a full chunk
        dg = dg.reshape(B, N * C, H)
        dg[:, T - 1] += dg_last[:, -1]

    def unchunk(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # contiguous, as FLA's (its l2norm_bwd views)
        return x.reshape(B, N * C, H, x.shape[-1])[:, :T].to(dtype).contiguous()

    return unchunk(dq, q.dtype), unchunk(dk, k.dtype), unchunk(dw, w.dtype), dg[:, :T].float().contiguous()


def install() -> bool:
    """Route FLA's gated chunk_bwd_dqkwg to `dqkwg` (ungated, varlen, GQA and value-first calls still go
    to FLA's). True when installed (or already); False when this FLA's step has another signature."""
    import fla.ops.gated_delta_rule.chunk as gated_chunk  # optional dependency (CUDA only)

    original = gated_chunk.chunk_bwd_dqkwg
    if getattr(original, _MARK, False):
        return True
    if tuple(inspect.signature(original).parameters) != _SIGNATURE:
        log.warning("FLA's chunk_bwd_dqkwg has an unknown signature; its gated backward is not replaced")
        return False

    def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
        if g is None or w is None or dv is None or g_gamma is not None or state_v_first \
                or cu_seqlens is not None or v.shape[2] != k.shape[2]:
            return original(q, k, v, do, h, dh, w=w, g=g, g_gamma=g_gamma, dv=dv, scale=scale,
                            state_v_first=state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                            chunk_indices=chunk_indices)
        return dqkwg(q, k, v, do, h, dh, w, g, dv, q.shape[-1] ** -0.5 if scale is None else scale, chunk_size)

    setattr(chunk_bwd_dqkwg, _MARK, True)
    gated_chunk.chunk_bwd_dqkwg = chunk_bwd_dqkwg
    return True
