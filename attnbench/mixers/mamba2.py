"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"), the block as published (mamba_ssm's Mamba2), one group:

    z | xBC | dt_raw = in_proj(u)                          widths d_inner | d_inner + 2N | H
    x | B | C        = silu(conv1d(xBC))                    causal depthwise convolution of width d_conv
    dt               = softplus(dt_raw + dt_bias),  A = -exp(A_log)         (per head, float32)
    S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T,  y_t = S_t^T C_t + D x_t    (per head: ops/ssd.py)
    out              = o_proj(rmsnorm(y * silu(z)) * w)    (gated RMSNorm over d_inner, norm after gate)

x is split into H heads of head_dim P; B and C (d_state N each) are shared by all heads (n_groups = 1:
one B and one C per token, as the published default). The state per head is N x P; the decode state is
those H*N*P numbers plus the convolution's last d_conv - 1 inputs per channel, independent of T.

Width: d_inner = expand * n_embd rounded to a whole number of heads (H = round(expand * n_embd / P)).
The published block needs d_inner to be a multiple of P exactly; rounding keeps expand (2 by default)
within half a head of it while the parameter search moves n_embd in steps of 2, which a budget needs
to be met to 1% (steps of P / expand widths would move the count by about 9% at 10.7M). The search
varies `head_dim` (SEARCHED_ARGS); model.n_head is not used by this mixer (its heads follow from the
width), so matched shapes report the mixer's own head count.

Parameters per layer: n_embd (2 d_inner + 2N + H) in in_proj, (d_inner + 2N)(d_conv + 1) in the
convolution (weight and bias), 3H for A_log, dt_bias and D, d_inner for the norm, d_inner n_embd in o_proj.
Initialisation as mamba_ssm: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1) through the inverse softplus of dt_bias,
D = 1, the convolution as nn.Conv1d's default; none of A_log, dt_bias, D takes weight decay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.delta_rule import FLA_MAX_K
from ..ops.short_conv import causal_conv1d
from ..ops.ssd import ssd
from . import register
from ._delta_common import DeltaState, _store, arg_error, check_chunk_size
from .base import Mixer, MixerArgs

NORM_EPS = 1e-5  # mamba_ssm's RMSNormGated eps


@dataclass
class Mamba2Args(MixerArgs):
    expand: float = 2.0   # d_inner ~ expand * n_embd (rounded to whole heads)
    head_dim: int = 64    # P, searched by the parameter matcher
    d_state: int = 64     # N (mamba_ssm's default is 128; 64 at this model size)
    d_conv: int = 4
    chunk_size: int = 64  # 16 | 32 | 64

    def dims(self, n_embd: int) -> tuple[int, int, int]:
        """(heads H, head dim P, d_state N), validated."""
        if not self.expand > 0:
            raise arg_error("expand", f"must be > 0, got {self.expand}")
        if self.head_dim < 1:
            raise arg_error("head_dim", f"must be >= 1, got {self.head_dim}")
        if not 1 <= self.d_state <= FLA_MAX_K:
            raise arg_error("d_state", f"must be in [1, {FLA_MAX_K}] (FLA's kernels take keys up to "
                            f"{FLA_MAX_K}), got {self.d_state}")
        if self.d_conv < 1:
            raise arg_error("d_conv", f"must be >= 1, got {self.d_conv}")
        check_chunk_size(self.chunk_size)
        H = max(1, math.floor(self.expand * n_embd / self.head_dim + 0.5))
        return H, self.head_dim, self.d_state

    def validate(self, n_embd: int, n_head: int) -> None:
        self.dims(n_embd)


