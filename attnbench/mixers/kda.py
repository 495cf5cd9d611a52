"""Kimi Delta Attention (Kimi Team 2025, "Kimi Linear"), as FLA's `KimiDeltaAttention` layer
(fla.layers.kda) builds it:

    q, k, v = conv_silu(W_q x), conv_silu(W_k x), conv_silu(W_v x)
    g       = -exp(A_log[h]) * softplus(W_f2 W_f1 x + dt_bias)   (log-decay per head AND key channel, float32)
    beta    = sigmoid(W_b x)  (x2 with allow_neg_eigval)
    o       = kda(l2norm(q), l2norm(k), v, g, beta)                 (ops/kda.py)
    y       = o_proj(rmsnorm_per_head(o) * sigmoid(W_g2 W_g1 x + b_g))

The decay and the output gate go through low-rank projections (rank = the value head dim, as FLA):
W_f1 [r, d] then W_f2 [H*K, r]; W_g1 [r, d] then W_g2 [H*V, r] with a bias. A_log is one per head,
dt_bias one per head and key channel. The output gate is a sigmoid (FLA's FusedRMSNormGated with
activation="sigmoid"), where Gated DeltaNet uses SiLU.

Heads: num_heads (default model.n_head) of key dim head_dim (default n_embd // num_heads) and value dim
head_dim*expand_v (expand_v = 1, FLA's default for KDA). As in the other delta mixers (_delta_common),
W_q, W_k, W_v, W_f1, W_b, W_g1 are one in_proj (rows q | k | v | f | b | gate) and the three
convolutions one (channels q | k | v); W_f2 and W_g2 are their own Linears (`f_up`, `g_up`).
Not built: FLA's grouped value heads (num_v_heads), its bounded "safe gate" (safe_gate, lower_bound),
a bias on the convolutions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.kda import KDA_CHUNK_SIZES, kda
from . import register
from ._delta_common import (DeltaArgs, DeltaMixer, DeltaState, HeadRMSNorm, arg_error, check_common,
                            chunked_delta_flops, per_head_dims)


@dataclass
class KDAArgs(DeltaArgs):
    num_heads: int | None = None  # None: model.n_head
    head_dim: int | None = None  # key head dim; None: n_embd // num_heads
    expand_v: float = 1.0
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    conv_size: int = 4
    chunk_size: int = 64  # 32 | 64 (FLA's chunk_kda)

    def dims(self, n_embd: int, n_head: int) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim), validated."""
        check_common(self.num_heads, self.conv_size)
        H = self.num_heads or n_head
        hk, hv = per_head_dims(n_embd, H, self.head_dim, self.expand_v)
        if self.chunk_size not in KDA_CHUNK_SIZES:
            raise arg_error("chunk_size", f"must be one of {KDA_CHUNK_SIZES} (FLA's chunk_kda), got {self.chunk_size}")
        return H, hk, hv


class ChannelDecayGate(nn.Module):
    """KDA's log-decay: g = -exp(A_log[h]) * softplus(f + dt_bias[h, d]) <= 0, float32 `[..., H, K]`.

    As FLA's layer: A_log = log U(1, 16) per head; dt_bias = softplus^-1(dt) per head and key channel,
    dt ~ logU(1e-3, 1e-1) clamped >= 1e-4. Neither takes weight decay.
    """

    def __init__(self, n_heads: int, head_k: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads * head_k))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.n_heads, self.head_k = n_heads, head_k
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """f `[..., H*K]` (the low-rank projection's output) -> g `[..., H, K]`."""
        dt = torch.float64 if f.dtype == torch.float64 else torch.float32
        f = (f + self.dt_bias.to(dt)).view(*f.shape[:-1], self.n_heads, self.head_k)
        return -self.A_log.to(dt).exp()[:, None] * F.softplus(f)


class SigmoidGatedRMSNorm(HeadRMSNorm):
    """Per-head RMSNorm times sigmoid(gate) (FLA's FusedRMSNormGated, activation='sigmoid')."""

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dt = torch.float64 if o.dtype == torch.float64 else torch.float32
        y = F.rms_norm(o.to(dt), (o.shape[-1],), self.weight.to(dt), self.eps)
        if gate is not None:
            y = y * torch.sigmoid(gate.to(dt))
        return y.to(o.dtype)


@register("kda")
class KimiDeltaAttention(DeltaMixer):
    Args = KDAArgs

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a, d = self.args, cfg.n_embd
        H, self.head_k, head_v = a.dims(d, cfg.n_head)
        dk, dv = H * self.head_k, H * head_v
        self.rank = head_v  # FLA's f_proj / g_proj bottleneck
        self.decay = ChannelDecayGate(H, self.head_k)
        self._build((dk, dk, dv), {"f": self.rank, "b": H, "gate": self.rank}, H, head_v, False,
                    a.conv_size if a.use_short_conv else None)
        self.f_up = nn.Linear(self.rank, dk, bias=False)
        self.g_up = nn.Linear(self.rank, dv, bias=True)
        self.o_norm = SigmoidGatedRMSNorm(head_v)

    def reset_mixer_parameters(self) -> None:
        super().reset_mixer_parameters()
        self.decay.reset_parameters()

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        B, T, _ = x.shape
        q, k, v, ex, tail = self._project(x, state)
        H, K = self.n_heads, self.head_k
        g = self.decay(self.f_up(ex["f"]))  # [B, T, H, K] float32
        o, S = kda(q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, self.head_v), g, self._beta(ex["b"]),
                   initial_state=state.recurrent if state is not None else None, output_final_state=state is not None,
                   qk_l2norm=True, backend=self.cfg.backend, chunk_size=self.args.chunk_size)
        return self._finish(x, o, {"g": self.g_up(ex["gate"])}, state, S, tail)

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: in_proj (q, k, v, the two
        low-rank inputs, b), the two low-rank up-projections, o_proj; the q|k|v depthwise convolution; the
        chunked WY rule at the configured chunk size (_delta_common.chunked_delta_flops: its decayed K K^T
        and Q K^T are C x C x K products per chunk as in the scalar-gated rule). The gate's exp/softplus,
        the cumulative decays and the norms are elementwise: left out (< 1%)."""
        a = cls.Args.from_dict(cfg.mixer_args, "kda")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        d, dk, dv = cfg.n_embd, H * hk, H * hv
        proj = 2 * d * (2 * dk + dv + 2 * hv + H) + 2 * hv * (dk + dv) + 2 * dv * d
        conv = 2 * a.conv_size * (2 * dk + dv) if a.use_short_conv else 0
        return proj + conv + chunked_delta_flops(T, H, hk, hv, a.chunk_size) / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*K*V of the recurrent matrix plus (W-1) inputs per channel of the q|k|v convolution."""
        a = cls.Args.from_dict(cfg.mixer_args, "kda")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        return cls._decode_state_elements(H, hk, hv, H * (2 * hk + hv) if a.use_short_conv else None, a.conv_size)
