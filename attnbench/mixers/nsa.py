"""Native Sparse Attention mixer, after FLA's `NativeSparseAttention` layer (fla/layers/nsa.py).

    q = RoPE(q_proj x)  [HQ heads]     k = RoPE(k_proj x), v = v_proj x  [H = n_kv_head heads]
    g_cmp, g_slc, g_swa = sigmoid(g_proj x)  (one triple per query head)
    y = o_proj( NSA(q, k, v, g_cmp, g_slc, g_swa) )          (maths: attnbench/ops/nsa.py)

RoPE is applied before NSA, so the compressed keys are means of rotated keys, as in FLA. The mixer
always applies its own RoPE; the model's `pos_emb` (learned/rope/none) is independent of it: the model
never rotates anything itself, so 'rope' there only means "no learned table" (no double rotation).
Like FLA's layer there is no attention dropout, no q/k norm and no output norm.

Decoding state: a preallocated cache of post-RoPE keys and values plus the block means (compressed
keys/values) of what it holds. A prefill into an empty cache is the full parallel pass (FLA's kernels
on CUDA when they support the shape); a multi-token continuation runs the PyTorch op with the new
queries against the cache (FLA's NSA path needs TQ == TK). Both then pool the blocks they touched.
A one-token decode step is CUDA-graph safe (`attnbench bench latency --cuda_graph`): it takes its
position from the device counter `pos_t`, writes its key/value with `index_copy_`, adds key/BS to its
block's running mean with `index_add_`, and runs `nsa_decode` on the preallocated buffers (static
shapes, device-side masks; it gathers the selected blocks' and the window's keys), so no state tensor
is replaced, no Python int is read and the cost per token does not grow with the whole cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.backend import notice_once
from ..ops.nsa import NSADecodePlan, fla_supported, nsa, nsa_block_means, nsa_decode, validate_nsa_args
from ..ops.rotary import apply_rotary, rotary_tables
from . import register
from .base import Mixer, MixerArgs

_ARG_KEYS = ("n_kv_head", "head_dim", "block_size", "block_counts", "window_size")


@dataclass
class NSAArgs(MixerArgs):
    n_kv_head: int = 1  # KV heads; query heads = model.n_head, grouped G = n_head / n_kv_head per KV head
    head_dim: Optional[int] = None  # None: model.n_embd // model.n_head
    block_size: int = 32  # compression pooling size = selection block size (FLA ties them)
    block_counts: int = 4  # selected blocks per query (including the forced current/previous/first)
    window_size: int = 64  # sliding-window branch; 0 disables it
    rope_theta: float = 10000.0
    qkv_bias: bool = False

    def resolved_head_dim(self, n_embd: int, n_head: int) -> int:
        return self.head_dim if self.head_dim is not None else n_embd // n_head

    def validate(self, n_embd: int, n_head: int) -> None:
        hd = self.resolved_head_dim(n_embd, n_head)
        try:
            validate_nsa_args(n_head, self.n_kv_head, hd, self.block_size, self.block_counts, self.window_size)
        except ConfigError as e:  # the op names bare keys: qualify them with where they live in the config
            msg = re.sub(r"\b(" + "|".join(_ARG_KEYS) + r")\b", r"model.mixer_args.\1", str(e))
            raise ConfigError(re.sub(r"\bn_head\b", "model.n_head", msg)) from None
        if hd % 2:
            hint = "set it to an even number" if self.head_dim is not None else \
                f"it defaults to model.n_embd // model.n_head = {hd}; set model.mixer_args.head_dim to an even number"
            raise ConfigError(f"model.mixer_args.head_dim must be even for NSA's RoPE (got {hd}): {hint}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.mixer_args.rope_theta must be > 0, got {self.rope_theta}")


@dataclass
class NSACache:
    """Decoding state, heads first (every decode product is a batched matmul on views):

    kv `[2, B, H, max_len, D]`: post-RoPE keys kv[0] and values kv[1], zeros beyond `pos` (a decode step
    reads the whole buffer, masked, and 0 * NaN garbage would be NaN);
    kv_means `[2, B, H, ceil(max_len / block_size), D]`, at least float32: per block of block_size tokens
    the sum of its keys/values divided by block_size, i.e. the block mean once the block is complete
    (only complete blocks are ever visible), a running sum before.
    `pos` tokens are filled.

    Bookkeeping, not dataclass fields (so not counted in decode_state_elements): `pos_t`, the same count as a
    device tensor, from which a decode step takes its position (as softmax's KVCache); `rope`, the
    rotation factors of every position `[max_len, 2, D]` float32, and `plan`, the constants of
    `nsa_decode`: position-indexed tables (8 D + 24 bytes per position) that save a decode step the
    kernels of computing them.
    """

    kv: torch.Tensor
    kv_means: torch.Tensor
    pos: int = 0

    def __post_init__(self) -> None:
        self.pos_t = torch.full((1,), self.pos, dtype=torch.long, device=self.kv.device)

    @property
    def k(self) -> torch.Tensor:
        """Cached keys as a `[B, max_len, H, D]` view."""
        return self.kv[0].transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1].transpose(1, 2)

    @property
    def k_means(self) -> torch.Tensor:
        """Block means of the keys as a `[B, n_blocks, H, D]` view."""
        return self.kv_means[0].transpose(1, 2)

    @property
    def v_means(self) -> torch.Tensor:
        return self.kv_means[1].transpose(1, 2)


def _fla_hint(reason: str) -> str:
    """A concrete fix for each kind of reason `fla_supported` gives."""
    hints = []
    if "group size" in reason:
        hints.append("query heads per KV head must be a power of two >= 16 for FLA's kernel: "
                     "set model.n_head=16 and model.mixer_args.n_kv_head=1 (or n_head = 16 * n_kv_head)")
    if "block_size" in reason:
        hints.append("set model.mixer_args.block_size to a power of two >= max(16, 2 * block_counts)")
    if "head_dim" in reason:
        hints.append("set model.mixer_args.head_dim to a value in FLA's range (e.g. 32 or 64)")
    return "; ".join(hints)


@register("nsa")
class NativeSparseAttention(Mixer):
    Args = NSAArgs
    encodes_position = True  # its own RoPE

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a = self.args
        self.n_head, self.n_kv_head = cfg.n_head, a.n_kv_head
        self.head_dim = a.resolved_head_dim(cfg.n_embd, cfg.n_head)
        C, HQ, H, D = cfg.n_embd, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = nn.Linear(C, HQ * D, bias=a.qkv_bias)
        self.k_proj = nn.Linear(C, H * D, bias=a.qkv_bias)
        self.v_proj = nn.Linear(C, H * D, bias=a.qkv_bias)
        self.g_proj = nn.Linear(C, 3 * HQ, bias=False)
        self.o_proj = nn.Linear(HQ * D, C, bias=False)
        self._check_fla(cfg)

    def _check_fla(self, cfg) -> None:
        a = self.args
        reason = fla_supported(cfg.n_head, a.n_kv_head, self.head_dim, a.block_size, a.block_counts)
        if reason is None or cfg.backend == "torch":
            return
        if cfg.backend == "fla":
            raise ConfigError(f"model.backend='fla' cannot run NSA with these settings ({reason}): "
                              f"{_fla_hint(reason)}; or use model.backend='auto'/'torch'")
        notice_once(f"nsa-mixer:{reason}", f"NSA mixer: FLA's kernels cannot run these settings ({reason}); "
                    f"the PyTorch path will be used on CUDA. {_fla_hint(reason)}")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Every model.pos_emb is fine: NSA always applies its own RoPE and the model never rotates, so
        'rope' does not double-rotate, and 'learned' (the bake-off configs' choice) adds absolute embeddings too."""

    def forward(self, x: torch.Tensor, state: NSACache | None = None) -> tuple[torch.Tensor, NSACache | None]:
        B, T, _ = x.shape
        if state is not None and T == 1:
            return self._decode_step(x, state), state
        HQ, H, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, HQ, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        # FLA's layout: per query head three consecutive logits (cmp, slc, swa)
        g_cmp, g_slc, g_swa = torch.sigmoid(self.g_proj(x).view(B, T, HQ, 3)).unbind(-1)
        start = state.pos if state is not None else 0
        cos, sin = rotary_tables(D, torch.arange(start, start + T, device=x.device), self.args.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = self.args
        kw = dict(block_size=a.block_size, block_counts=a.block_counts, window_size=a.window_size)
        if state is None:
            o = nsa(q, k, v, g_cmp, g_slc, g_swa, **kw, backend=self.cfg.backend)
            return self.o_proj(o.reshape(B, T, HQ * D)), None
        # prefill or a multi-token continuation (eager, Python-int positions)
        end = start + T
        self._check_room(state, end)
        state.kv[0, :, :, start:end] = k.transpose(1, 2)
        state.kv[1, :, :, start:end] = v.transpose(1, 2)
        if start > 0:  # queries continue a cache: the torch op (FLA's needs TQ == TK)
            keys, vals = state.k[:, :end].to(q.dtype), state.v[:, :end].to(q.dtype)
            o = nsa(q, keys, vals, g_cmp, g_slc, g_swa, **kw, backend="torch")
        else:
            o = nsa(q, k, v, g_cmp, g_slc, g_swa, **kw, backend=self.cfg.backend)
        # pool the blocks this call touched (their earlier tokens come from the cache)
        BS = a.block_size
        c0, c1 = start // BS, -(-end // BS)
        for i, cached in enumerate((state.k, state.v)):
            state.kv_means[i, :, :, c0:c1] = nsa_block_means(cached[:, c0 * BS:end], BS,
                                                             state.kv_means.dtype).transpose(1, 2)
        state.pos = end
        state.pos_t += T
        return self.o_proj(o.reshape(B, T, HQ * D)), state

    @staticmethod
    def _check_room(state: NSACache, end: int) -> None:
        # the host-side counter is only checked, never a position of the step (a graph replay freezes it)
        if end > state.kv.shape[3]:
            raise RuntimeError(f"NSA KV cache of {state.kv.shape[3]} tokens is full (need {end})")

    def _decode_step(self, x: torch.Tensor, st: NSACache) -> torch.Tensor:
        """One token per sequence, CUDA-graph safe: the position comes from `st.pos_t` (device), state
        tensors are updated in place, shapes are static. Written for few kernel launches, since a
        batch-1 step is launch-bound: one projection for q, k, v and the gates (concatenated weights),
        one rotation for q and k from the precomputed table, one write of k and v, one running-mean add."""
        B = x.shape[0]
        HQ, H, D, a = self.n_head, self.n_kv_head, self.head_dim, self.args
        self._check_room(st, st.pos + 1)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.g_proj.weight])
        b = None
        if self.q_proj.bias is not None:
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, self.q_proj.bias.new_zeros(3 * HQ)])
        y = F.linear(x, w, b)  # [B, 1, (HQ + 2H) D + 3 HQ]
        qk = y[..., :(HQ + H) * D].view(B, 1, HQ + H, D)
        v = y[..., (HQ + H) * D:(HQ + 2 * H) * D].view(B, 1, H, D)
        gates = torch.sigmoid(y[..., (HQ + 2 * H) * D:].view(B, 1, HQ, 3))
        # RoPE as apply_rotary (x1 c - x2 s, x2 c + x1 s), written x * [c, c] + roll(x) * [-s, s]
        rot = st.rope.index_select(0, st.pos_t)  # [1, 2, D]
        xf = qk if qk.dtype == torch.float64 else qk.float()
        rot = rot.to(xf.dtype)
        qk = torch.addcmul(xf * rot[:, 0], xf.roll(D // 2, -1), rot[:, 1]).to(qk.dtype)
        q, k = qk.split([HQ, H], 2)
        kv = torch.stack([k, v]).to(st.kv.dtype).transpose(2, 3)  # [2, B, H, 1, D]
        st.kv.index_copy_(3, st.pos_t, kv)
        # running block mean: each of the block's tokens adds its key / BS once (BS a power of two: exact)
        st.kv_means.index_add_(3, st.pos_t // a.block_size, kv.to(st.kv_means.dtype), alpha=1.0 / a.block_size)
        o = nsa_decode(q, st.kv, st.kv_means, st.pos_t, gates, a.block_size, a.block_counts, a.window_size,
                       plan=st.plan, backend=self.cfg.backend)
        st.pos += 1
        st.pos_t += 1
        return self.o_proj(o.reshape(B, 1, HQ * D))

    def init_state(self, batch: int, max_len: int, device, dtype) -> NSACache:
        """Zeroed buffers (a decode step reads all of them, masked); the block means in at least float32,
        the precision nsa_torch pools in, so running sums do not round in 16 bits."""
        a, H, D = self.args, self.n_kv_head, self.head_dim
        cdt = torch.promote_types(dtype, torch.float32)
        st = NSACache(torch.zeros(2, batch, H, max_len, D, device=device, dtype=dtype),
                      torch.zeros(2, batch, H, -(-max_len // a.block_size), D, device=device, dtype=cdt))
        cos, sin = rotary_tables(D, torch.arange(max_len, device=device), a.rope_theta)
        st.rope = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1)  # [L, 2, D]
        st.plan = NSADecodePlan.build(max_len, a.block_size, a.block_counts, a.window_size, device, cdt)
        return st

    # ------------------------------------------------------------------ accounting

    @classmethod
    def _dims(cls, cfg) -> tuple[NSAArgs, int, int, int, int]:
        a = cls.Args.from_dict(cfg.mixer_args, cls.name)
        return a, cfg.n_embd, cfg.n_head, a.n_kv_head, a.resolved_head_dim(cfg.n_embd, cfg.n_head)

    @classmethod
    def _proj_flops(cls, cfg) -> float:
        a, C, HQ, H, D = cls._dims(cfg)
        return 2.0 * C * (HQ * D + 2 * H * D + 3 * HQ) + 2.0 * HQ * D * C  # q, k, v, g; o

    @classmethod
    def flops_per_token(cls, cfg, T: int) -> float:
        """Forward FLOPs per token as the NSA algorithm (and FLA's kernels) cost it, multiply-add = 2.

        Per query head, with NC = T // block_size complete blocks and the attention convention of the
        project (no causal halving: every query counted at the full context T):
          compression 4*D*NC (q.k̄ and p.v̄), selection 4*D*min(block_counts*block_size, T),
          window 4*D*min(window_size, T); plus the projections (q, k, v, g, o).
        Not counted (each < 1%): block mean pooling, RoPE, gating, and the second q.k̄ pass that FLA's
        top-k kernel makes to rebuild the importance scores (2*D*NC; the algorithm needs them once).

        Relation to `flops_per_token_torch` (what the PyTorch path does and FlopCounterMode sees): the
        torch path computes the selection and window branches as dense masked T x T attention
        (4*D*T each), so algorithmic <= dense, equal when T <= min(block_counts*block_size, window_size);
        at long T the sparse branches cost O(1) per token instead of O(T).
        """
        a, C, HQ, H, D = cls._dims(cfg)
        nc = T // a.block_size
        mix = 4.0 * D * (nc + min(a.block_counts * a.block_size, T) + (min(a.window_size, T) if a.window_size else 0))
        return cls._proj_flops(cfg) + HQ * mix

    @classmethod
    def flops_per_token_torch(cls, cfg, T: int) -> float:
        """Forward FLOPs per token of the dense PyTorch path (`nsa_torch`): projections, compression
        4*D*(T // block_size) and two dense masked SDPA calls (selection, window) of 4*D*T each, per
        query head. This is what FlopCounterMode measures on that path."""
        a, C, HQ, H, D = cls._dims(cfg)
        mix = 4.0 * D * (T // a.block_size + T + (T if a.window_size else 0))
        return cls._proj_flops(cfg) + HQ * mix

    @classmethod
    def decode_state_elements(cls, cfg, T: int) -> int:
        """The KV cache, post-RoPE keys and values, 2 * T * n_kv_head * head_dim, plus the block means
        the decode step keeps instead of re-pooling the cache, 2 * ceil(T / block_size) * n_kv_head *
        head_dim (1/block_size more; FLA's layer recomputes them, an NSA decoder keeps them)."""
        a, C, HQ, H, D = cls._dims(cfg)
        return 2 * (T + -(-T // a.block_size)) * H * D
