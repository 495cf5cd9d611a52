"""Causal softmax attention (the baseline), as nanoGPT's CausalSelfAttention, plus a KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.rotary import apply_rotary, rotary_tables
from . import register
from .base import Mixer, MixerArgs


@dataclass
class SoftmaxArgs(MixerArgs):
    rope_base: float = 10000.0  # used when model.pos_emb = "rope"
    # dropout on the attention probabilities (nanoGPT's attn_dropout); None: model.dropout, as nanoGPT.
    # The other mixers have no attention matrix to drop, so 0 gives them the same regularisation.
    attn_dropout: float | None = None

    def validate(self, n_embd: int, n_head: int) -> None:
        if self.rope_base <= 0:
            raise ConfigError(f"model.mixer_args.rope_base must be > 0, got {self.rope_base}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"model.mixer_args.attn_dropout must be in [0, 1) or unset, got {self.attn_dropout}")


@dataclass
class KVCache:
    """Preallocated keys/values [B, H, max_len, D]; `pos` tokens are filled.

    `pos_t` holds the same count as a device tensor (bookkeeping, not a dataclass field, so it is not
    counted in decode_state_elements): a decode step takes its position from it, which keeps the step free of
    host-side positions and static in shape, so it can be captured in a CUDA graph and replayed.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    def __post_init__(self) -> None:
        self.pos_t = torch.full((1,), self.pos, dtype=torch.long, device=self.k.device)


@register("softmax")
class SoftmaxAttention(Mixer):
    Args = SoftmaxArgs

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout if self.args.attn_dropout is None else self.args.attn_dropout
        self.rope = cfg.pos_emb == "rope"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.pos_emb == "rope" and cfg.head_dim % 2:
            raise ConfigError(f"model.pos_emb='rope' needs an even head dim; n_embd/n_head = {cfg.head_dim}")

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # [B, T, H, D]
        start = state.pos if state is not None else 0
        decode = state is not None and T == 1
        if self.rope:
            positions = state.pos_t if decode else torch.arange(start, start + T, device=x.device)
            cos, sin = rotary_tables(self.head_dim, positions, self.args.rope_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if state is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            end = start + T
            L = state.k.shape[2]
            if end > L:
                raise RuntimeError(f"KV cache of {L} tokens is full (need {end})")
            if decode:
                # One query against the whole preallocated cache, keys beyond the position masked: the
                # position is a device tensor and the shapes never change, so the step is CUDA-graph safe.
                state.k.index_copy_(2, state.pos_t, k.to(state.k.dtype))
                state.v.index_copy_(2, state.pos_t, v.to(state.v.dtype))
                mask = (torch.arange(L, device=x.device) <= state.pos_t).view(1, 1, 1, L)
                y = F.scaled_dot_product_attention(q, state.k.to(q.dtype), state.v.to(q.dtype), attn_mask=mask)
            else:
                state.k[:, :, start:end] = k.to(state.k.dtype)
                state.v[:, :, start:end] = v.to(state.v.dtype)
                keys, vals = state.k[:, :, :end].to(q.dtype), state.v[:, :, :end].to(q.dtype)
                # query i (absolute start+i) sees keys j <= start+i
                mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
                y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
            state.pos = end
            state.pos_t += T
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o_proj(y), state

    def init_state(self, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, self.n_head, max_len, self.head_dim)
        # zeros, not empty: a decode step attends over the whole cache (masked), and 0 * NaN garbage is NaN
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    # ------------------------------------------------------------------ accounting

    @classmethod
    def flops_per_token(cls, cfg, T: int) -> float:
        """Forward FLOPs per token at context length T, multiply-add = 2 FLOPs.

        Projections: qkv 2*d*3d and o_proj 2*d*d, i.e. 2*4*d^2. Mixing: QK^T and AV at 2*T*d each
        (4*T*d), counting the full T x T products as the kernels and FlopCounterMode do (no causal
        halving). Softmax, scaling, RoPE and biases are elementwise and left out (< 1% at d = 384).
        """
        d = cfg.n_embd
        return 2.0 * 4 * d * d + 4.0 * T * d

    @classmethod
    def decode_state_elements(cls, cfg, T: int) -> int:
        """The KV cache of one sequence at context T: keys and values, 2 * T * n_head * head_dim."""
        return 2 * T * cfg.n_head * cfg.head_dim
