"""Native Sparse Attention mixer, after FLA's `NativeSparseAttention` layer (fla/layers/nsa.py).

    q = RoPE(q_proj x)  [HQ heads]     k = RoPE(k_proj x), v = v_proj x  [H = n_kv_head heads]
    g_cmp, g_slc, g_swa = sigmoid(g_proj x)  (one triple per query head)
    y = o_proj( NSA(q, k, v, g_cmp, g_slc, g_swa) )          (maths: attnbench/ops/nsa.py)

RoPE is applied before NSA, so the compressed keys are means of rotated keys, as in FLA. The mixer
always applies its own RoPE; the model's `pos_emb` (learned/rope/none) is independent of it: the model
never rotates anything itself, so 'rope' there only means "no learned table" (no double rotation).
Like FLA's layer there is no attention dropout, no q/k norm and no output norm.

Decoding state: a preallocated cache of post-RoPE keys and values. A prefill into an empty cache is
the full parallel pass (FLA's kernels on CUDA when they support the shape); a continuation or a
decode step runs the PyTorch op with the new queries against the cache (FLA's NSA path needs
TQ == TK), which recomputes the block means of the whole cache, as FLA's layer does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..ops.backend import notice_once
from ..ops.nsa import fla_supported, nsa, validate_nsa_args
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
    """Preallocated post-RoPE keys/values [B, max_len, H, D]; `pos` tokens are filled."""

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0


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
        'rope' does not double-rotate, and 'learned' (the seed's choice) adds absolute embeddings too."""

    def forward(self, x: torch.Tensor, state: NSACache | None = None) -> tuple[torch.Tensor, NSACache | None]:
        B, T, _ = x.shape
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
        if state is not None:
            end = start + T
            if end > state.k.shape[1]:
                raise RuntimeError(f"NSA KV cache of {state.k.shape[1]} tokens is full (need {end})")
            state.k[:, start:end] = k.to(state.k.dtype)
            state.v[:, start:end] = v.to(state.v.dtype)
            state.pos = end
            if start > 0:  # queries continue a cache: the torch op (FLA's needs TQ == TK)
                k, v = state.k[:, :end].to(q.dtype), state.v[:, :end].to(q.dtype)
                o = nsa(q, k, v, g_cmp, g_slc, g_swa, **kw, backend="torch")
                return self.o_proj(o.reshape(B, T, HQ * D)), state
        o = nsa(q, k, v, g_cmp, g_slc, g_swa, **kw, backend=self.cfg.backend)
        return self.o_proj(o.reshape(B, T, HQ * D)), state

    def init_state(self, batch: int, max_len: int, device, dtype) -> NSACache:
        shape = (batch, max_len, self.n_kv_head, self.head_dim)
        return NSACache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

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
    def state_numbers(cls, cfg, T: int) -> int:
        """The KV cache: post-RoPE keys and values, 2 * T * n_kv_head * head_dim (block means are
        recomputed from it, not stored)."""
        a, C, HQ, H, D = cls._dims(cfg)
        return 2 * T * H * D
