"""Gated Linear Attention (Yang, Wang, Shen, Panda & Kim 2024), as FLA's `GatedLinearAttention` layer
(fla.layers.GatedLinearAttention) builds it with its defaults:

    q, k, v = W_q x, W_k x, W_v x                         (no feature map, no short convolution)
    gk      = logsigmoid(W_2 W_1 x + b_2) / 16             (per key channel, float32; low rank 16)
    o       = gla(q, k, v, gk)                             (ops/gla.py: S_t = diag(e^{gk_t}) S_{t-1} + k_t v_t^T,
                                                            o_t = S_t^T q_t / sqrt(K))
    y       = o_proj(rmsnorm_per_head(o) * silu(W_g x))    (use_output_gate; plain rmsnorm without)

FLA's defaults are kept: feature_map None (q and k enter the recurrence as projected) and
use_short_conv False; `use_short_conv = true` adds FLA's optional causal convolutions with SiLU on q, k, v.
The gate normaliser (gate_logit_normalizer, 16) keeps the decay near 1 (e^{-ln 2 / 16} = 0.958 per token at
a zero logit) so the state starts with a long memory.

Heads: num_heads (default model.n_head) of key dim n_embd*expand_k/H and value dim n_embd*expand_v/H;
expand_k 0.5 and expand_v 1 are the paper's and FLA's, which puts the layer at 4 d^2 parameters, softmax
attention's. W_q, W_k, W_v, W_1 (d -> gate_low_rank_dim) and W_g are one in_proj (rows q | k | v | gk | g),
W_2 with its bias is `gk_up`; the layout and state are the delta family's (_delta_common).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.gla import GLA_CHUNK_SIZES, chunked_gla_flops, gla
from . import register
from ._delta_common import DeltaArgs, DeltaMixer, DeltaState, arg_error, check_common, expanded_head_dims


@dataclass
class GLAArgs(DeltaArgs):
    num_heads: int | None = None  # None: model.n_head
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    use_output_gate: bool = True
    use_short_conv: bool = False  # FLA's GLA default
    conv_size: int = 4
    chunk_size: int = 64  # 16 | 32 | 64: the PyTorch path's (FLA's chunk_gla chooses its own)

    def dims(self, n_embd: int, n_head: int) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim), validated."""
        check_common(self.num_heads, self.conv_size)
        H = self.num_heads or n_head
        hk, hv = expanded_head_dims(n_embd, H, self.expand_k, self.expand_v)
        if self.gate_low_rank_dim < 1:
            raise arg_error("gate_low_rank_dim", f"must be >= 1, got {self.gate_low_rank_dim}")
        if not self.gate_logit_normalizer > 0:
            raise arg_error("gate_logit_normalizer", f"must be > 0, got {self.gate_logit_normalizer}")
        if self.chunk_size not in GLA_CHUNK_SIZES:
            raise arg_error("chunk_size", f"must be one of {GLA_CHUNK_SIZES}, got {self.chunk_size}")
        return H, hk, hv


@register("gla")
class GatedLinearAttention(DeltaMixer):
    Args = GLAArgs

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a, d = self.args, cfg.n_embd
        H, self.head_k, head_v = a.dims(d, cfg.n_head)
        dk, dv = H * self.head_k, H * head_v
        self._build((dk, dk, dv), {"gk": a.gate_low_rank_dim}, H, head_v, a.use_output_gate,
                    a.conv_size if a.use_short_conv else None)
        # the gate's second low-rank factor W_2 (with FLA's bias); W_1 is in_proj's 'gk' rows
        self.gk_up = nn.Linear(a.gate_low_rank_dim, dk, bias=True)

    def _project(self, x: torch.Tensor, state: DeltaState | None):
        if self.conv1d is not None:
            return super()._project(x, state)  # FLA's short convolutions, with SiLU
        # no feature map: q, k, v enter the recurrence as projected (the delta family applies SiLU)
        qkv, *rest = self.in_proj(x).split(self._splits, dim=-1)
        q, k, v = qkv.split(self.qkv_dims, dim=-1)
        return q, k, v, dict(zip(list(self.proj_layout)[3:], rest)), None

    def log_decay(self, gk_low: torch.Tensor) -> torch.Tensor:
        """logsigmoid(W_2 gk_low + b_2) / gate_logit_normalizer, in float32 (float64 for float64 models)."""
        dt = torch.float64 if gk_low.dtype == torch.float64 else torch.float32
        return F.logsigmoid(self.gk_up(gk_low).to(dt)) / self.args.gate_logit_normalizer

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        B, T, _ = x.shape
        q, k, v, ex, tail = self._project(x, state)
        H, K = self.n_heads, self.head_k
        o, S = gla(q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, self.head_v),
                   self.log_decay(ex["gk"]).view(B, T, H, K),
                   initial_state=state.recurrent if state is not None else None,
                   output_final_state=state is not None, backend=self.cfg.backend, chunk_size=self.args.chunk_size)
        return self._finish(x, o, ex, state, S, tail)

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: the projections q, k, v,
        the gate's two low-rank factors, [g], o; [the three depthwise convolutions]; the chunked GLA at
        the configured chunk size (ops/gla.py::chunked_gla_flops). logsigmoid, norms and gates are
        elementwise and left out (< 1%)."""
        a = cls.Args.from_dict(cfg.mixer_args, "gla")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        d, dk, dv, r = cfg.n_embd, H * hk, H * hv, a.gate_low_rank_dim
        proj = 2 * d * (2 * dk + dv + r + (dv if a.use_output_gate else 0)) + 2 * r * dk + 2 * dv * d
        conv = 2 * a.conv_size * (2 * dk + dv) if a.use_short_conv else 0
        return proj + conv + chunked_gla_flops(T, H, hk, hv, a.chunk_size) / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*K*V of the recurrent matrix [plus (W-1) inputs per channel of the q|k|v convolution];
        independent of T."""
        a = cls.Args.from_dict(cfg.mixer_args, "gla")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        return cls._decode_state_elements(H, hk, hv, H * (2 * hk + hv) if a.use_short_conv else None, a.conv_size)
