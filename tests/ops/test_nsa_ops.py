"""NSA ops on the CPU: nsa_torch against the literal per-query oracle nsa_reference, plus the properties
(decode/prefill consistency, causality, forced blocks, argument validation) the mixer relies on, and the
graph-safe one-token nsa_decode against the full pass."""
from __future__ import annotations

import pytest
import torch

from attnbench.errors import AttnbenchError, ConfigError
from attnbench.ops.nsa import (NSADecodePlan, fla_supported, nsa, nsa_block_means, nsa_cache_means, nsa_decode,
                               nsa_reference, nsa_select_blocks, nsa_torch, validate_nsa_args)
from helpers import OpLog, out_and_grads, rel_err

BS, D, W = 16, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(B, T, H, G, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * G, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    gates = [torch.sigmoid(torch.randn(B, T, H * G, generator=g, dtype=dtype)) for _ in range(3)]
    return [q, k, v, *gates]


NAMES = ["o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"]


@pytest.mark.parametrize("T,H,G,S", [(1, 2, 2, 4), (7, 1, 4, 2), (64, 2, 2, 4), (65, 1, 4, 4),
                                     (65, 2, 2, 2), (200, 2, 2, 4), (200, 1, 4, 2)])
def test_torch_matches_reference_float64(T, H, G, S):
    torch.manual_seed(0)
    inputs = make_inputs(2, T, H, G, seed=T + S)
    do = torch.randn(2, T, H * G, D, dtype=torch.float64)
    kw = dict(block_size=BS, block_counts=S, window_size=W)
    o, grads = out_and_grads(nsa_torch, inputs, do, **kw)
    o_ref, grads_ref = out_and_grads(nsa_reference, inputs, do, **kw)
    for name, a, r in zip(NAMES, (o, *grads), (o_ref, *grads_ref)):
        assert rel_err(a, r) < 1e-8, (name, rel_err(a, r))


@pytest.mark.parametrize("T,H,G,S", [(65, 2, 2, 4), (200, 1, 4, 4)])
def test_torch_float32_matches_float64_reference(T, H, G, S):
    inputs = make_inputs(2, T, H, G, seed=10 + T)
    do = torch.randn(2, T, H * G, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(block_size=BS, block_counts=S, window_size=W)
    o, grads = out_and_grads(nsa_torch, [x.float() for x in inputs], do.float(), **kw)
    assert o.dtype == torch.float32
    o_ref, grads_ref = out_and_grads(nsa_reference, inputs, do, **kw)
    for name, a, r in zip(NAMES, (o, *grads), (o_ref, *grads_ref)):
        assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))


def test_no_window_branch_and_gate_none():
    q, k, v, gc, gs, _ = make_inputs(2, 50, 1, 2, seed=3)
    o = nsa_torch(q, k, v, gc, gs, None, BS, 2, 0)
    o_ref = nsa_reference(q, k, v, gc, gs, None, BS, 2, 0)
    assert rel_err(o, o_ref) < 1e-10
    with pytest.raises(ConfigError, match="g_swa"):
        nsa_torch(q, k, v, gc, gs, None, BS, 2, W)


def test_decode_and_prefill_match_full_pass():
    T = 100
    q, k, v, gc, gs, gw = make_inputs(2, T, 2, 2, seed=5)
    args = dict(block_size=BS, block_counts=4, window_size=W)
    full = nsa_torch(q, k, v, gc, gs, gw, **args)
    for t in (0, 14, 15, 16, 31, 47, 80, 99):
        sl = slice(t, t + 1)
        o = nsa_torch(q[:, sl], k[:, :t + 1], v[:, :t + 1], gc[:, sl], gs[:, sl], gw[:, sl], **args)
        assert o.shape == (2, 1, 4, D)
        assert rel_err(o[:, 0], full[:, t]) < 1e-12, t
    sl = slice(40, 70)  # prefill of 30 queries continuing a 40-token cache
    o = nsa_torch(q[:, sl], k[:, :70], v[:, :70], gc[:, sl], gs[:, sl], gw[:, sl], **args)
    assert rel_err(o, full[:, sl]) < 1e-12
    # and the oracle agrees on the TQ < TK layout
    o_ref = nsa_reference(q[:, 60:70], k[:, :70], v[:, :70], gc[:, 60:70], gs[:, 60:70], gw[:, 60:70], **args)
    assert rel_err(o[:, 20:], o_ref) < 1e-10


