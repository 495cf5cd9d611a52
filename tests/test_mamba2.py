"""The mamba2 mixer on the CPU.

The whole mixer (torch backend, chunked SSD) against a literal float64 reference written here from the
published block: a token-loop causal convolution with bias and SiLU, softplus(dt + dt_bias), A = -exp(A_log),
the SSD recurrence token by token (ops/ssd.py's oracle), the D skip, an explicit gated RMSNorm
(norm(y * silu(z)) * w) and o_proj. Also: prefill + decode == forward, cached == uncached generation,
causality, batch independence, graph-safe decoding, argument errors, initialisation, parameter matching,
FLOPs against FlopCounterMode and the decode state size.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_prefill_then_decode_equals_forward, rel_err)
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig, mixers
from attnbench.bench.decode_graph import host_frozen_check
from attnbench.config import ModelConfig
from attnbench.errors import ConfigError
from attnbench.mixers._delta_common import DeltaState
from attnbench.ops.ssd import ssd_recurrent
from attnbench.params import count_params, match_shape

pytestmark = pytest.mark.usefixtures("one_thread")

B, D = 2, 32
SMALL = {"head_dim": 16, "d_state": 16, "chunk_size": 16}  # 4 heads at D = 32
VARIANTS = [{}, SMALL, {"head_dim": 8, "d_state": 12, "chunk_size": 32, "d_conv": 2, "expand": 1.5}]


def make_mixer(args: dict | None = None, dtype=torch.float64, n_embd: int = D, seed: int = 0):
    """A mixer on the torch backend with random (not default-valued) D and norm weights."""
    torch.manual_seed(seed)
    cfg = GPTConfig(mixer="mamba2", n_layer=2, n_head=2, n_embd=n_embd, block_size=256,
                    mixer_args=dict(args or {}), backend="torch")
    m = mixers.get("mamba2")(cfg, 0)
    with torch.no_grad():
        m.norm_weight.copy_(1 + 0.3 * torch.randn_like(m.norm_weight))
        m.D.copy_(1 + 0.5 * torch.randn_like(m.D))
        m.in_proj.weight.normal_(0, 0.3)
        m.o_proj.weight.normal_(0, 0.1)
    return m.to(dtype)


# ------------------------------------------------------------------ the literal reference


def ref_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y_t = silu(sum_j w[:, j] x_{t-W+1+j} + bias), zeros before the sequence; one token at a time."""
    W = w.shape[1]
    out = []
    for t in range(x.shape[1]):
        acc = bias.expand_as(x[:, 0]).clone()
        for j in range(W):
            s = t - W + 1 + j
            if s >= 0:
                acc = acc + w[:, j] * x[:, s]
        out.append(acc * torch.sigmoid(acc))
    return torch.stack(out, 1)


def reference(m, u: torch.Tensor) -> torch.Tensor:
    b, T, d = u.shape
    H, P, N = m.n_heads, m.head_dim, m.d_state
    di = H * P
    Wz, Wx, WB, WC, Wdt = m.in_proj.weight.split([di, di, N, N, H])  # rows z | x | B | C | dt
    cw_x, cw_B, cw_C = m.conv_weight.split([di, N, N])
    cb_x, cb_B, cb_C = m.conv_bias.split([di, N, N])
    z = u @ Wz.T
    x = ref_conv(u @ Wx.T, cw_x, cb_x)
    Bm = ref_conv(u @ WB.T, cw_B, cb_B)
    Cm = ref_conv(u @ WC.T, cw_C, cb_C)
    dt = torch.log1p(torch.exp(u @ Wdt.T + m.dt_bias))
    A = -torch.exp(m.A_log)
    xh = x.view(b, T, H, P)
    y, _ = ssd_recurrent(xh, dt, A, Bm, Cm)
    y = (y + m.D[:, None] * xh).reshape(b, T, di)
    g = y * z * torch.sigmoid(z)
    g = g / torch.sqrt((g * g).mean(-1, keepdim=True) + 1e-5) * m.norm_weight
    return g @ m.o_proj.weight.T


def grads(m, x: torch.Tensor, fn):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    gs = torch.autograd.grad((y * dy).sum(), [x] + list(m.parameters()))
    return y.detach(), list(gs)


CASES = [({}, T) for T in (1, 7, 64, 65, 200)] + [(v, T) for v in VARIANTS[1:] for T in (7, 33, 65)]


@pytest.mark.parametrize("args,T", CASES, ids=[f"{','.join(f'{k}={v}' for k, v in a.items()) or 'default'}-T{T}"
                                               for a, T in CASES])
