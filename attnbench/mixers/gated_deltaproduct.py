"""Gated DeltaProduct (Siems et al. 2025, "DeltaProduct"), as FLA's `GatedDeltaProduct` *layer*
builds it (fla.layers.GatedDeltaProduct; its layer defaults, not its model-config defaults):

    per token t: n keys, values and betas (W_k: d -> n*H*hd, W_v: d -> n*H*hv, W_b: d -> n*H),
    each sequence of n rank-1 delta steps preceded by one decay exp(g_t) and followed by one read
    with q_t:  S <- e^{g_t} S;  for j < n: S <- S + beta_tj k_tj (v_tj - S^T k_tj)^T;  o_t = S^T q_t
    g    = -exp(A_log) * softplus(W_a x + dt_bias)   (use_forget_gate)
    beta = sigmoid(W_b x), x2 with allow_neg_eigval (default on: the product of n reflections can
           represent rotations / state tracking)
    y    = o_proj(rmsnorm_per_head(o) * silu(W_g x))  (use_output_gate)

The projections are laid out '(n h d)' per token and rearranged to '(t n) h d' (token-major
interleaving) for the op gated_delta_product (ops/delta_product.py). W_q, W_k, W_v, W_b [, W_a] [, W_g]
are one in_proj (rows q | k | v | b | a | g) and the three convolutions one (channels q | k | v): see
_delta_common.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..ops.delta_product import gated_delta_product
from . import register
from ._delta_common import (DeltaArgs, FLOP_CHUNK, DecayGate, DeltaMixer, DeltaState, arg_error, check_common,
                            chunked_delta_flops, per_head_dims)


@dataclass
class GatedDeltaProductArgs(DeltaArgs):
    num_householder: int = 2
    num_heads: int | None = None  # None: model.n_head
    head_dim: int | None = None  # key head dim; None: n_embd // num_heads
    expand_v: float = 1.0
    use_forget_gate: bool = True
    allow_neg_eigval: bool = True
    use_output_gate: bool = True
    conv_size: int = 4

    def dims(self, n_embd: int, n_head: int) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim), validated."""
        check_common(self.num_heads, self.conv_size)
        if self.num_householder < 1:
            raise arg_error("num_householder", f"must be >= 1, got {self.num_householder}")
        H = self.num_heads or n_head
        hk, hv = per_head_dims(n_embd, H, self.head_dim, self.expand_v)
        return H, hk, hv


@register("gated_deltaproduct")
class GatedDeltaProduct(DeltaMixer):
    Args = GatedDeltaProductArgs

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a, d = self.args, cfg.n_embd
        n = self.n = a.num_householder
        H, self.head_k, head_v = a.dims(d, cfg.n_head)
        dk, dv = H * self.head_k, H * head_v
        self.decay = DecayGate(H) if a.use_forget_gate else None
        extras = {"b": n * H} | ({"a": H} if a.use_forget_gate else {})
        self._build((dk, n * dk, n * dv), extras, H, head_v, a.use_output_gate, a.conv_size)

    def forward(self, x: torch.Tensor, state: DeltaState | None = None) -> tuple[torch.Tensor, DeltaState | None]:
        B, T, _ = x.shape
        q, k, v, ex, tail = self._project(x, state)
        H, n = self.n_heads, self.n
        # '... t (n h d) -> ... (t n) h d': the n entries of token t sit at t*n .. t*n+n-1
        k = k.reshape(B, T * n, H, self.head_k)
        v = v.reshape(B, T * n, H, self.head_v)
        beta = self._beta(ex["b"]).reshape(B, T * n, H)
        g = self.decay(ex["a"]) if self.decay is not None else None
        o, S = gated_delta_product(q.view(B, T, H, self.head_k), k, v, g, beta, n,
                                   initial_state=state.recurrent if state is not None else None,
                                   output_final_state=state is not None, qk_l2norm=True,
                                   backend=self.cfg.backend)
        return self._finish(x, o, ex, state, S, tail)

    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) over a length-T sequence: projections q, k (x n),
        v (x n), b (x n), [a], [g], o; the depthwise convolutions; the chunked WY delta rule (chunk 64, as
        FLA's kernel) on the interleaved length-T*n sequence (_delta_common.chunked_delta_flops), which
        is how both our PyTorch path and FLA's backward compute it (q is zero at n-1 of every n rows but
        the products are still done). Elementwise work is left out (< 1%)."""
        a = cls.Args.from_dict(cfg.mixer_args, "gated_deltaproduct")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        n, d, dk, dv = a.num_householder, cfg.n_embd, H * hk, H * hv
        outs = dk + n * dk + n * dv + n * H + (H if a.use_forget_gate else 0) + (dv if a.use_output_gate else 0)
        proj = 2 * d * outs + 2 * dv * d
        conv = 2 * a.conv_size * (dk + n * dk + n * dv)
        return proj + conv + chunked_delta_flops(T * n, H, hk, hv, FLOP_CHUNK) / T

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """H*K*V of the recurrent matrix plus (W-1) inputs per channel of the q|k|v convolution
        (k and v are n times wider)."""
        a = cls.Args.from_dict(cfg.mixer_args, "gated_deltaproduct")
        H, hk, hv = a.dims(cfg.n_embd, cfg.n_head)
        n = a.num_householder
        return cls._decode_state_elements(H, hk, hv, H * (hk + n * hk + n * hv), a.conv_size)
