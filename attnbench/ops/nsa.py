"""Native Sparse Attention (NSA), FLA's variant: three causal attention branches summed with gates.

Layouts: q `[B, TQ, HQ, D]`; k, v `[B, TK, H, D]` (G = HQ/H consecutive query heads share a KV head);
gates `[B, TQ, HQ]`, already activated (sigmoid). The TQ queries are the LAST TQ of the TK positions
(query i sits at t = TK - TQ + i), so one function serves the full pass, a prefill continuing a cache
and a decode step. With BS = block_size, S = block_counts, W = window_size, for a query at t:

1. compression: k̄_c, v̄_c = mean of block c (BS tokens; no learned MLP). Only complete blocks are
   visible: c < NC = (t+1) // BS. o_cmp = softmax_c(scale q·k̄_c) v̄_c, and 0 when NC == 0.
2. selection, shared by the G heads of a KV group, no gradient: with IC = t // BS, importance of block
   c < IC is the compressed probability summed over the group's heads. Blocks IC, IC-1 and 0 are always
   kept (in that priority when S is too small for all three), then the most important others, S in all.
3. selected attention: softmax over the tokens j <= t of the selected blocks.
4. sliding window: softmax over j in [t-W+1, t] (W = 0 disables it).
5. o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa.

Over 400 lines because the three branches, the block selection they share and the decode step from a
cache are one algorithm; the float64 reference and the vectorised path are kept side by side so each
line of one can be checked against the other.

Selections are `block_indices` `[B, TQ, H, S]` (block ids, -1 for unused slots), FLA's format; every
function takes an optional `block_indices` that overrides the selection (tests use it to compare
backends on the same selection when bf16 rounding flips near-ties).

Three implementations: `nsa_reference` (literal loops, the oracle), `nsa_torch` (vectorised, dense
masks) and `nsa` (dispatcher: FLA's `parallel_nsa` + `parallel_attn` on CUDA, else `nsa_torch`).
For decoding, `nsa_decode` computes one query against a preallocated cache with the position as a
device tensor (static shapes, no host sync: CUDA-graph safe), from block means the caller keeps
(`nsa_block_means` fills them for a prefill). On CUDA it runs as one Triton kernel per call
(ops/nsa_decode_triton.py) once that kernel has matched the PyTorch step for the shape.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import nsa_decode_triton
from .backend import check_backend, record, resolve, unrecorded

log = logging.getLogger("attnbench.ops")

__all__ = ["nsa", "nsa_torch", "nsa_reference", "nsa_select_blocks", "nsa_decode", "NSADecodePlan",
           "nsa_block_means", "validate_nsa_args", "fla_supported"]

# Bytes of shared memory per block that FLA calls "hopper" class (fla/utils: check_shared_mem('hopper')).
_HOPPER_SHARED_MEM = 232448


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def validate_nsa_args(n_head: int, n_kv_head: int, head_dim: int, block_size: int, block_counts: int,
                      window_size: int) -> None:
    """Raise ConfigError for NSA settings that no backend can run."""
    for name, val in (("n_head", n_head), ("n_kv_head", n_kv_head), ("head_dim", head_dim),
                      ("block_size", block_size), ("block_counts", block_counts), ("window_size", window_size)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise ConfigError(f"NSA {name} must be an int, got {val!r}")
    if n_head < 1 or n_kv_head < 1 or head_dim < 1:
        raise ConfigError(f"NSA needs n_head, n_kv_head, head_dim >= 1 (got {n_head}, {n_kv_head}, {head_dim})")
    if n_head % n_kv_head:
        raise ConfigError(f"NSA n_head={n_head} is not a multiple of n_kv_head={n_kv_head}; "
                          f"set n_kv_head to a divisor of n_head")
    if not _is_pow2(block_size):
        raise ConfigError(f"NSA block_size={block_size} must be a power of two (e.g. 32 or 64)")
    if not _is_pow2(block_counts):
        raise ConfigError(f"NSA block_counts={block_counts} must be a power of two (e.g. 4 or 16): FLA rounds "
                          f"it up to one, so other values would select a different number of blocks per backend")
    if block_size < 2 * block_counts:
        raise ConfigError(f"NSA needs block_size >= 2 * block_counts (got block_size={block_size}, "
                          f"block_counts={block_counts}); raise block_size to {2 * block_counts} or lower block_counts")
    if window_size < 0:
        raise ConfigError(f"NSA window_size={window_size} must be >= 0 (0 disables the sliding-window branch)")


def _fla_max_head_dim(device: torch.device | None = None) -> int:
    """FLA tiles the whole head dim at once: 256 with Hopper-class shared memory, else 128."""
    if not torch.cuda.is_available():
        return 256  # unknown GPU: the call-time check on the real device decides
    idx = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _max_head_dim_of(idx)


@functools.lru_cache(maxsize=None)
def _max_head_dim_of(idx: int) -> int:
    smem = getattr(torch.cuda.get_device_properties(idx), "shared_memory_per_block_optin", 0)
    return 256 if smem >= _HOPPER_SHARED_MEM else 128


def fla_supported(n_head: int, n_kv_head: int, head_dim: int, block_size: int, block_counts: int,
                  device: torch.device | None = None) -> str | None:
    """None if FLA's NSA kernels can run these settings, else the reason (for a warning at construction).

    Dtype (fp16/bf16) and TQ == TK are call-time conditions, checked by `nsa`.
    """
    reasons = []
    G = n_head // max(n_kv_head, 1)
    if n_head % max(n_kv_head, 1) or G < 16 or not _is_pow2(G):
        reasons.append(f"group size n_head/n_kv_head = {n_head}/{n_kv_head} is not a power of two >= 16")
    if not _is_pow2(block_size) or block_size < 16:
        # block_size is a Triton tile dimension of tl.dot, which needs >= 16
        reasons.append(f"block_size={block_size} is not a power of two >= 16")
    if block_size < 2 * (1 << max(block_counts - 1, 0).bit_length()):
        reasons.append(f"block_size={block_size} < 2 * next_pow2(block_counts={block_counts})")
    if block_counts < 4:
        # Blocks 0, IC-1, IC tie at the top score; FLA's sorting network breaks the tie by position
        # (at t=199, BS=16, S=2 it keeps {0, 11}, not the query's own block 12), so with fewer than 3
        # slots its selection differs from ours (own block > previous > block 0).
        reasons.append(f"block_counts={block_counts} < 4 cannot keep all three always-selected blocks, and "
                       f"FLA picks among them arbitrarily (use block_counts >= 4)")
    max_d = _fla_max_head_dim(device)
    if head_dim < 16 or head_dim > max_d:
        reasons.append(f"head_dim={head_dim} is outside [16, {max_d}] (FLA tiles it whole; tl.dot needs >= 16)")
    return "; ".join(reasons) or None


# ----------------------------------------------------------------------------------------------------
# The oracle: one query at a time, literally.
# ----------------------------------------------------------------------------------------------------

def nsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
                  g_swa: torch.Tensor | None, block_size: int, block_counts: int, window_size: int,
                  scale: float | None = None, block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Literal per-query NSA, computed in q's dtype (use float64 for an oracle). Slow: tests only."""
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G, BS, S, W = HQ // H, block_size, block_counts, window_size
    scale = D ** -0.5 if scale is None else scale
    off = TK - TQ
    NF = TK // BS  # complete blocks
    rows = []
    for b in range(B):
        # pooled keys/values of the complete blocks, [NF, H, D]
        kc = [k[b, c * BS:(c + 1) * BS].mean(0) for c in range(NF)]
        vc = [v[b, c * BS:(c + 1) * BS].mean(0) for c in range(NF)]
        for i in range(TQ):
            t = off + i
            NC, IC = (t + 1) // BS, t // BS
            heads = []
            for h in range(H):
                qs = q[b, i, h * G:(h + 1) * G]  # [G, D]
                # 1. compressed attention over complete visible blocks
                if NC > 0:
                    sc = scale * qs @ torch.stack([kc[c][h] for c in range(NC)], 1)  # [G, NC]
                    pc = torch.softmax(sc, -1)
                    o_cmp = pc @ torch.stack([vc[c][h] for c in range(NC)], 0)
                else:
                    pc, o_cmp = None, torch.zeros_like(qs)
                # 2. selection (no gradient)
                if block_indices is not None:
                    sel = [int(c) for c in block_indices[b, i, h].tolist() if c >= 0]
                else:
                    forced = []
                    for c in (IC, IC - 1, 0):
                        if c >= 0 and c not in forced:
                            forced.append(c)
                    imp = {c: float(pc[:, c].detach().sum()) for c in range(IC) if c not in forced}
                    rest = sorted(imp, key=lambda c: (-imp[c], c))
                    sel = (forced + rest)[:S]
                keys = sorted(j for c in sel for j in range(c * BS, min((c + 1) * BS, TK)) if j <= t)
                # 3. selected attention
                idx = torch.tensor(keys, dtype=torch.long, device=q.device)
                p = torch.softmax(scale * qs @ k[b, idx, h].T, -1)
                o_slc = p @ v[b, idx, h]
                # 4. sliding window
                o = g_slc[b, i, h * G:(h + 1) * G, None] * o_slc + g_cmp[b, i, h * G:(h + 1) * G, None] * o_cmp
                if W > 0:
                    lo = max(0, t - W + 1)
                    p = torch.softmax(scale * qs @ k[b, lo:t + 1, h].T, -1)
                    o = o + g_swa[b, i, h * G:(h + 1) * G, None] * (p @ v[b, lo:t + 1, h])
                heads.append(o)
            rows.append(torch.cat(heads, 0))
    return torch.stack(rows, 0).view(B, TQ, HQ, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Vectorised PyTorch version: dense masks, differentiable.
# ----------------------------------------------------------------------------------------------------

def _compressed(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float,
                off: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed branch. qg `[B, TQ, H, G, D]`. Returns (o_cmp `[B, TQ, H, G, D]`, p `[B, H, G, TQ, NF]`)."""
    B, TQ, H, G, D = qg.shape
    TK, BS = k.shape[1], block_size
    NF = TK // BS
    if NF == 0:
        return torch.zeros_like(qg), qg.new_zeros(B, H, G, TQ, 0)
    kc = k[:, :NF * BS].reshape(B, NF, BS, H, -1).mean(2)
    vc = v[:, :NF * BS].reshape(B, NF, BS, H, -1).mean(2)
    s = torch.einsum("bihgd,bchd->bhgic", qg, kc) * scale
    t = torch.arange(TQ, device=qg.device) + off
    visible = (torch.arange(NF, device=qg.device)[None, :] + 1) * BS - 1 <= t[:, None]  # [TQ, NF]
    # rows with no visible block get finite logits, then zero probabilities (no NaN in fwd or bwd)
    empty = ~visible.any(-1, keepdim=True)
    s = s.masked_fill(~(visible | empty), float("-inf"))
    p = torch.softmax(s, -1) * visible
    o = torch.einsum("bhgic,bchd->bihgd", p, vc)
    return o, p


@torch.no_grad()
def _topk_blocks(p: torch.Tensor, TK: int, block_size: int, block_counts: int, off: int) -> torch.Tensor:
    """Selection from compressed probabilities p `[B, H, G, TQ, NF]` -> block_indices `[B, TQ, H, S]`."""
    B, H, G, TQ, NF = p.shape
    BS, S = block_size, block_counts
    NB = -(-TK // BS)  # blocks including a partial last one
    imp = p.sum(2)  # [B, H, TQ, NF]: importance summed over the group's heads, <= G
    if NB > NF:
        imp = F.pad(imp, (0, NB - NF))
    c = torch.arange(NB, device=p.device)[None, :]
    ic = ((torch.arange(TQ, device=p.device) + off) // BS)[:, None]  # [TQ, 1]
    score = torch.where(c < ic, imp, float("-inf"))
    # forced blocks outrank any importance (<= G), with priority own block > previous block > block 0
    big = 2.0 * G + 2.0
    score = torch.where(c == 0, big, score)
    score = torch.where(c == ic - 1, big + 1, score)
    score = torch.where(c == ic, big + 2, score)
    val, idx = score.topk(min(S, NB), dim=-1)
    idx = torch.where(val > float("-inf"), idx, -1)
    if NB < S:
        idx = F.pad(idx, (0, S - NB), value=-1)
    return idx.permute(0, 2, 1, 3).contiguous()  # [B, TQ, H, S]


def _to_token_mask(block_indices: torch.Tensor, TK: int, block_size: int, off: int) -> torch.Tensor:
    """block_indices `[B, TQ, H, S]` -> selected-token mask `[B, H, TQ, TK]` with the causal mask j <= t."""
    B, TQ, H, S = block_indices.shape
    NB = -(-TK // block_size)
    bi = block_indices.long()
    bi = torch.where((bi >= 0) & (bi < NB), bi, NB)  # unused slots go to a dump column
    blk = torch.zeros(B, TQ, H, NB + 1, dtype=torch.bool, device=bi.device)
    blk.scatter_(-1, bi, True)
    j = torch.arange(TK, device=bi.device)
    tok = blk[..., :NB][..., j // block_size]  # [B, TQ, H, TK]
    causal = j[None, :] <= (torch.arange(TQ, device=bi.device) + off)[:, None]
    return tok.permute(0, 2, 1, 3) & causal[None, None]


def _check_inputs(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ConfigError(f"nsa expects q [B,TQ,HQ,D] and k, v [B,TK,H,D]; got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, TQ, HQ, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] < TQ:
        raise ConfigError(f"nsa: k {tuple(k.shape)} does not match q {tuple(q.shape)} (need same B, D and TK >= TQ)")
    validate_nsa_args(HQ, k.shape[2], D, block_size, block_counts, window_size)
    gates = [("g_cmp", g_cmp), ("g_slc", g_slc)] + ([("g_swa", g_swa)] if window_size > 0 else [])
    for name, g in gates:
        if g is None or tuple(g.shape) != (B, TQ, HQ):
            raise ConfigError(f"nsa: {name} must have shape {(B, TQ, HQ)}, got "
                              f"{None if g is None else tuple(g.shape)}")


def nsa_select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int,
                      scale: float | None = None) -> torch.Tensor:
    """The top-k selection of `nsa_torch` as block_indices `[B, TQ, H, S]` (-1 = unused slot)."""
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    with torch.no_grad():
        _, p = _compressed(q.reshape(B, TQ, H, HQ // H, D), k, k[..., :1], block_size, scale, TK - TQ)
        return _topk_blocks(p, TK, block_size, block_counts, TK - TQ)


def nsa_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
              g_swa: torch.Tensor | None, block_size: int, block_counts: int, window_size: int,
              scale: float | None = None, block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Vectorised NSA in PyTorch. 16-bit inputs are computed in float32; the output is in q's dtype.

    The selected and window branches are `F.scaled_dot_product_attention` with boolean masks (fused on
    CPU and GPU); the masks take O(B * HQ * TQ * TK) bytes, fine for T up to a few thousand on a GPU.
    """
    _check_inputs(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size)
    B, TQ, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G, off = HQ // H, TK - TQ
    scale = D ** -0.5 if scale is None else scale
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    with torch.autocast(q.device.type, enabled=False):  # keep our own precision under autocast
        qg = q.to(cdt).reshape(B, TQ, H, G, D)
        k, v = k.to(cdt), v.to(cdt)

        def gate(g):  # [B, TQ, HQ] -> [B, TQ, H, G, 1]
            return g.to(cdt).reshape(B, TQ, H, G, 1)

        o_cmp, p_cmp = _compressed(qg, k, v, block_size, scale, off)
        if block_indices is None:
            block_indices = _topk_blocks(p_cmp.detach(), TK, block_size, block_counts, off)
        o = o_cmp * gate(g_cmp)  # [B, TQ, H, G, D]

        # selected and window branches: fused masked attention (SDPA), heads-first, GQA-aware.
        # Every row keeps token t itself (own block forced; window >= 1), so no row is fully masked.
        qh, kh, vh = q.to(cdt).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        slc = _to_token_mask(block_indices, TK, block_size, off)  # [B, H, TQ, TK]
        if H > 1:  # SDPA broadcasts the mask over heads only from size 1: give each query head its own
            slc = slc[:, :, None].expand(B, H, G, TQ, TK).reshape(B, HQ, TQ, TK)
        o_slc = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=slc, scale=scale, enable_gqa=True)
        o = o + o_slc.transpose(1, 2).reshape(B, TQ, H, G, D) * gate(g_slc)
        if window_size > 0:
            t = torch.arange(TQ, device=q.device)[:, None] + off
            j = torch.arange(TK, device=q.device)[None, :]
            win = (j <= t) & (j > t - window_size)
            o_swa = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=win, scale=scale, enable_gqa=True)
            o = o + o_swa.transpose(1, 2).reshape(B, TQ, H, G, D) * gate(g_swa)
    return o.reshape(B, TQ, HQ, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------------
# One decode step against a preallocated cache (CUDA-graph safe)
# ----------------------------------------------------------------------------------------------------

def nsa_block_means(k: torch.Tensor, block_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """k `[B, T, H, D]` -> `[B, ceil(T / BS), H, D]`: per block the sum of its keys divided by BS, in
    `dtype` (default: k's dtype, at least float32). For a complete block that is its mean; for a partial
    last block it is the running sum that decode steps continue (adding k / BS) until the block is full."""
    B, T, H, D = k.shape
    n = -(-T // block_size)
    kf = k.to(dtype or torch.promote_types(k.dtype, torch.float32))
    if n * block_size > T:
        kf = F.pad(kf, (0, 0, 0, 0, 0, n * block_size - T))
    return kf.reshape(B, n, block_size, H, D).mean(2)


def nsa_cache_means(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """A decode cache's keys and values kv `[2, B, H, L, D]` -> their block means kv_means
    `[2, B, H, ceil(L / BS), D]` (nsa_block_means of each, contiguous: nsa_decode's layouts)."""
    return torch.stack([nsa_block_means(x.transpose(1, 2), block_size) for x in kv]).transpose(2, 3).contiguous()


@dataclass
class NSADecodePlan:
    """The constants of `nsa_decode` for one cache length: static sizes and index tables, built once
    with the cache rather than in every step (each table would cost kernel launches per step).

    `forced[t]` = (0, max(t // BS - 1, 0), t // BS): the always-selected blocks of a query at t (block
    0, the previous one, its own) in rising priority; `block_last[c]` = (c+1) * BS - 1, the position
    from which block c is complete; `win_off` the window's offsets from the query, padded to the
    length of the selected segment with an offset past the cache (always masked)."""

    max_len: int
    block_size: int
    block_counts: int
    window_size: int
    n_blocks: int
    seg: int  # keys per branch segment: max(S * BS, W) (both padded to it: one softmax for both)
    forced: torch.Tensor  # [L, 3] long
    forced_rank: torch.Tensor  # [3] compute dtype: scores of the forced blocks, above any importance
    block_last: torch.Tensor  # [NB] long
    block_tok: torch.Tensor  # [BS] long: 0..BS-1
    block_size_t: torch.Tensor  # [1] long: BS
    win_off: torch.Tensor  # [seg] long
    zero: torch.Tensor  # [1] long
    fill: torch.Tensor  # [2] compute dtype: 0 and its most negative finite value (masked logits)

    @property
    def dtype(self) -> torch.dtype:
        return self.fill.dtype

    @classmethod
    def build(cls, max_len: int, block_size: int, block_counts: int, window_size: int, device,
              dtype: torch.dtype = torch.float32) -> "NSADecodePlan":
        L, BS, W = max_len, block_size, window_size
        NB = -(-L // BS)
        seg = max(block_counts * BS, W)
        ic = torch.arange(L, device=device) // BS
        forced = torch.stack([torch.zeros_like(ic), (ic - 1).clamp(min=0), ic], 1)
        off = torch.arange(seg, device=device) - (seg - 1)  # the last `seg` positions up to the query
        win_off = torch.where(off > -W, off, L) if W > 0 else off.new_empty(0)
        # importance is <= G (group heads' probabilities summed); 2^20 + r is exact in float32
        rank = torch.tensor([2.0 ** 20, 2.0 ** 20 + 1, 2.0 ** 20 + 2], device=device, dtype=dtype)
        return cls(L, BS, block_counts, W, NB, seg, forced, rank, (torch.arange(NB, device=device) + 1) * BS - 1,
                   torch.arange(BS, device=device), torch.full((1,), BS, device=device), win_off,
                   torch.zeros(1, dtype=torch.long, device=device),
                   torch.tensor([0.0, torch.finfo(dtype).min], device=device, dtype=dtype))


def nsa_decode(q: torch.Tensor, kv: torch.Tensor, kv_means: torch.Tensor, pos: torch.Tensor, gates: torch.Tensor,
               block_size: int, block_counts: int, window_size: int, scale: float | None = None,
               block_indices: torch.Tensor | None = None, plan: NSADecodePlan | None = None,
               backend: str = "auto") -> torch.Tensor:
    """NSA of one query per sequence at position `pos` against a preallocated cache: equals
    `nsa_torch(q, k[:, :pos+1], v[:, :pos+1], *gates.unbind(-1), ...)` up to rounding, where k, v are
    the cached keys and values.

    Layouts (heads first, so every product is a plain batched matmul on views):
      q `[B, 1, HQ, D]`; gates `[B, 1, HQ, 3]` (cmp, slc, swa; activated); pos: long tensor `[1]`;
      kv `[2, B, H, L, D]`: keys kv[0], values kv[1], positions 0..pos written (the query's own
      included), finite values elsewhere (masked out, but 0 * NaN would not be);
      kv_means `[2, B, H, ceil(L / BS), D]`: slots c < (pos+1) // BS hold those complete blocks' means
      (other slots: anything finite; nsa_block_means);
      block_indices `[B, 1, H, S]` overrides the selection (-1: unused slot). Computed in float32 at least.

    Static shapes and device-side masks only, no host sync: the step can be captured once in a CUDA
    graph and replayed at every position (pass a `plan` built beforehand). The selected and window
    branches gather their S * BS and W keys, so a step costs O(L / BS) (compressed branch and top-k over
    the block means) plus O(S * BS + W), not O(L).

    backend 'auto' (or 'fla': FLA has no NSA decode kernel) takes attnbench's Triton kernel for CUDA
    tensors without a block_indices override (_triton_decode); 'torch' always the PyTorch step below.
    """
    B, _, HQ, D = q.shape
    _, _, H, L, _ = kv.shape
    BS, W = block_size, window_size
    NB = -(-L // BS)
    if q.shape[1] != 1 or kv.shape != (2, B, H, L, D) or kv_means.shape != (2, B, H, NB, D) or \
            gates.shape != (B, 1, HQ, 3) or HQ % H:
        raise ConfigError(f"nsa_decode expects q [B,1,HQ,D], kv [2,B,H,L,D], kv_means [2,B,H,ceil(L/BS),D] and "
                          f"gates [B,1,HQ,3]; got {tuple(q.shape)}, {tuple(kv.shape)}, {tuple(kv_means.shape)}, "
                          f"{tuple(gates.shape)}")
    G = HQ // H
    scale = D ** -0.5 if scale is None else scale
    check_backend(backend)
    if backend != "torch" and block_indices is None and q.is_cuda:
        o = _triton_decode(q, kv, kv_means, pos, gates, block_size, block_counts, window_size, scale, plan)
        if o is not None:
            return o
    cdt = torch.promote_types(q.dtype, torch.float32)
    if plan is None or plan.dtype != cdt:  # (a plan made here is graph-safe too, only more kernels)
        plan = NSADecodePlan.build(L, BS, block_counts, W, q.device, cdt)
    if (plan.max_len, plan.block_size, plan.block_counts, plan.window_size) != (L, BS, block_counts, W):
        raise ConfigError("nsa_decode: the plan was built for another cache length or NSA settings")
    resolve("torch", q, "nsa_decode")  # no FLA decode kernel; records the backend for benchmark rows
    BH, seg = B * H, plan.seg
    zero, neg = plan.fill.unbind()  # finite fill: a fully masked row gives no NaN

    with torch.autocast(q.device.type, enabled=False):  # keep our own precision under autocast
        qh = q.to(cdt).reshape(BH, G, D)
        g = gates.to(cdt).reshape(BH, G, 3)
        km, vm = (t.to(cdt).reshape(BH, NB, D) for t in kv_means.unbind(0))

        # 1. compressed branch over the complete blocks; none complete yet: the branch is 0 (nsa_torch)
        visible = plan.block_last <= pos  # [NB]
        bias = torch.where(visible, zero, neg)
        p = torch.softmax(torch.baddbmm(bias, qh, km.transpose(1, 2), alpha=scale), -1)  # [BH, G, NB]
        o = torch.bmm(p * (g[..., :1] * visible[:1]), vm)  # [BH, G, D]

        # 2. selection (as _topk_blocks): importance summed over the group, blocks not complete excluded
        # (the own block is forced anyway), forced blocks 0 < IC-1 < IC on top by priority
        if block_indices is None:
            score = p.sum(1) + bias  # [BH, NB]
            forced = plan.forced.index_select(0, pos).expand(BH, 3)
            score.scatter_reduce_(1, forced, plan.forced_rank.expand(BH, 3), "amax")
            idx = score.topk(min(block_counts, NB), dim=-1).indices.view(B, H, -1)
        else:
            idx = block_indices[:, 0].long()  # a -1 slot gives negative token ids: masked below

        # 3. + 4. the selected blocks' tokens and the window pos-W+1..pos, each padded to `seg` keys;
        # a key is kept iff 0 <= j <= pos (clamping to [0, pos] moves exactly the others)
        ids = torch.addcmul(plan.block_tok, idx[..., None], plan.block_size_t).flatten(2)  # [B, H, <= seg]
        if seg > ids.shape[-1]:
            ids = F.pad(ids, (0, seg - ids.shape[-1]), value=L)
        if W > 0:
            ids = torch.cat([ids, (pos + plan.win_off).expand(B, H, seg)], -1)  # [B, H, N]
        safe = torch.clamp(ids, min=plan.zero, max=pos)
        bias = torch.where(safe == ids, zero, neg).view(BH, 1, -1)
        kvg = torch.gather(kv, 3, safe[None, ..., None].expand(2, B, H, -1, D)).to(cdt)  # [2, B, H, N, D]
        kg, vg = kvg[0].view(BH, -1, D), kvg[1].view(BH, -1, D)
        s = torch.baddbmm(bias, qh, kg.transpose(1, 2), alpha=scale)  # [BH, G, N]
        nb = 2 if W > 0 else 1
        # every row keeps the query's own token in both branches (own block forced; window >= 1)
        p = torch.softmax(s.view(BH, G, nb, seg), -1) * g[..., 1:1 + nb, None]
        o = torch.baddbmm(o, p.view(BH, G, nb * seg), vg)
    return o.view(B, 1, HQ, D).to(q.dtype)


_TRITON_DECODE_OK: dict[tuple, bool] = {}  # shape key -> the kernel matched the PyTorch step


@torch.compiler.disable  # a Triton launch and a host-side check: outside any torch.compile trace
def _triton_decode(q, kv, kv_means, pos, gates, block_size, block_counts, window_size, scale, plan):
    """The Triton kernel's result, or None where the PyTorch step must run. The first call per shape
    (eagerly, not while a CUDA graph is being captured) runs both and compares them: a kernel that fails
    or differs (relative error > 1e-2 with float32 maths on both sides; bf16 outputs round at ~4e-3) is
    logged and not used for that shape."""
    if not nsa_decode_triton.available() or block_size & (block_size - 1):
        return None
    key = (tuple(q.shape), tuple(kv.shape), kv.dtype, kv_means.dtype, q.dtype, block_size, block_counts,
           window_size, float(scale))
    args = (q, kv, kv_means, pos, gates, block_size, block_counts, window_size, scale)
    ok = _TRITON_DECODE_OK.get(key)
    if ok is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # no check inside a capture: the PyTorch step, decided on an eager call
        got, ok = _check_triton_decode(args, plan, key)  # the checked result is this call's: one launch
        _TRITON_DECODE_OK[key] = ok
    else:
        got = nsa_decode_triton.nsa_decode_triton(*args) if ok else None
    if ok:
        record("nsa_decode", "triton")
    return got


def _check_triton_decode(args: tuple, plan, key: tuple) -> tuple[torch.Tensor | None, bool]:
    """(kernel result, whether it matches the PyTorch step); a failure or mismatch is logged."""
    try:
        got = nsa_decode_triton.nsa_decode_triton(*args)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with unrecorded():  # the reference is not what the caller's figures come from
                ref = nsa_decode(*args[:-1], scale=args[-1], plan=plan, backend="torch")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        err = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    except Exception as e:  # noqa: BLE001 - any failure means the PyTorch step, said once
        log.warning("NSA decode: the Triton kernel failed (%s: %s); using the PyTorch step",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None, False
    if err > 1e-2:
        log.warning("NSA decode: the Triton kernel differs from the PyTorch step (relative error %.2e) "
                    "for shape %s; using the PyTorch step", err, key)
        return None, False
    return got, True


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------

def _fla_call_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                          block_counts: int) -> str | None:
    reasons = []
    if q.is_cuda:
        r = fla_supported(q.shape[2], k.shape[2], q.shape[3], block_size, block_counts, q.device)
        if r:
            reasons.append(r)
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (FLA's NSA needs one 16-bit dtype; "
                       f"use bf16 autocast)")
    if q.shape[1] != k.shape[1]:
        reasons.append(f"TQ={q.shape[1]} != TK={k.shape[1]} (cached prefill/decode)")
    return "; ".join(reasons) or None


def _fla_nsa(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, block_indices):
    from fla.ops.attn import parallel_attn  # optional dependency (CUDA only)
    from fla.ops.nsa import parallel_nsa

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*block_indices.*")  # FLA warns on the override
        # parallel_nsa's own window branch needs flash-attn, absent here: window_size=0 and add our own
        o = parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=None, block_indices=block_indices,
                         block_counts=block_counts, block_size=block_size, window_size=0, scale=scale)
    if window_size > 0:
        # parallel_attn keeps keys j with 0 <= t - j < window_size, causal, grouped heads (fla/ops/attn)
        o = o + g_swa[..., None] * parallel_attn(q, k, v, scale=scale, window_size=window_size)
    return o.to(q.dtype)


# FLA's entry points are not all compiler-disabled; keep Dynamo out of the Triton launches.
_fla_nsa = torch.compiler.disable(_fla_nsa)


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor, g_slc: torch.Tensor,
        g_swa: torch.Tensor | None, block_size: int, block_counts: int, window_size: int,
        scale: float | None = None, backend: str = "auto",
        block_indices: torch.Tensor | None = None) -> torch.Tensor:
    """NSA with backend 'auto' | 'torch' | 'fla'; see the module docstring for the maths and layouts."""
    _check_inputs(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    unsupported = _fla_call_unsupported(q, k, v, block_size, block_counts) if q.is_cuda else None
    if resolve(backend, q, "nsa", unsupported) == "fla":
        return _fla_nsa(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, block_indices)
    return nsa_torch(q, k, v, g_cmp, g_slc, g_swa, block_size, block_counts, window_size, scale, block_indices)
