"""Sliding-window attention ops on the CPU: swa_torch (one banded call, or the blocked form) against the
literal per-query oracle swa_reference for outputs and gradients, the window's bound on what a query
sees, queries continuing a cache, memory at long T, and the dispatcher."""
from __future__ import annotations

import pytest
import torch

from attnbench.errors import AttnbenchError, ConfigError
from attnbench.ops.sliding_window import (sliding_window_attention, swa_reference, swa_torch, torch_keys_per_query,
                                          validate_window)
from helpers import OpLog, out_and_grads, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, D = 2, 3, 16


def make_inputs(TQ, TK=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    TK = TQ if TK is None else TK
    q = torch.randn(B, TQ, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, TK, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, TK, H, D, generator=g, dtype=dtype)
    return [q, k, v]


# T < W, T = W, T = 2W (last single call), T not a multiple of W (blocked), T >> W, W = 1
CASES = [(1, 16), (9, 16), (16, 16), (32, 16), (33, 16), (37, 16), (100, 7), (300, 16), (50, 1), (40, 64)]


@pytest.mark.parametrize("T,W", CASES)
def test_torch_matches_reference_float64(T, W):
    inputs = make_inputs(T, seed=T + W)
    do = torch.randn(B, T, H, D, dtype=torch.float64)
    o, grads = out_and_grads(swa_torch, inputs, do, window=W)
    o_ref, grads_ref = out_and_grads(swa_reference, inputs, do, window=W)
    for name, a, r in zip(["o", "dq", "dk", "dv"], (o, *grads), (o_ref, *grads_ref)):
        assert rel_err(a, r) < 1e-12, (name, rel_err(a, r))


@pytest.mark.parametrize("TQ,TK,W", [(1, 40, 16), (5, 20, 16), (20, 35, 16), (40, 55, 16), (90, 97, 8)])
def test_queries_continuing_a_cache_match_reference(TQ, TK, W):
    """TQ < TK: the queries are the last TQ positions (a prefill after cached tokens), both code paths."""
    inputs = make_inputs(TQ, TK, seed=TQ * TK)
    do = torch.randn(B, TQ, H, D, dtype=torch.float64)
    o, grads = out_and_grads(swa_torch, inputs, do, window=W)
    o_ref, grads_ref = out_and_grads(swa_reference, inputs, do, window=W)
    for name, a, r in zip(["o", "dq", "dk", "dv"], (o, *grads), (o_ref, *grads_ref)):
        assert rel_err(a, r) < 1e-12, (name, rel_err(a, r))
    # and they are the last rows of the full pass
    q_full = torch.cat([torch.randn(B, TK - TQ, H, D, dtype=torch.float64), inputs[0]], 1)
    assert rel_err(swa_torch(q_full, *inputs[1:], W)[:, TK - TQ:], o) < 1e-13


@pytest.mark.parametrize("T,W", [(37, 16), (200, 32)])
def test_torch_float32_and_bf16_match_float64_reference(T, W):
    inputs = make_inputs(T, seed=7)
    ref = swa_reference(*inputs, W)
    assert rel_err(swa_torch(*[x.float() for x in inputs], W), ref) < 1e-5
    o16 = swa_torch(*[x.bfloat16() for x in inputs], W)
    assert o16.dtype == torch.bfloat16 and rel_err(o16, ref) < 2e-2


@pytest.mark.parametrize("T,W", [(40, 8), (200, 16)])
def test_window_bounds_what_a_query_sees(T, W):
    """A key/value more than W-1 positions back has no influence (bit for bit); the oldest key inside
    the window has."""
    q, k, v = make_inputs(T, seed=3)
    o = swa_torch(q, k, v, W)
    t, p = T - 5, T - 5 - W  # p is W positions back from t: outside
    for kk, vv in ((k.clone(), v), (k, v.clone())):
        (kk if kk is not k else vv)[:, p] += 10.0
        o2 = swa_torch(q, kk, vv, W)
        assert torch.equal(o2[:, p + W:], o[:, p + W:])  # every query from p + W on ignores position p
        assert not torch.allclose(o2[:, p:p + W], o[:, p:p + W])  # queries p .. p+W-1 see it
    k2 = k.clone()
    k2[:, t - W + 1] += 10.0
    assert not torch.allclose(swa_torch(q, k2, v, W)[:, t], o[:, t])


def test_causal_and_batch_independent():
    q, k, v = make_inputs(70, seed=5)
    o = swa_torch(q, k, v, 16)
    k2, v2 = k.clone(), v.clone()
    k2[:, 40] += 1.0
    v2[1] += 1.0  # the second sequence only
    o2 = swa_torch(q, k2, v2, 16)
    assert torch.equal(o2[0, :40], o[0, :40])
    assert torch.equal(swa_torch(q, k, v2, 16)[0], o[0])


def test_long_context_never_builds_a_T_by_T_tensor():
    """16k tokens on the blocked form: the largest tensor any op makes is O(T * W), not O(T^2)."""
    T, W = 16384, 64
    q, k, v = (torch.randn(1, T, 1, 16) for _ in range(3))
    with OpLog() as log:
        o = swa_torch(q, k, v, W)
    biggest = max((torch.Size(s).numel() for _, shapes in log.calls for s in shapes), default=0)
    assert biggest <= 2 * T * W * 16 < T * T, biggest
    t = T - 1
    ref = swa_reference(q[:, t:], k[:, t - W + 1:], v[:, t - W + 1:], W)
    assert rel_err(o[:, t:], ref) < 1e-5


def test_torch_keys_per_query():
    assert torch_keys_per_query(10, 64) == 10 and torch_keys_per_query(128, 64) == 128
    assert torch_keys_per_query(256, 64) == 128  # 4 blocks of 64 queries x 128 keys
    assert torch_keys_per_query(130, 64) == pytest.approx(128 * 192 / 130)  # 3 padded blocks


def test_dispatcher_and_validation():
    q, k, v = make_inputs(20, seed=1)
    assert torch.equal(sliding_window_attention(q, k, v, 8), swa_torch(q, k, v, 8))  # CPU: the torch path
    with pytest.raises(AttnbenchError, match="CUDA"):
        sliding_window_attention(q, k, v, 8, backend="fla")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="window"):
            validate_window(bad)
    with pytest.raises(ConfigError, match="TK >= TQ"):
        swa_torch(q, k[:, :5], v[:, :5], 8)