def test_causal_and_batch_independent():
    T, t0 = 90, 49
    inputs = make_inputs(2, T, 2, 2, seed=7)
    args = dict(block_size=BS, block_counts=4, window_size=W)
    base = nsa_torch(*inputs, **args)
    future = [x.clone() for x in inputs]
    for x in future:
        x[:, t0 + 1:] = torch.randn_like(x[:, t0 + 1:])
    o = nsa_torch(*future, **args)
    assert torch.allclose(o[:, :t0 + 1], base[:, :t0 + 1], rtol=0, atol=1e-13)
    assert not torch.allclose(o[:, t0 + 1:], base[:, t0 + 1:])
    other = [x.clone() for x in inputs]
    for x in other:
        x[1] = torch.randn_like(x[1])
    o = nsa_torch(*other, **args)
    assert torch.allclose(o[0], base[0], rtol=0, atol=1e-13)
    assert not torch.allclose(o[1], base[1])


@pytest.mark.parametrize("T", [128, 120])  # last block complete / partial (query in block IC = 7 either way)
@pytest.mark.parametrize("S", [2, 4])
def test_forced_blocks_kept_despite_lowest_scores(T, S):
    """Blocks 0, IC-1, IC get the lowest compressed scores, yet are selected (IC and IC-1 first when S=2);
    the remaining slot goes to the most important other block (block 3 here)."""
    torch.manual_seed(0)
    H, G, t = 1, 2, T - 1
    u = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    q = (4.0 * u).expand(1, T, H * G, D) + 0.01 * torch.randn(1, T, H * G, D, dtype=torch.float64)
    align = torch.tensor([-3.0, 0.5, 1.0, 2.0, 1.5, 0.8, -3.0, -3.0], dtype=torch.float64)  # per block
    k = (align.repeat_interleave(BS)[:T, None, None] * u) + 0.01 * torch.randn(1, T, H, D, dtype=torch.float64)
    v = torch.randn(1, T, H, D, dtype=torch.float64)
    ones, zeros = torch.ones(1, T, H * G, dtype=torch.float64), torch.zeros(1, T, H * G, dtype=torch.float64)

    # the forced blocks really have the lowest compressed scores at row t
    kc = k[0, :(T // BS) * BS, 0].reshape(-1, BS, D).mean(1)
    scores = kc @ q[0, t, 0]
    visible = list(range((t + 1) // BS))
    assert max(scores[[0, 6]]) < min(scores[c] for c in visible if c not in (0, 6, 7))

    sel = nsa_select_blocks(q, k, BS, S)[0, t, 0]
    expected = {7, 6} if S == 2 else {7, 6, 0, 3}
    assert set(sel.tolist()) == expected

    # selected branch alone (g_slc = 1, others 0) equals plain attention over the expected tokens j <= t
    o = nsa_torch(q, k, v, zeros, ones, None, BS, S, 0)[0, t]
    keys = torch.tensor([j for c in sorted(expected) for j in range(c * BS, (c + 1) * BS) if j <= t])
    p = torch.softmax(D ** -0.5 * q[0, t] @ k[0, keys, 0].T, -1)
    assert rel_err(o, p @ v[0, keys, 0]) < 1e-12
    assert rel_err(nsa_reference(q, k, v, zeros, ones, None, BS, S, 0)[0, t], o) < 1e-12


def test_block_indices_override():
    inputs = make_inputs(1, 80, 1, 4, seed=11)
    args = dict(block_size=BS, block_counts=4, window_size=W)
    own = nsa_select_blocks(inputs[0], inputs[1], BS, 4)
    assert own.shape == (1, 80, 1, 4)
    assert torch.equal(nsa_torch(*inputs, **args, block_indices=own), nsa_torch(*inputs, **args))
    # an arbitrary selection (with -1 slots and a future block, which the causal mask drops)
    custom = torch.full_like(own, -1)
    custom[..., 0] = torch.arange(80)[None, :, None] // BS
    custom[..., 1] = 4
    o = nsa_torch(*inputs, **args, block_indices=custom)
    assert rel_err(o, nsa_reference(*inputs, **args, block_indices=custom)) < 1e-10
    assert rel_err(o, nsa_torch(*inputs, **args)) > 1e-3


def test_bf16_inputs_computed_in_float32():
    inputs = make_inputs(2, 70, 1, 2, seed=13)
    sel = nsa_select_blocks(inputs[0], inputs[1], BS, 4)  # same selection for both: bf16 may flip near-ties
    o = nsa_torch(*[x.bfloat16() for x in inputs], BS, 4, W, block_indices=sel)
    assert o.dtype == torch.bfloat16
    assert rel_err(o, nsa_torch(*inputs, BS, 4, W)) < 1e-2


def test_dispatcher_on_cpu():
    inputs = make_inputs(1, 40, 1, 2, dtype=torch.float32, seed=17)
    args = dict(block_size=BS, block_counts=2, window_size=W)
    assert torch.equal(nsa(*inputs, **args), nsa_torch(*inputs, **args))
    assert torch.equal(nsa(*inputs, **args, backend="torch"), nsa_torch(*inputs, **args))
    with pytest.raises(AttnbenchError, match="backend='fla'"):
        nsa(*inputs, **args, backend="fla")


@pytest.mark.parametrize("kw,match", [
    (dict(n_head=6, n_kv_head=4), "n_kv_head"),
    (dict(block_size=48), "block_size"),
    (dict(block_counts=3), "block_counts"),
    (dict(block_size=16, block_counts=16), "block_size >= 2 \\* block_counts"),
    (dict(window_size=-1), "window_size"),
    (dict(block_counts=0), "block_counts"),
])
def test_validate_nsa_args_errors(kw, match):
    base = dict(n_head=16, n_kv_head=1, head_dim=64, block_size=64, block_counts=16, window_size=64)
    validate_nsa_args(**base)
    with pytest.raises(ConfigError, match=match):
        validate_nsa_args(**{**base, **kw})


def test_fla_supported_reasons():
    assert fla_supported(16, 1, 64, 64, 16) is None
    assert fla_supported(64, 4, 128, 32, 16) is None
    assert "group size" in fla_supported(8, 2, 64, 64, 16)
    assert "group size" in fla_supported(24, 1, 64, 64, 16)
    assert "block_size" in fla_supported(16, 1, 64, 8, 4)
    assert "head_dim" in fla_supported(16, 1, 8, 64, 16)
    assert "head_dim" in fla_supported(16, 1, 512, 64, 16)
    assert "block_counts" in fla_supported(16, 1, 64, 64, 2)


# ---------------------------------------------------------------------------------------------------- decode


def cache_of(k: torch.Tensor, v: torch.Tensor, L: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v `[B, T, H, D]` -> the decode layouts: kv `[2, B, H, L, D]` (positions >= T filled with
    `fill`) and kv_means `[2, B, H, ceil(L / BS), D]` pooled from it (future blocks included: the
    decode must not see them)."""
    B, T, H, D_ = k.shape
    kv = torch.full((2, B, H, L, D_), fill, dtype=k.dtype)
    kv[0, :, :, :T], kv[1, :, :, :T] = k.transpose(1, 2), v.transpose(1, 2)
    return kv, nsa_cache_means(kv, BS)


def gates_at(gates, t):
    return torch.stack([g[:, t:t + 1] for g in gates], -1)  # [B, 1, HQ, 3]


@pytest.mark.parametrize("H,G,S,W,L", [
    (2, 2, 4, 32, 100),   # window shorter than the later positions, longer than the early ones
    (1, 4, 2, 32, 107),   # S = 2: own and previous block only (priority); L not a multiple of BS
    (2, 2, 4, 0, 100),    # no window branch
    (1, 2, 8, 5, 120),    # S * BS > L: unused slots; tiny window
    (1, 2, 2, 80, 100),   # window longer than the selected segment (S * BS = 32): padded segment
])
def test_decode_equals_full_pass_at_every_position(H, G, S, W, L):
    """nsa_decode at position t over the whole preallocated cache (future keys present, random garbage
    past T) == row t of the full pass, for every t: block boundaries, partial blocks, window > and < t."""
    T = 100
    q, k, v, *gates = make_inputs(2, T, H, G, seed=S + W)
    full = nsa_torch(q, k, v, *gates, BS, S, W)
    kv, means = cache_of(k, v, L, fill=7.0)
    plan = NSADecodePlan.build(L, BS, S, W, "cpu", torch.float64)
    for t in range(T):
        o = nsa_decode(q[:, t:t + 1], kv, means, torch.tensor([t]), gates_at(gates, t), BS, S, W, plan=plan)
        assert o.shape == (2, 1, H * G, D)
        assert rel_err(o[:, 0], full[:, t]) < 1e-12, t


def test_decode_block_indices_override_and_plan_checks():
    T, L, S = 90, 96, 4
    q, k, v, *gates = make_inputs(1, T, 2, 2, seed=21)
    sel = nsa_select_blocks(q, k, BS, S)
    custom = torch.full_like(sel, -1)
    custom[..., 0] = torch.arange(T)[None, :, None] // BS
    custom[..., 1] = 1  # a future block for t < 16: dropped by the causal mask
    kv, means = cache_of(k, v, L)
    for bi in (sel, custom):
        full = nsa_torch(q, k, v, *gates, BS, S, W, block_indices=bi)
        for t in (0, 15, 16, 40, 89):
            o = nsa_decode(q[:, t:t + 1], kv, means, torch.tensor([t]), gates_at(gates, t), BS, S, W,
                           block_indices=bi[:, t:t + 1])
            assert rel_err(o[:, 0], full[:, t]) < 1e-12, t
    with pytest.raises(ConfigError, match="plan"):
        nsa_decode(q[:, :1], kv, means, torch.tensor([0]), gates_at(gates, 0), BS, S, W,
                   plan=NSADecodePlan.build(L + 1, BS, S, W, "cpu", torch.float64))
    with pytest.raises(ConfigError, match="kv_means"):
        nsa_decode(q[:, :1], kv, means[:, :, :, :-1], torch.tensor([0]), gates_at(gates, 0), BS, S, W)


def test_decode_bf16_cache_computed_in_float32():
    """A bf16 cache (the GPU's inference setting): float32 inside, bf16 out, close to float64."""
    T, L = 70, 80
    q, k, v, *gates = make_inputs(2, T, 1, 2, seed=23)
    sel = nsa_select_blocks(q, k, BS, 4)  # the same selection for both: bf16 may flip near-ties
    full = nsa_torch(q, k, v, *gates, BS, 4, W, block_indices=sel)
    kv, means = cache_of(k.bfloat16(), v.bfloat16(), L)
    t = T - 1
    o = nsa_decode(q[:, t:t + 1].bfloat16(), kv, means.float(), torch.tensor([t]), gates_at(gates, t).bfloat16(),
                   BS, 4, W, block_indices=sel[:, t:t + 1])
    assert o.dtype == torch.bfloat16
    assert rel_err(o[:, 0], full[:, t]) < 1e-2


def test_block_means():
    k = torch.randn(2, 37, 3, 4, dtype=torch.float64)
    m = nsa_block_means(k, 16)
    assert m.shape == (2, 3, 3, 4) and m.dtype == torch.float64
    assert rel_err(m[:, :2], k[:, :32].reshape(2, 2, 16, 3, 4).mean(2)) < 1e-15
    assert rel_err(m[:, 2], k[:, 32:].sum(1) / 16) < 1e-15  # partial block: running sum / BS
    assert nsa_block_means(k.bfloat16(), 16).dtype == torch.float32


def decode_op_log(pos: int, W: int) -> list:
    q, k, v, *gates = make_inputs(1, 60, 2, 2, seed=pos)
    kv, means = cache_of(k, v, 64)
    plan = NSADecodePlan.build(64, BS, 4, W, "cpu", torch.float64)
    with OpLog() as log:
        nsa_decode(q[:, :1], kv, means, torch.tensor([pos]), gates_at(gates, 0), BS, 4, W, plan=plan)
    return log.calls


@pytest.mark.parametrize("W", [0, W])
def test_decode_is_static(W):
    """What a CUDA graph captures must hold at every position: the same ops on the same shapes at
    positions 0, 17 and 59, and no host sync (.item(), bool(tensor)) or data-dependent shape."""
    first = decode_op_log(0, W)
    assert len(first) > 10
    assert decode_op_log(17, W) == first
    assert decode_op_log(59, W) == first
