"""Sliding-window attention: causal softmax attention over the last `window` tokens, with RoPE.

    q, k, v = W_qkv x                       (H = model.n_head heads of D = n_embd / H, as softmax)
    q, k    = RoPE(q), RoPE(k)              (at each token's absolute position; scores see t - j only)
    o_t     = sum_{j = max(0, t-W+1)}^{t} softmax_j(q_t . k_j / sqrt(D)) v_j        (W = window)
    y       = o_proj(o)                                           (op maths: attnbench/ops/sliding_window.py)

The parameters are softmax's (one qkv projection, one output projection), so at the same shape the
two mixers differ only in the window and the rotary embedding. The mixer always applies its own RoPE:
a window needs relative positions, and the model never rotates anything itself, so `pos_emb = 'rope'`
only means "no learned table" and 'learned' adds absolute embeddings as for the softmax baseline.
There is no attention dropout (FLA's windowed kernel has none, as for NSA); `model.dropout` still
applies to the residual branches.

Decoding state: a ring buffer of the last `window` post-RoPE keys and values, `[B, H, S, D]` each with
S = min(window, max_len) slots; absolute position p lives in slot p mod S. Its size is O(window) at any
context length, and with S = window a sequence can run past `max_len` (only a cache smaller than the
window is bounded by its length). A prefill (or continuation) attends with its queries over the cached
window plus its own keys, then writes its last S keys into their slots. A one-token decode step is
CUDA-graph safe: it takes its position from the device counter `pos_t` (RoPE angles and slot
pos_t mod S computed on the device), writes its key and value with `index_copy_`, and attends over all
S slots with the slots not yet written masked (slot j is valid iff j <= pos_t: once the ring is full
every slot holds one of the last S <= window positions). Static shapes, no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..ops.rotary import apply_rotary, rotary_tables
from ..ops.sliding_window import FLA_MAX_HEAD_DIM, sliding_window_attention, torch_keys_per_query
from . import register
from .base import Mixer, MixerArgs


@dataclass
class SWAArgs(MixerArgs):
    # Keys each query sees, itself included. 64 is a quarter of the bake-off's 256-token context, so
    # the window binds during training (at 256 or more it would be softmax attention there), and it is
    # the window of NSA's sliding branch, so the two compare at the same local reach.
    window: int = 64
    rope_base: float = 10000.0

    def validate(self, n_embd: int, n_head: int) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"model.mixer_args.window must be an int >= 1, got {self.window!r}")
        if not self.rope_base > 0:
            raise ConfigError(f"model.mixer_args.rope_base must be > 0, got {self.rope_base}")
        if n_head >= 1 and n_embd % n_head == 0 and (n_embd // n_head) % 2:
            raise ConfigError(f"sliding-window attention applies RoPE, which needs an even head dim; "
                              f"model.n_embd / model.n_head = {n_embd // n_head}")


@dataclass
class SWACache:
    """Ring buffers of post-RoPE keys and values `[B, H, S, D]`, S = min(window, max_len); position p in
    slot p mod S. `pos` tokens have been seen (any number when S = window).

    `pos_t` holds the same count as a device tensor (bookkeeping, not a dataclass field, so it is not
    counted in decode_state_elements): a decode step takes its position from it (as softmax's KVCache).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    def __post_init__(self) -> None:
        self.pos_t = torch.full((1,), self.pos, dtype=torch.long, device=self.k.device)


@register("swa")
class SlidingWindowAttention(Mixer):
    Args = SWAArgs
    encodes_position = True  # its own RoPE

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.window = self.args.window
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if cfg.backend == "fla" and self.head_dim > FLA_MAX_HEAD_DIM:
            raise ConfigError(f"model.backend='fla' cannot run sliding-window attention with head dim "
                              f"{self.head_dim} (FLA's parallel_attn takes <= {FLA_MAX_HEAD_DIM}): raise "
                              f"model.n_head, or use model.backend='auto'/'torch'")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Every model.pos_emb is fine: the mixer always applies its own RoPE and the model never rotates,
        so 'rope' does not double-rotate, and 'learned' adds absolute embeddings too (as NSA)."""

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_tables(self.head_dim, positions, self.args.rope_base)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def forward(self, x: torch.Tensor, state: SWACache | None = None) -> tuple[torch.Tensor, SWACache | None]:
        B, T, C = x.shape
        H, D, W = self.n_head, self.head_dim, self.window
        q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)  # [B, T, H, D]
        if state is not None and T == 1:
            return self._decode_step(q, k, v, state), state
        start = state.pos if state is not None else 0
        q, k = self._rotate(q, k, torch.arange(start, start + T, device=x.device))
        if state is None:
            o = sliding_window_attention(q, k, v, W, backend=self.cfg.backend)
            return self.o_proj(o.reshape(B, T, C)), None
        # prefill or a multi-token continuation (eager, Python-int positions)
        end = start + T
        self._check_room(state, end)
        S = state.k.shape[2]
        n_prev = min(start, W - 1)  # cached keys inside the first query's window
        if n_prev:
            slots = torch.arange(start - n_prev, start, device=x.device) % S
            k_prev = state.k.index_select(2, slots).transpose(1, 2)  # [B, n_prev, H, D]
            v_prev = state.v.index_select(2, slots).transpose(1, 2)
            # the keys as the cache holds them (rounded to its dtype), as the decode steps read them
            keys = torch.cat([k_prev, k.to(k_prev.dtype)], 1).to(k.dtype)
            vals = torch.cat([v_prev, v.to(v_prev.dtype)], 1).to(v.dtype)
            # queries continuing a cache (TQ < TK): the PyTorch op, as FLA's kernel needs TQ == TK
            o = sliding_window_attention(q, keys, vals, W, backend="torch")
        else:
            o = sliding_window_attention(q, k, v, W, backend=self.cfg.backend)
        n_new = min(T, S)  # only the last S keys can be needed later
        slots = torch.arange(end - n_new, end, device=x.device) % S
        state.k.index_copy_(2, slots, k[:, T - n_new:].transpose(1, 2).to(state.k.dtype))
        state.v.index_copy_(2, slots, v[:, T - n_new:].transpose(1, 2).to(state.v.dtype))
        state.pos = end
        state.pos_t += T
        return self.o_proj(o.reshape(B, T, C)), state

    def _check_room(self, state: SWACache, end: int) -> None:
        # the host-side counter is only checked, never a position of the step (a graph replay freezes it)
        S = state.k.shape[2]
        if S < self.window and end > S:
            raise RuntimeError(f"sliding-window cache of {S} tokens is full (need {end}); a cache made for "
                               f"max_len >= window = {self.window} holds any length")

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: SWACache) -> torch.Tensor:
        """One token per sequence, CUDA-graph safe: position from `st.pos_t` (device), state tensors updated
        in place, static shapes."""
        B, _, H, D = q.shape
        self._check_room(st, st.pos + 1)
        q, k = self._rotate(q, k, st.pos_t)
        S = st.k.shape[2]
        slot = torch.remainder(st.pos_t, S)
        st.k.index_copy_(2, slot, k.transpose(1, 2).to(st.k.dtype))
        st.v.index_copy_(2, slot, v.transpose(1, 2).to(st.v.dtype))
        # every written slot holds one of the last S <= window positions; slots above pos_t are unwritten
        valid = (torch.arange(S, device=q.device) <= st.pos_t).view(1, 1, 1, S)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), st.k.to(q.dtype), st.v.to(q.dtype), attn_mask=valid)
        st.pos += 1
        st.pos_t += 1
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, H * D))

    def init_state(self, batch: int, max_len: int, device, dtype) -> SWACache:
        """Zeroed ring buffers of min(window, max_len) slots (a decode step reads all of them, masked, and
        0 * NaN garbage would be NaN)."""
        shape = (batch, self.n_head, max(1, min(self.window, max_len)), self.head_dim)
        return SWACache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    # ------------------------------------------------------------------ accounting

    @classmethod
    def _window(cls, cfg) -> int:
        return cls.Args.from_dict(cfg.mixer_args, cls.name).window

    @classmethod
    def flops_per_token(cls, cfg, T: int) -> float:
        """Forward FLOPs per token at context length T, multiply-add = 2 FLOPs.

        Projections: qkv 2*d*3d and o_proj 2*d*d, i.e. 8*d^2. Mixing: QK^T and AV over the query's
        window, 2*min(T, W)*d each, i.e. 4*min(T, W)*d (the project's convention of counting every query
        at its full context, here the window). Softmax, scaling, RoPE and biases are elementwise and left
        out (< 1% at d = 384). Equal to softmax's up to T = W, constant in T beyond.
        """
        d = cfg.n_embd
        return 8.0 * d * d + 4.0 * min(T, cls._window(cfg)) * d

    @classmethod
    def flops_per_token_torch(cls, cfg, T: int) -> float:
        """What the PyTorch path (`swa_torch`) multiplies, which FlopCounterMode measures: T keys per query
        up to T = 2W (one banded call), then 2W keys per padded query of the blocked form
        (`torch_keys_per_query`), i.e. about twice the algorithm's window at long T."""
        d = cfg.n_embd
        return 8.0 * d * d + 4.0 * torch_keys_per_query(T, cls._window(cfg)) * d

    @classmethod
    def decode_state_elements(cls, cfg, T: int) -> int:
        """The ring buffers of one sequence after T tokens: 2 * min(T, W) * n_head * head_dim keys and
        values, constant once T >= W."""
        return 2 * min(T, cls._window(cfg)) * cfg.n_head * cfg.head_dim
