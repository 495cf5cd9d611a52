"""The sliding-window attention mixer on the CPU: the whole mixer against the op's literal per-query
oracle (outputs and gradients), the window's bound, the ring-buffer cache (prefill + decode == forward
with wrap-around, past max_len, frozen host counters, static steps), argument validation, FLOP and state
accounting, and parameter matching."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig, flops
from attnbench.bench import decode_graph
from attnbench.errors import ConfigError
from attnbench.mixers import get
from attnbench.ops.rotary import apply_rotary, rotary_tables
from attnbench.ops.sliding_window import swa_reference
from attnbench.params import REQUIRED_TOL, match_shape
from helpers import OpLog, rel_err, state_elements

SWA = get("swa")
C, NH, W = 32, 2, 16

pytestmark = pytest.mark.usefixtures("one_thread")


def make_mixer(window=W, n_embd=C, n_head=NH, dtype=torch.float64, seed=0, **kw) -> torch.nn.Module:
    cfg = GPTConfig(mixer="swa", n_embd=n_embd, n_head=n_head, mixer_args={"window": window, **kw},
                    backend="torch", bias=True)
    torch.manual_seed(seed)
    m = SWA(cfg, 0).to(dtype)
    with torch.no_grad():  # nonzero biases, so they are checked too
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def reference(m, x: torch.Tensor) -> torch.Tensor:
    """The mixer written out: projections, RoPE at absolute positions (the shared helpers, float32 tables
    as the mixer uses; rotary convention checked in tests/test_nsa_mixer.py), the literal per-query oracle."""
    B, T, _ = x.shape
    H, D = m.n_head, m.head_dim
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, T, 3, H, D).unbind(2)
    cos, sin = rotary_tables(D, torch.arange(T), m.args.rope_base)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = swa_reference(q, k, v, m.window)
    return F.linear(o.reshape(B, T, H * D), m.o_proj.weight, m.o_proj.bias)


def out_and_grads(fn, m, x, dy):
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = fn(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("T", [1, 9, 16, 37, 100])  # < W, = W, not a multiple of W, >> W
def test_matches_per_query_reference_float64(T):
    m = make_mixer(seed=T)
    x = torch.randn(2, T, C, dtype=torch.float64)
    dy = torch.randn(2, T, C, dtype=torch.float64)
    y, dx, dp = out_and_grads(lambda z: m(z)[0], m, x, dy)
    y_ref, dx_ref, dp_ref = out_and_grads(lambda z: reference(m, z), m, x, dy)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12
    for n in dp:
        assert rel_err(dp[n], dp_ref[n]) < 1e-12, n


def test_window_bounds_the_mixer():
    """x more than W-1 positions back has no influence on the output (bit for bit); inside it has."""
    m = make_mixer(seed=1)
    x = torch.randn(2, 80, C, dtype=torch.float64)
    y = m(x)[0]
    p = 30
    x2 = x.clone()
    x2[:, p] += 1.0
    y2 = m(x2)[0]
    assert torch.equal(y2[:, :p], y[:, :p]) and torch.equal(y2[:, p + W:], y[:, p + W:])
    assert all(not torch.allclose(y2[:, t], y[:, t]) for t in range(p, p + W))


def test_softmax_when_the_window_covers_the_context():
    """W >= T: causal softmax attention with RoPE (the softmax mixer with pos_emb='rope', same weights)."""
    m = make_mixer(window=64, seed=2)
    soft = get("softmax")(GPTConfig(mixer="softmax", n_embd=C, n_head=NH, pos_emb="rope", bias=True, dropout=0.0),
                          0).double().eval()
    soft.load_state_dict(m.state_dict())
    x = torch.randn(2, 50, C, dtype=torch.float64)
    assert rel_err(m(x)[0], soft(x)[0]) < 1e-12


@pytest.mark.parametrize("splits", [[3, 4, 50], [16, 1, 2, 40], [40, 30], [1] * 5 + [60]])
def test_cached_continuation_equals_forward(splits):
    """Prefill then continuations of any length: prompts longer than the window, chunks that wrap the
    ring, one-token steps in between."""
    m = make_mixer(seed=3)
    T = sum(splits)
    x = torch.randn(2, T, C, dtype=torch.float64)
    ref = m(x)[0]
    st = m.init_state(2, T, "cpu", torch.float64)
    assert st.k.shape == (2, NH, W, C // NH)  # the window only
    outs, t = [], 0
    for n in splits:
        outs.append(m(x[:, t:t + n], st)[0])
        t += n
    assert rel_err(torch.cat(outs, 1), ref) < 1e-12
    assert st.pos == T and int(st.pos_t) == T


@pytest.mark.parametrize("P", [1, 5, 16, 40])
def test_decode_steps_equal_forward_past_max_len(P):
    """A cache made for max_len = W keeps decoding far past W (the ring holds any length)."""
    m = make_mixer(seed=P)
    T = 5 * W + 3
    x = torch.randn(2, T, C, dtype=torch.float64)
    ref = m(x)[0]
    st = m.init_state(2, W, "cpu", torch.float64)
    with torch.no_grad():
        outs = [m(x[:, :P], st)[0]] + [m(x[:, t:t + 1], st)[0] for t in range(P, T)]
    assert rel_err(torch.cat(outs, 1), ref) < 1e-12


def test_short_cache_is_bounded_by_its_length():
    m = make_mixer()
    st = m.init_state(1, 5, "cpu", torch.float64)  # fewer slots than the window
    assert st.k.shape[2] == 5
    x = torch.randn(1, 7, C, dtype=torch.float64)
    m(x[:, :5], st)
    with pytest.raises(RuntimeError, match="full"):
        m(x[:, 5:6], st)


def test_decode_with_frozen_host_counters_and_stable_storage():
    """What a CUDA-graph replay sees: Python ints frozen at their first value, state tensors on their
    storage. Steps run that way equal ordinary steps bit for bit, through several wraps of the ring."""
    m = make_mixer(seed=4)
    x = torch.randn(2, 70, C, dtype=torch.float64)
    st = m.init_state(2, 100, "cpu", torch.float64)
    with torch.no_grad():
        m(x[:, :10], st)
        ref = copy.deepcopy(st)
        frozen = st.pos
        before = decode_graph.state_tensors(st)
        for t in range(10, 70):
            st.pos = frozen
            got = m(x[:, t:t + 1], st)[0]
            assert torch.equal(got, m(x[:, t:t + 1], ref)[0]), t
            assert decode_graph.inplace_violation(before, decode_graph.state_tensors(st)) is None
    assert torch.equal(st.k, ref.k) and torch.equal(st.v, ref.v) and int(st.pos_t) == 70


def test_bench_host_frozen_check_passes():
    """The latency benchmark's screen on a GPT with SWA in every block, wrapping the ring."""
    cfg = GPTConfig(mixer="swa", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=40, pos_emb="none",
                    mixer_args={"window": 8})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    cache = model.new_cache(2, 40)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 11)), cache=cache)
    assert decode_graph.host_frozen_check(model, cache, torch.randint(0, 50, (12, 2, 1))) is None


