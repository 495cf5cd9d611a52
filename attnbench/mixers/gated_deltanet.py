"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), as FLA's `GatedDeltaNet`
layer (fla.layers.GatedDeltaNet) builds it:

    q, k, v = conv_silu(W_q x), conv_silu(W_k x), conv_silu(W_v x)
    g       = -exp(A_log) * softplus(W_a x + dt_bias)     (log-decay per head, float32, Mamba-2 style)
    beta    = sigmoid(W_b x)  (x2 with allow_neg_eigval)
    o       = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)   (ops/gated_delta_rule.py)
    y       = o_proj(rmsnorm_per_head(o) * silu(W_g x))             (use_gate; plain rmsnorm without)

Heads: num_heads (default model.n_head) of key dim head_dim (default n_embd // num_heads) and value
dim head_dim*expand_v. expand_v defaults to 1.0 (FLA: 2) so a 384-wide model stays near softmax's
size; the parameter-matching step tunes the widths. W_q, W_k, W_v, W_a, W_b [, W_g] are one in_proj (rows
q | k | v | a | b | g) and the three convolutions one (channels q | k | v): see _delta_common.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.gated_delta_rule import gated_delta_rule
from . import register
from ._delta_common import (DeltaArgs, DecayGate, DeltaMixer, DeltaState, check_chunk_size, check_common,
                            chunked_delta_flops, per_head_dims)


@dataclass
class GatedDeltaNetArgs(DeltaArgs):
    num_heads: int | None = None  # None: model.n_head
    head_dim: int | None = None  # key head dim; None: n_embd // num_heads
    expand_v: float = 1.0
    use_gate: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    chunk_size: int = 64  # 16 | 32 | 64

    def dims(self, n_embd: int, n_head: int) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim), validated."""
        check_common(self.num_heads, self.conv_size)
        H = self.num_heads or n_head
        hk, hv = per_head_dims(n_embd, H, self.head_dim, self.expand_v)
        check_chunk_size(self.chunk_size)
        return H, hk, hv


@register("gated_deltanet")
class GatedDeltaNet(DeltaMixer):
    Args = GatedDeltaNetArgs

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a, d = self.args, cfg.n_embd
        H, self.head_k, head_v = a.dims(d, cfg.n_head)
        dk, dv = H * self.head_k, H * head_v
        self.decay = DecayGate(H)
        self._build((dk, dk, dv), {"a": H, "b": H}, H, head_v, a.use_gate, a.conv_size)

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        B, T, _ = x.shape
        q, k, v, ex, tail = self._project(x, state)
        H = self.n_heads
        g = self.decay(ex["a"])  # [B, T, H] float32
        o, S = gated_delta_rule(q.view(B, T, H, self.head_k), k.view(B, T, H, self.head_k),
                                v.view(B, T, H, self.head_v), g, self._beta(ex["b"]),
                                initial_state=state.recurrent if state is not None else None,
                                output_final_state=state is not None, qk_l2norm=True, backend=self.cfg.backend,
                                chunk_size=self.args.chunk_size)
        return self._finish(x, o, ex, state, S, tail)

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: projections q, k, v,
        a, b, [g], o; three depthwise convolutions; the chunked WY gated delta rule at the configured
        chunk size (_delta_common.chunked_delta_flops). The decay's cumsum/exp and the masks are
        O(C) per token and head, the norms elementwise: left out (< 1%)."""
        a = cls.Args.from_dict(cfg.mixer_args, "gated_deltanet")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        d, dk, dv = cfg.n_embd, H * hk, H * hv
        proj = 2 * d * (2 * dk + dv + 2 * H + (dv if a.use_gate else 0)) + 2 * dv * d
        conv = 2 * a.conv_size * (2 * dk + dv)
        return proj + conv + chunked_delta_flops(T, H, hk, hv, a.chunk_size) / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*K*V of the recurrent matrix plus (W-1) inputs per channel of the q|k|v convolution."""
        a = cls.Args.from_dict(cfg.mixer_args, "gated_deltanet")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        return cls._decode_state_elements(H, hk, hv, H * (2 * hk + hv), a.conv_size)