def test_mixer_matches_literal_reference(args, T):
    m = make_mixer(args)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, g = grads(m, x, lambda x: m(x)[0])
    y_ref, g_ref = grads(m, x, lambda x: reference(m, x))
    assert y.shape == (B, T, D)
    assert rel_err(y, y_ref) < 1e-8
    for n, a, r in zip(["x"] + [n for n, _ in m.named_parameters()], g, g_ref):
        if r.norm() == 0:  # e.g. the decay at T = 1 from an empty state: it multiplies zero
            assert a.norm() < 1e-12, f"gradient of {n}"
        else:
            assert rel_err(a, r) < 1e-8, f"gradient of {n}"


@pytest.mark.parametrize("args", VARIANTS, ids=["default", "small", "other"])
def test_state_continuation(args):
    """Prefills and single-token steps in any mix reproduce the full forward; the state counts tokens."""
    m = make_mixer(args)
    T = 90
    x = torch.randn(B, T, D, dtype=torch.float64)
    full = m(x)[0]
    st = m.init_state(B, T, "cpu", torch.float64)
    pieces = []
    for a, b in [(0, 30), (30, 31), (31, 32), (32, 77), (77, 78), (78, 90)]:
        y, st = m(x[:, a:b], st)
        pieces.append(y)
        assert st.pos == b
    assert rel_err(torch.cat(pieces, 1), full) < 1e-10
    m32 = m.float()
    st = m32.init_state(B, T, "cpu", torch.float32)
    assert st.recurrent.dtype == torch.float32
    y = torch.cat([m32(x[:, :40].float(), st)[0]] + [m32(x[:, t:t + 1].float(), st)[0] for t in range(40, 50)], 1)
    assert rel_err(y, full[:, :50]) < 1e-4