def test_decode_step_is_static_and_never_syncs():
    """The same ops on the same shapes at every position (what a graph captures once), no host sync."""
    m = make_mixer(dtype=torch.float32, seed=5)
    x = torch.randn(1, 50, C)
    st = m.init_state(1, 1000, "cpu", torch.float32)
    logs = []
    with torch.no_grad():
        m(x[:, :3], st)
        for t in range(3, 50):
            with OpLog() as log:
                m(x[:, t:t + 1], st)
            logs.append(log.calls)
    assert all(calls == logs[0] for calls in logs)


def test_bf16_cache_decode_equals_cached_continuation():
    """With a bf16 cache (the GPU's inference setting) two decode steps equal a two-token continuation:
    both attend over keys and values as the cache holds them."""
    m = make_mixer(dtype=torch.float32, seed=6)
    x = torch.randn(2, 60, C)
    st = m.init_state(2, 60, "cpu", torch.bfloat16)
    with torch.no_grad():
        m(x[:, :20], st)
        for t in range(20, 58, 2):
            ref = copy.deepcopy(st)
            steps = torch.cat([m(x[:, t:t + 1], st)[0], m(x[:, t + 1:t + 2], st)[0]], 1)
            both = m(x[:, t:t + 2], ref)[0]
            # a projection of 1 or 2 rows may differ in the last float32 bit, which can move a bf16
            # rounding of the cached key or value by one step (2^-8): hence not 1e-5
            assert rel_err(steps, both) < 2e-3, t
            assert rel_err(st.k, ref.k) < 1e-3 and rel_err(st.v, ref.v) < 1e-3


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "none"])
def test_every_pos_emb_and_cached_generation(pos_emb):
    cfg = GPTConfig(mixer="swa", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=24, pos_emb=pos_emb,
                    mixer_args={"window": 5})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, 50, (2, 4))
    a = model.generate(x, 40, temperature=0, use_cache=True)
    b = model.generate(x, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("args,key", [({"window": 0}, "window"), ({"window": -4}, "window"),
                                      ({"rope_base": 0.0}, "rope_base")])
def test_invalid_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=f"model.mixer_args.{key}"):
        SWA(GPTConfig(mixer="swa", n_embd=32, n_head=2, mixer_args=args), 0)


