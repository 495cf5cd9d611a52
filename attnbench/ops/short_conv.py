"""Depthwise causal short convolution, with a rolling state for prefill and decode.

    y_t[d] = act(sum_{w<W} weight[d, w] * x_{t-W+1+w}[d] + bias[d]),   weight[:, W-1] hits the current token

(x_s = 0 for s < 0.) Each channel mixes its own last W inputs (W = 4 in the delta mixers), which gives
q, k and v a little local context before the recurrence; act is SiLU there.

The state `[B, D, W-1]` holds the last W-1 raw inputs (oldest first); zeros mean an empty history.
FLA's cache is `[B, D, W]` (the last W inputs, of which its forward reads the newest W-1); we convert
at the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AttnbenchError
from .backend import resolve

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", state: torch.Tensor | None = None,
                  output_final_state: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """x `[B, T, D]`, weight `[D, W]` -> (y `[B, T, D]`, new state `[B, D, W-1]` or None)."""
    if activation not in ACTIVATIONS:
        raise AttnbenchError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise AttnbenchError(f"causal_conv1d: x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise AttnbenchError(f"causal_conv1d: weight must be [D, W] with D={D}, got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise AttnbenchError(f"causal_conv1d: bias must be [D]={D}, got {tuple(bias.shape)}")
    if state is not None and state.shape != (B, D, W - 1):
        raise AttnbenchError(f"causal_conv1d: state must be [B, D, W-1] = {(B, D, W - 1)}, got {tuple(state.shape)}")

    if resolve(backend, x, "causal_conv1d", "kernel width 1" if W < 2 else None) == "fla":
        return _fla_conv(x, weight, bias, activation, state, output_final_state)

    # Shapes only, no branching on values: the T == 1 step is CUDA-graph capturable.
    hist = state.to(x.dtype) if state is not None else x.new_zeros(B, D, W - 1)
    xp = torch.cat([hist, x.transpose(1, 2)], dim=-1)                          # [B, D, W-1+T]
    y = F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype) if bias is not None else None, groups=D)
    if activation is not None:
        y = F.silu(y)
    new_state = xp[..., xp.shape[-1] - (W - 1):] if output_final_state else None
    return y.transpose(1, 2), new_state


def _fla_conv(x, weight, bias, activation, state, output_final_state):
    from fla.modules.convolution import causal_conv1d as fla_causal_conv1d  # optional dependency (CUDA only)

    cache = None
    if state is not None:  # FLA's slot 0 (the W-th newest input) is never read by its forward
        cache = torch.cat([state.new_zeros(*state.shape[:2], 1), state], dim=-1).to(x.dtype)
    y, final = fla_causal_conv1d(x, weight=weight, bias=bias, initial_state=cache,
                                 output_final_state=output_final_state, activation=activation, backend="triton")
    return y, (final[..., 1:] if final is not None else None)


# FLA's causal_conv1d is not compiler-disabled (unlike its chunk delta ops): keep Dynamo out of its
# Triton launches under torch.compile (training compiles the whole model), as ops/nsa.py does.
_fla_conv = torch.compiler.disable(_fla_conv)