def tiny_model(args: dict, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="mamba2", n_layer=2, n_head=2, n_embd=D, vocab_size=50, block_size=24,
                    mixer_args=args, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("args", [SMALL, VARIANTS[2]], ids=["small", "other"])
def test_model_level_contract(args):
    """Causality, batch independence, prefill + decode == forward, cached == uncached greedy generation."""
    m = tiny_model(args)
    check_causal(m, 24)
    check_batch_independent(m, 24)
    check_prefill_then_decode_equals_forward(m, 24)
    check_greedy_generate_same_with_and_without_cache(m, 40)


def test_decode_step_is_graph_safe():
    m = tiny_model(SMALL, pos_emb="none")
    cache = m.new_cache(1)
    with torch.no_grad():
        m(torch.randint(0, 50, (1, 6)), cache=cache)
    assert host_frozen_check(m, cache, torch.randint(0, 50, (4, 1, 1))) is None


def test_decode_keeps_state_storage():
    m = make_mixer(SMALL, torch.float32)
    st = m.init_state(1, 10, "cpu", torch.float32)
    ptrs = [t.data_ptr() for t in st.tensors()]
    with torch.no_grad():
        m(torch.randn(1, 5, D), st)
        m(torch.randn(1, 1, D), st)
    assert [t.data_ptr() for t in st.tensors()] == ptrs


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("args,key", [
    ({"dstate": 16}, "did you mean mixer_args.d_state"),
    ({"chunk_size": 48}, "model.mixer_args.chunk_size"),
    ({"expand": 0}, "model.mixer_args.expand"),
    ({"head_dim": 0}, "model.mixer_args.head_dim"),
    ({"d_state": 300}, "model.mixer_args.d_state"),
    ({"d_conv": 0}, "model.mixer_args.d_conv"),
])
def test_args_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GPT(GPTConfig(mixer="mamba2", n_layer=1, n_head=2, n_embd=D, mixer_args=args))


def test_position_embeddings():
    with pytest.raises(ConfigError, match="pos_emb='rope'.*'learned' or 'none'"):
        GPT(GPTConfig(mixer="mamba2", n_layer=1, n_head=2, n_embd=D, pos_emb="rope"))
    m = GPT(GPTConfig(mixer="mamba2", n_layer=1, n_head=2, n_embd=D, block_size=16, pos_emb="none"))
    assert m.wpe is None and mixers.get("mamba2").encodes_position


def test_dims_follow_expand():
    """d_inner = expand * n_embd rounded to whole heads; n_groups = 1 (one B and one C per token)."""
    for d, expand, P, H in [(350, 2.0, 64, 11), (384, 2.0, 64, 12), (32, 2.0, 64, 1), (100, 1.5, 16, 9)]:
        cfg = GPTConfig(mixer="mamba2", n_layer=1, n_head=1, n_embd=d, mixer_args={"expand": expand, "head_dim": P})
        m = mixers.get("mamba2")(cfg, 0)
        assert (m.n_heads, m.head_dim, m.d_inner) == (H, P, H * P)
        assert m.in_proj.weight.shape == (2 * H * P + 2 * m.d_state + H, d)


def test_init_survives_model_init():
    torch.manual_seed(0)
    m = GPT(GPTConfig(mixer="mamba2", n_layer=2, n_head=4, n_embd=64, mixer_args={"head_dim": 16}))  # 8 heads
    for blk in m.blocks:
        mx = blk.mixer
        w = mx.conv_weight
        assert w.abs().max() <= 0.5 and w.std() > 0.2  # U(-1/sqrt(4), 1/sqrt(4)), not normal(0, 0.02)
        A = mx.A_log.exp()
        assert (A >= 1).all() and (A <= 16).all() and A.std() > 1
        dt = F.softplus(mx.dt_bias)
        assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()
        assert mx.D.eq(1).all() and mx.norm_weight.eq(1).all()
        assert abs(mx.in_proj.weight.std().item() - 0.02) < 0.002
        assert abs(mx.o_proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.001
        assert mx.A_log._no_weight_decay and mx.dt_bias._no_weight_decay and mx.D._no_weight_decay


# ------------------------------------------------------------------ accounting


@pytest.mark.parametrize("budget", ["10.7M", "1M"])
def test_parameter_matcher_within_one_percent(budget):
    m = match_shape("mamba2", budget)
    assert abs(m.deviation) <= 0.01, m
    assert m.n_params == count_params(m.model_cfg)
    cfg = m.model_cfg
    mx = mixers.get("mamba2")(cfg, 0)
    assert m.head_dim == mx.head_dim == 64 and m.heads == mx.n_heads
    assert abs(mx.d_inner / cfg.n_embd - 2) <= 64 / 2 / cfg.n_embd + 1e-9  # expand 2 within half a head
    d, di, N, H, W = cfg.n_embd, mx.d_inner, mx.d_state, mx.n_heads, mx.d_conv
    per_layer = d * (2 * di + 2 * N + H) + (di + 2 * N) * (W + 1) + 3 * H + di + di * d  # the module doc's count
    assert sum(p.numel() for p in mx.parameters()) == per_layer


@pytest.mark.parametrize("T", [64, 200, 1024])
def test_flops_per_token_vs_counter(T):
    cfg = match_shape("mamba2", "10.7M").model_cfg
    cfg = GPTConfig(**{**cfg.__dict__, "block_size": T, "backend": "torch"})
    m = mixers.get("mamba2")(cfg, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.randn(1, T, cfg.n_embd))
    ratio = m.flops_per_token(cfg, T) * T / fc.get_total_flops()
    print(f"mamba2 T={T}: formula/counter = {ratio:.4f}")
    assert abs(ratio - 1) < 0.05


def test_decode_state_elements_equal_state_size():
    cfg = GPTConfig(mixer="mamba2", n_layer=1, n_head=2, n_embd=D, mixer_args=SMALL, backend="torch")
    m = mixers.get("mamba2")(cfg, 0)
    st = m.init_state(2, 50, "cpu", torch.float32)
    assert isinstance(st, DeltaState)
    numel = sum(t.numel() for t in st.tensors()) // 2
    assert numel == 4 * 16 * 16 + (64 + 32) * 3
    assert m.decode_state_elements(cfg, 50) == numel
    _, st = m(torch.randn(2, 20, D), st)
    assert sum(t.numel() for t in st.tensors()) // 2 == numel  # constant in T
    assert m.decode_state_elements(cfg, 1000) == numel


def test_bundled_config_matches_the_budget():
    from attnbench.resolve import load_config

    cfg = load_config("mamba2")
    assert cfg.model.mixer == "mamba2" and cfg.model.n_layer == 6
    assert abs(count_params(cfg.model) / 10.7e6 - 1) <= 0.01
    base = load_config("shakespeare_char")
    assert cfg.optim == base.optim and cfg.data == base.data


def test_trains_a_little():
    torch.manual_seed(0)
    m = GPT(GPTConfig(mixer="mamba2", n_layer=2, n_head=2, n_embd=D, vocab_size=20, block_size=32,
                      mixer_args=SMALL, backend="torch"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 20, (8, 33))
    losses = []
    for _ in range(30):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
