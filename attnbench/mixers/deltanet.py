"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule"), as FLA's
`DeltaNet` layer (fla.layers.DeltaNet) builds it:

    q, k, v = conv_silu(W_q x), conv_silu(W_k x), conv_silu(W_v x)    (per-channel causal convs, width 4)
    beta    = sigmoid(W_b x)  (x2 with allow_neg_eigval: eigenvalues of I - beta k k^T in [-1, 1])
    o       = delta_rule(l2norm(q), l2norm(k), v, beta)              (ops/delta_rule.py)
    y       = o_proj(rmsnorm_per_head(o) [* silu(W_g x)])

Heads: num_heads (default model.n_head), key head dim n_embd*expand_k/H, value head dim n_embd*expand_v/H.
W_q, W_k, W_v, W_b [, W_g] are one in_proj (rows q | k | v | b | g) and the three convolutions one
(channels q | k | v): see _delta_common.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.delta_rule import delta_rule
from . import register
from ._delta_common import (DeltaArgs, DeltaMixer, DeltaState, check_chunk_size, check_common, chunked_delta_flops,
                            expanded_head_dims)


@dataclass
class DeltaNetArgs(DeltaArgs):
    num_heads: int | None = None  # None: model.n_head
    expand_k: float = 1.0
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    use_gate: bool = False  # FLA's DeltaNet default: plain output RMSNorm
    chunk_size: int = 64  # 16 | 32 | 64 (FLA's chunk kernel sizes; also the PyTorch path's)

    def dims(self, n_embd: int, n_head: int) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim), validated."""
        check_common(self.num_heads, self.conv_size)
        H = self.num_heads or n_head
        hk, hv = expanded_head_dims(n_embd, H, self.expand_k, self.expand_v)
        check_chunk_size(self.chunk_size)
        return H, hk, hv


@register("deltanet")
class DeltaNet(DeltaMixer):
    Args = DeltaNetArgs

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a, d = self.args, cfg.n_embd
        H, self.head_k, head_v = a.dims(d, cfg.n_head)
        dk, dv = H * self.head_k, H * head_v
        self._build((dk, dk, dv), {"b": H}, H, head_v, a.use_gate, a.conv_size if a.use_short_conv else None)

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        B, T, _ = x.shape
        q, k, v, ex, tail = self._project(x, state)
        H = self.n_heads
        o, S = delta_rule(q.view(B, T, H, self.head_k), k.view(B, T, H, self.head_k), v.view(B, T, H, self.head_v),
                          self._beta(ex["b"]), initial_state=state.recurrent if state is not None else None,
                          output_final_state=state is not None, qk_l2norm=True, backend=self.cfg.backend,
                          chunk_size=self.args.chunk_size)
        return self._finish(x, o, ex, state, S, tail)

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: the projections
        q, k, v, b, [g], o; the three depthwise convolutions (2*W per channel); the chunked WY delta rule
        at the configured chunk size (see _delta_common.chunked_delta_flops; the FLA kernels use the
        same chunk size). Norms, activations and l2norm (elementwise, < 1%) are left out."""
        a = cls.Args.from_dict(cfg.mixer_args, "deltanet")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        d, dk, dv = cfg.n_embd, H * hk, H * hv
        proj = 2 * d * (2 * dk + dv + H + (dv if a.use_gate else 0)) + 2 * dv * d  # ... + o_proj
        conv = 2 * a.conv_size * (2 * dk + dv) if a.use_short_conv else 0
        return proj + conv + chunked_delta_flops(T, H, hk, hv, a.chunk_size) / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*K*V of the recurrent matrix plus (W-1) inputs per channel of the q|k|v convolution;
        independent of T."""
        a = cls.Args.from_dict(cfg.mixer_args, "deltanet")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        return cls._decode_state_elements(H, hk, hv, H * (2 * hk + hv) if a.use_short_conv else None, a.conv_size)
