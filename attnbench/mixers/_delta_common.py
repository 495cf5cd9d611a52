"""Parts shared by the delta-family mixers (deltanet.py, gated_deltanet.py, gated_deltaproduct.py).

All three follow FLA's layers (fla.layers.DeltaNet, GatedDeltaNet, GatedDeltaProduct): q/k/v
projections -> causal short convolutions with SiLU -> (L2-normalised q, k inside the op) -> a delta-rule
op -> per-head output RMSNorm (optionally gated) -> o_proj. This module holds the pieces they share: the short convolution, the output norm,
the Mamba-style decay gate, the decoding state, and a base class that wires projections, state and
output together. The mixers only choose their dimensions and call their op.

Fused layout (the step is launch-bound on the GPU: one GEMM and one convolution instead of 3-6 and 3).
Every input projection is one `in_proj: nn.Linear(d, sum of widths)` whose output rows are, in order,

    q | k | v | then each mixer's per-token extras (e.g. b = beta logits, a = decay input, g = output gate)

and the q|k|v block goes through ONE depthwise convolution `conv1d.weight [Dq+Dk+Dv, W]` (FLA fuses its three
convolutions the same way when it has no cache). This is the same maths and parameter count as separate
q/k/v/b/a/g projections and convolutions, stacked: row r of in_proj.weight is row r of the matching part.
`proj_layout` names the parts and their widths; o_proj stays its own Linear (the model's scaled init keys
on `o_proj.weight`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.delta_rule import FLA_CHUNK_SIZES, FLA_MAX_K
from ..ops.short_conv import causal_conv1d
from .base import Mixer, MixerArgs

NORM_EPS = 1e-5  # FLA's norm_eps for the output norms
FLOP_CHUNK = 64  # chunk size the FLOP formulas assume when a mixer has no chunk_size of its own


def arg_error(key: str, msg: str) -> ConfigError:
    return ConfigError(f"model.mixer_args.{key}: {msg}")


def check_common(num_heads: int | None, conv_size: int) -> None:
    if num_heads is not None and num_heads < 1:
        raise arg_error("num_heads", f"must be >= 1 (or unset for model.n_head), got {num_heads}")
    if conv_size < 1:
        raise arg_error("conv_size", f"must be >= 1, got {conv_size}")


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size not in FLA_CHUNK_SIZES:
        raise arg_error("chunk_size", f"must be one of {FLA_CHUNK_SIZES} (the FLA kernels' chunk sizes), "
                        f"got {chunk_size}")


def check_key_head_dim(key: str, head_k: int) -> None:
    if head_k > FLA_MAX_K:
        raise arg_error(key, f"gives a key head dim of {head_k}, but the FLA kernels need <= {FLA_MAX_K}; "
                        "use more heads or a smaller key width")


def integer_dim(key: str, value: float, what: str) -> int:
    """round(value), or a ConfigError naming `key` when value is not (close to) an integer."""
    if value < 1 or not math.isclose(value, round(value), rel_tol=0, abs_tol=1e-6):
        raise arg_error(key, f"{what} = {value:g} must be a positive integer")
    return round(value)


def expanded_head_dims(n_embd: int, H: int, expand_k: float, expand_v: float) -> tuple[int, int]:
    """(key, value) head dims when the key and value widths are n_embd * expand (DeltaNet, GLA), validated:
    whole numbers, divisible by the H heads, keys within the FLA kernels' limit."""
    dk = integer_dim("expand_k", n_embd * expand_k, f"n_embd * expand_k = {n_embd} * {expand_k}")
    dv = integer_dim("expand_v", n_embd * expand_v, f"n_embd * expand_v = {n_embd} * {expand_v}")
    for key, dim in (("expand_k", dk), ("expand_v", dv)):
        if dim % H:
            raise arg_error("num_heads", f"{H} heads do not divide n_embd * {key} = {dim}; "
                            "choose num_heads (or model.n_head) dividing it")
    check_key_head_dim("expand_k", dk // H)
    return dk // H, dv // H


def per_head_dims(n_embd: int, H: int, head_dim: int | None, expand_v: float) -> tuple[int, int]:
    """(key, value) head dims when the key head dim is given (default n_embd // H) and values are expand_v
    times it (Gated DeltaNet, Gated DeltaProduct, KDA), validated."""
    hk = head_dim if head_dim is not None else n_embd // H
    if hk < 1:
        raise arg_error("head_dim", f"must be >= 1, got {hk} (n_embd // num_heads = {n_embd} // {H})")
    check_key_head_dim("head_dim", hk)
    return hk, integer_dim("expand_v", hk * expand_v, f"head_dim * expand_v = {hk} * {expand_v}")


class ShortConv(nn.Module):
    """Depthwise causal convolution (no bias) with SiLU, weight `[D, W]` (weight[:, W-1] hits the
    current token). The decoding tail `[B, D, W-1]` holds the last W-1 raw inputs."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default (what FLA's ShortConvolution layer gets when built): U(+-1/sqrt(fan_in)),
        # fan_in = W for a depthwise conv. (FLA's model classes redraw it as normal(0, initializer_range).)
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None, keep_tail: bool = False,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
        return causal_conv1d(x, self.weight, None, activation="silu", state=tail,
                             output_final_state=keep_tail, backend=backend)


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm over the head's value dim, one weight shared by all heads (as FLA).

    Without a gate: y = rmsnorm(o) * w. With a gate (FLA's FusedRMSNormGated, swish):
    y = rmsnorm(o) * w * silu(gate). Computed in float32 (float64 stays float64), returned in o's dtype.
    F.rms_norm is the same maths; with input and weight of one dtype it can dispatch to torch's fused
    kernel (one launch forward, instead of pow/mean/add/rsqrt/mul/mul and their backward).
    """

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dt = torch.float64 if o.dtype == torch.float64 else torch.float32
        y = F.rms_norm(o.to(dt), (o.shape[-1],), self.weight.to(dt), self.eps)
        if gate is not None:
            y = y * F.silu(gate.to(dt))
        return y.to(o.dtype)


class DecayGate(nn.Module):
    """Mamba-style log-decay per head: g = -exp(A_log) * softplus(a + dt_bias) <= 0 (float32).

    A_log = log(U(0, 16)); dt_bias = softplus^-1(dt), dt ~ logU(1e-3, 1e-1) clamped >= 1e-4.
    Neither takes weight decay.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # uniform_(0, 16) can draw exactly 0 -> log = -inf; a tiny floor keeps A finite
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_(min=1e-4).log())
        lo, hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        # a (bf16 under autocast) + the float32 bias promotes to float32, as a.float() + bias would; on CUDA
        # the add reads a as bf16 itself, so no separate cast kernel
        return -self.A_log.to(dt).exp() * F.softplus(a + self.dt_bias.to(dt))


@dataclass
class DeltaState:
    """Decoding state of one delta-family layer for a batch of sequences.

    recurrent: the fast-weight matrix `[B, H, K, V]`, float32 (float64 in float64 runs);
    conv: the fused q|k|v short convolution's tail `[B, Dq+Dk+Dv, W-1]` (None without convolutions);
    pos: tokens seen so far.
    """

    recurrent: torch.Tensor
    conv: torch.Tensor | None = None
    pos: int = 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.recurrent, self.conv) if t is not None]


def _store(state: DeltaState, name: str, new: torch.Tensor | None) -> None:
    """Put a layer's new state tensor into `state`. Without autograd (decoding) it is copied into the
    existing storage, so a decode step keeps fixed memory and can be replayed as a CUDA graph; when
    gradients flow through the state it is rebound instead (autograd may have saved the old value)."""
    old = getattr(state, name)
    if old is None or new is None:
        setattr(state, name, new)
    elif old.shape == new.shape and not (new.requires_grad or old.requires_grad):
        old.copy_(new)
    else:
        setattr(state, name, new.to(old.dtype) if name == "recurrent" else new)


def chunked_delta_flops(T: int, H: int, K: int, V: int, C: int) -> float:
    """Forward FLOPs of the chunked WY delta rule (ops/delta_rule.py::chunked_core) for T tokens.

    Per chunk of C rows and head (multiply-add = 2 FLOPs): K K^T and Q K^T (2 x 2C^2K), W S0, Q S0 and
    the state update K^T V_new (3 x 2CKV), (QK^T) V_new (2C^2V), plus the unit-lower-triangular solve
    (I+L)[U|W] = rhs by forward substitution, C(C-1)(K+V) - which FlopCounterMode does not see.
    Elementwise work (masks, exp of the gates) is O(C^2) per chunk and left out. T is padded to N*C.
    """
    C = max(1, min(C, T))
    N = -(-T // C)
    per_chunk = 4 * C * C * K + 2 * C * C * V + 6 * C * K * V + C * (C - 1) * (K + V)
    return float(H * N * per_chunk)


def triangular_solve_flops(T: int, H: int, K: int, V: int, C: int) -> float:
    """The part of chunked_delta_flops that FlopCounterMode cannot see (for the cross-check)."""
    C = max(1, min(C, T))
    return float(H * (-(-T // C)) * C * (C - 1) * (K + V))


@dataclass
class DeltaArgs(MixerArgs):
    """Base of the delta mixers' settings: `dims(n_embd, n_head)` validates and returns
    (heads, key head dim, value head dim); validation is exactly that check."""

    def validate(self, n_embd: int, n_head: int) -> None:
        self.dims(n_embd, n_head)


class DeltaMixer(Mixer):
    """Base of the delta-family mixers: the fused input projection and convolution, state, output.

    A subclass sets `head_k` and calls `_build(...)` in __init__ with its widths; its forward calls `_project` (in_proj,
    the q|k|v convolution, SiLU), its op, then `_finish` (norm, gate, o_proj, state update).
    """

    encodes_position = True  # recurrence orders the tokens; learned or no position embedding both work

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.pos_emb == "rope":
            raise ConfigError(f"model.pos_emb='rope' does not apply to mixer {cls.name!r}: it has no attention "
                              "scores to rotate (its recurrence encodes order); use pos_emb='learned' or 'none'")

    def _build(self, qkv: tuple[int, int, int], extras: dict[str, int], n_heads: int, head_v: int,
               use_gate: bool, conv_size: int | None) -> None:
        """in_proj (d -> q|k|v|extras|[g]), the fused q|k|v convolution (none when conv_size is None),
        the per-head output norm and o_proj (H*head_v -> d). `extras` maps a name to its width, in order."""
        d = self.cfg.n_embd
        self.n_heads, self.head_v = n_heads, head_v
        layout = dict(zip("qkv", qkv)) | extras | ({"g": n_heads * head_v} if use_gate else {})
        self.proj_layout: dict[str, int] = layout
        self.qkv_dims = qkv
        # first split: the q|k|v block (one convolution input) and each extra
        self._splits = [sum(qkv)] + list(layout.values())[3:]
        self.in_proj = nn.Linear(d, sum(layout.values()), bias=False)
        self.conv_size = conv_size
        self.conv1d = ShortConv(sum(qkv), conv_size) if conv_size is not None else None
        self.o_norm = HeadRMSNorm(head_v)
        self.o_proj = nn.Linear(n_heads * head_v, d, bias=False)

    def reset_mixer_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (ShortConv, DecayGate)):
                m.reset_parameters()

    def _project(self, x: torch.Tensor, state: DeltaState | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """One GEMM, one convolution (SiLU either way): q, k, v `[B, T, D*]` (views of one tensor), the extras
        by name (views of the GEMM's output, pre-activation) and the new convolution tail (None without state)."""
        # one split each (not several slices): autograd's backward of a split is a single cat
        qkv, *rest = self.in_proj(x).split(self._splits, dim=-1)
        extras = dict(zip(list(self.proj_layout)[3:], rest))
        tail = None
        if self.conv1d is None:
            qkv = F.silu(qkv)
        else:
            qkv, tail = self.conv1d(qkv, state.conv if state is not None else None, state is not None,
                                    self.cfg.backend)
        q, k, v = qkv.split(self.qkv_dims, dim=-1)
        return q, k, v, extras, tail

    def _beta(self, b: torch.Tensor) -> torch.Tensor:
        beta = b.sigmoid()
        return beta * 2 if self.args.allow_neg_eigval else beta

    def _finish(self, x: torch.Tensor, o: torch.Tensor, extras: dict[str, torch.Tensor], state: DeltaState | None,
                S: torch.Tensor | None, tail: torch.Tensor | None) -> tuple[torch.Tensor, DeltaState | None]:
        """o `[B, T, H, head_v]` -> norm (gated by extras['g'] when present) -> o_proj; records the new state."""
        B, T = x.shape[:2]
        gate = extras["g"].view(B, T, self.n_heads, self.head_v) if "g" in extras else None
        y = self.o_proj(self.o_norm(o, gate).reshape(B, T, -1))
        if state is not None:
            _store(state, "recurrent", S)
            _store(state, "conv", tail)
            state.pos += T
        return y, state

    def init_state(self, batch: int, max_len: int, device, dtype: torch.dtype) -> DeltaState:
        """A zero recurrent matrix [B, H, head_k, head_v] (float32; float64 for float64 models) and a
        zero convolution tail; both independent of max_len."""
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        S = torch.zeros(batch, self.n_heads, self.head_k, self.head_v, device=device, dtype=sdt)
        if self.conv1d is None:
            return DeltaState(S)
        return DeltaState(S, torch.zeros(batch, sum(self.qkv_dims), self.conv_size - 1, device=device, dtype=dtype))

    @staticmethod
    def _decode_state_elements(H: int, K: int, V: int, conv_dim: int | None, conv_size: int) -> int:
        """H*K*V of the recurrent matrix plus W-1 inputs per channel of the q|k|v convolution."""
        return H * K * V + (conv_dim * (conv_size - 1) if conv_dim is not None else 0)