def test_unknown_key_names_the_nearest_and_odd_head_dim_is_refused():
    with pytest.raises(ConfigError, match="window"):
        SWA(GPTConfig(mixer="swa", n_embd=32, n_head=2, mixer_args={"window_size": 8}), 0)
    with pytest.raises(ConfigError, match="even head dim"):
        SWA(GPTConfig(mixer="swa", n_embd=30, n_head=2), 0)


def test_fla_backend_refuses_a_head_dim_over_256_at_construction():
    with pytest.raises(ConfigError, match="head dim"):
        SWA(GPTConfig(mixer="swa", n_embd=1040, n_head=2, backend="fla"), 0)
    SWA(GPTConfig(mixer="swa", n_embd=1040, n_head=2, backend="auto"), 0)


# ---------------------------------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("T", [20, 64, 100, 128, 129, 256, 1000])
def test_torch_flops_match_flop_counter(T):
    """flops_per_token_torch is what the PyTorch path multiplies (single banded call up to 2W, blocked
    beyond), per FlopCounterMode on the mixer alone."""
    cfg = GPTConfig(mixer="swa", n_embd=64, n_head=2, mixer_args={"window": 64}, backend="torch")
    torch.manual_seed(0)
    m = SWA(cfg, 0).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(torch.randn(2, T, 64))
    assert counter.get_total_flops() == pytest.approx(SWA.flops_per_token_torch(cfg, T) * 2 * T, rel=1e-9)


def test_algorithmic_flops_and_state_are_bounded_by_the_window():
    cfg = GPTConfig(mixer="swa", n_embd=384, n_head=6, mixer_args={"window": 64})
    soft = GPTConfig(mixer="softmax", n_embd=384, n_head=6)
    for T in (1, 30, 64):  # softmax's up to the window
        assert SWA.flops_per_token(cfg, T) == get("softmax").flops_per_token(soft, T)
        assert SWA.decode_state_elements(cfg, T) == get("softmax").decode_state_elements(soft, T)
    for T in (65, 256, 16384):
        assert SWA.flops_per_token(cfg, T) == SWA.flops_per_token(cfg, 64) <= SWA.flops_per_token_torch(cfg, T)
        assert SWA.decode_state_elements(cfg, T) == 2 * 64 * 384
    assert flops.decode_state_elements(replace(cfg, n_layer=6), 8192) == 6 * 2 * 64 * 384


@pytest.mark.parametrize("T", [1, 10, 64, 200])
def test_decode_state_elements_are_the_ring_buffers(T):
    m = make_mixer(window=64, dtype=torch.float32)
    st = m.init_state(1, T, "cpu", torch.float32)
    with torch.no_grad():
        m(torch.randn(1, T, C), st)
    assert state_elements(st) == SWA.decode_state_elements(m.cfg, T)
    assert state_elements(m.init_state(1, 100_000, "cpu", torch.float32)) == SWA.decode_state_elements(m.cfg, 10**5)


@pytest.mark.parametrize("budget,n_layer", [("10.7M", 6), ("1M", 2), ("2M", 4)])
def test_parameter_match_within_1pct_and_as_softmax(budget, n_layer):
    """SWA has softmax's parameters, so it matches to softmax's width and count (its heads may differ
    where softmax's head dim would be odd: RoPE needs an even one)."""
    m = match_shape("swa", budget, n_layer=n_layer)
    assert abs(m.deviation) <= REQUIRED_TOL
    assert GPT(m.model_cfg).num_params() == m.n_params
    s = match_shape("softmax", budget, n_layer=n_layer)
    assert (m.model_cfg.n_embd, m.n_params) == (s.model_cfg.n_embd, s.n_params)
    assert m.model_cfg.head_dim % 2 == 0
