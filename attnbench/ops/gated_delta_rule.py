"""Gated DeltaNet's rule: the delta rule with a per-token decay exp(g_t) of the state.

    S~ = exp(g_t) S_{t-1},  u_t = beta_t (v_t - S~^T k_t),  S_t = S~ + k_t u_t^T,  o_t = S_t^T q̂_t

i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T: the decay (Mamba-2's gate, g_t <= 0)
forgets the whole memory at a learned per-token rate, the delta update overwrites one key's value. In the
chunked form, with gamma_i = sum of g over the chunk's rows up to i and Gam_ij = exp(gamma_i - gamma_j)
for i >= j, the chunk's system and read-out of delta_rule.py become

    L = strict_lower(diag(beta) (K K^T ⊙ Gam)),   (I + L) [U | W] = diag(beta) [V | K e^gamma]
    V_new = U - W S0,   O = (Q̂ e^gamma) S0 + (Q̂ K^T ⊙ Gam) V_new,   S_C = e^{gamma_C} S0 + (K e^{gamma_C - gamma})^T V_new

Argument order is always (q, k, v, g, beta), g = log-decay `[B, T, H]` (<= 0), beta post-sigmoid.
The maths lives in delta_rule.py's shared cores; this module adds the gate and the FLA call.
"""
from __future__ import annotations

import torch

from ._l2norm import l2norm, needs_backward
from .backend import TORCH_DQKWG, gated_backward_route, resolve
from .delta_rule import chunked_core, check_inputs, fla_unsupported, lean_chunked_core, recurrent_core

HOPPER_REASON = ("FLA's gated chunk backward raises on Hopper with triton < 3.7.1 (FLA issue #640) and "
                 "neither TileLang nor attnbench's replacement of the refused step is usable here; upgrade "
                 "triton to >= 3.7.1")


def gated_backward_check(backward: bool, cuda: bool) -> tuple[list[str], str]:
    """For a gated FLA call: why FLA cannot take it ([] when it can) and the backend label to record
    (TORCH_DQKWG when its backward runs with attnbench's PyTorch dqkwg step, ops/fla_gated_bwd.py)."""
    if not (backward and cuda):
        return [], "fla"
    route = gated_backward_route()
    if route == "torch":
        return [HOPPER_REASON], "fla"
    return [], route if route == TORCH_DQKWG else "fla"  # 'tilelang' is FLA's own backend


def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, scale: float | None = None,
                               initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (the oracle); float64-capable."""
    check_inputs("gated_delta_rule_recurrent", q, k, v, beta, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = recurrent_core(q, k, v, beta, g, scale, initial_state, output_final_state)
    return o.to(q.dtype), S


def gated_delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             beta: torch.Tensor, scale: float | None = None,
                             initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                             chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) gated delta rule in differentiable PyTorch; any T."""
    check_inputs("gated_delta_rule_chunked", q, k, v, beta, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = chunked_core(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, qk_l2norm: bool = True, backend: str = "auto",
                     chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet op: FLA's kernels on CUDA (bf16/fp16), the PyTorch form otherwise.

    On Hopper with a Triton whose gated backward FLA refuses, calls that need a backward run FLA's
    kernels with attnbench's PyTorch version of the refused step (backend.gated_backward_route); where
    that cannot be installed either, the PyTorch form under backend='auto' (logged once), an error under
    backend='fla'.
    """
    check_inputs("gated_delta_rule", q, k, v, beta, g, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backward = needs_backward(q, k, v, g, beta, initial_state)
    refused, label = gated_backward_check(backward, q.is_cuda)
    reasons = fla_unsupported(q, k, v, chunk_size) + refused
    if resolve(backend, q, "gated_delta_rule", "; ".join(reasons) or None, fla_label=label) == "fla":
        return _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, qk_l2norm,
                                     chunk_size, backward)
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if q.shape[1] == 1:
        o, S = recurrent_core(q, k, v, beta, g, scale, initial_state, output_final_state)
    else:
        o, S = lean_chunked_core(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
    return o.to(q.dtype), S


def _fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, qk_l2norm, chunk_size,
                          backward):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule  # optional dependency (CUDA only)

    h0 = initial_state.float() if initial_state is not None else None
    g, beta = g.float(), beta.to(q.dtype)
    if q.shape[1] == 1 and not backward:
        # forward-only kernel; beta by keyword (its positional slot after g is gk)
        o, S = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0,
                                                output_final_state=output_final_state,
                                                use_qk_l2norm_in_kernel=qk_l2norm)
    else:
        o, S = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0,
                                      output_final_state=output_final_state,
                                      use_qk_l2norm_in_kernel=qk_l2norm, chunk_size=chunk_size)
    return o.to(q.dtype), (S.float() if S is not None else None)


# fused_recurrent_gated_delta_rule (the decode kernel) is not compiler-disabled in FLA 0.6.0: keep
# Dynamo out of its Triton launch (e.g. a torch.compile'd decode step), as ops/nsa.py does.
_fla_gated_delta_rule = torch.compiler.disable(_fla_gated_delta_rule)