@register("mamba2")
class Mamba2(Mixer):
    Args = Mamba2Args
    encodes_position = True  # the recurrence orders the tokens

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.pos_emb == "rope":
            raise ConfigError("model.pos_emb='rope' does not apply to mixer 'mamba2': it has no attention scores "
                              "to rotate (its recurrence encodes order); use pos_emb='learned' or 'none'")

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        d = cfg.n_embd
        self.n_heads, self.head_dim, self.d_state = self.args.dims(d)
        self.d_inner = self.n_heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.d_state
        self.d_conv = self.args.d_conv
        self._splits = [self.d_inner, self.conv_dim, self.n_heads]  # z | xBC | dt
        self.in_proj = nn.Linear(d, sum(self._splits), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.d_conv))  # weight[:, -1]: current token
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner))
        self.o_proj = nn.Linear(self.d_inner, d, bias=False)
        self.reset_mixer_parameters()  # the model calls it again after its generic init

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_conv)  # nn.Conv1d's default for a depthwise conv (fan_in = d_conv)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        b, T, _ = x.shape
        H, P, N = self.n_heads, self.head_dim, self.d_state
        z, xBC, dt = self.in_proj(x).split(self._splits, dim=-1)
        xBC, tail = causal_conv1d(xBC, self.conv_weight, self.conv_bias, activation="silu",
                                  state=state.conv if state is not None else None,
                                  output_final_state=state is not None, backend=self.cfg.backend)
        xs, B, C = xBC.split([self.d_inner, N, N], dim=-1)
        wt = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(wt) + self.dt_bias.to(wt))                           # [b, T, H]
        A = -self.A_log.to(wt).exp()                                                # [H]
        xs = xs.reshape(b, T, H, P)
        y, S = ssd(xs, dt, A, B, C, initial_state=state.recurrent if state is not None else None,
                   output_final_state=state is not None, backend=self.cfg.backend, chunk_size=self.args.chunk_size)
        y = y.to(wt) + xs.to(wt) * self.D.to(wt)[:, None]
        y = y.reshape(b, T, self.d_inner) * F.silu(z.to(wt))                         # gate, then norm
        y = F.rms_norm(y, (self.d_inner,), self.norm_weight.to(wt), NORM_EPS)
        out = self.o_proj(y.to(x.dtype))
        if state is not None:
            _store(state, "recurrent", S)
            _store(state, "conv", tail)
            state.pos += T
        return out, state

    def init_state(self, batch: int, max_len: int, device, dtype: torch.dtype) -> DeltaState:
        """A zero SSM state [B, H, N, P] (float32; float64 for float64 models) and a zero convolution tail
        [B, d_inner + 2N, d_conv - 1]; both independent of max_len."""
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        S = torch.zeros(batch, self.n_heads, self.d_state, self.head_dim, device=device, dtype=sdt)
        return DeltaState(S, torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype))

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: in_proj, the depthwise
        convolution, o_proj, and the chunked SSD (ops/ssd.py) at chunk c = min(chunk_size, T), T padded
        to whole chunks: per chunk C B^T (2c^2 N, shared by the heads), the masked scores times dt*x
        (2 H c^2 P), the read-out of the carried state and each chunk's end state (2 x 2 c N H P).
        Decays, masks, softplus, the gate and the norm are elementwise: left out."""
        a = cls.Args.from_dict(cfg.mixer_args, "mamba2")
        H, P, N = a.dims(cfg.n_embd)
        d, di = cfg.n_embd, H * P
        proj = 2 * d * (2 * di + 2 * N + H) + 2 * di * d
        conv = 2 * a.d_conv * (di + 2 * N)
        c = max(1, min(a.chunk_size, T))
        n = -(-T // c)
        per_chunk = 2 * c * c * N + 2 * H * c * c * P + 4 * c * N * H * P
        return proj + conv + n * per_chunk / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*N*P of the SSM state plus (d_conv - 1) inputs per channel of the x|B|C convolution."""
        a = cls.Args.from_dict(cfg.mixer_args, "mamba2")
        H, P, N = a.dims(cfg.n_embd)
        return H * N * P + (H * P + 2 * N) * (a.d_conv - 1)
