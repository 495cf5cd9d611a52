"""The NSA mixer on the CPU: whole-mixer equality with a literal token loop over the op's oracle,
cached decoding, argument validation, FLA refusal at construction, FLOP and state accounting, and
a short training run."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig
from attnbench.errors import ConfigError
from attnbench.mixers import get
from attnbench.ops import backend as ops_backend
from attnbench.ops.nsa import nsa_reference
from attnbench.ops.rotary import apply_rotary, rotary_tables

NSA = get("nsa")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: a second intra-op thread only adds sync overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref||; the absolute norm when ref is exactly zero (e.g. q's gradient at T = 1)."""
    diff, norm = (a.double() - ref.double()).norm().item(), ref.double().norm().item()
    return diff / norm if norm > 0 else diff


def make_mixer(n_embd=48, n_head=4, dtype=torch.float64, seed=0, backend="torch", **args) -> torch.nn.Module:
    args = {"n_kv_head": 2, "block_size": 16, "block_counts": 4, "window_size": 32, **args}
    cfg = GPTConfig(mixer="nsa", n_embd=n_embd, n_head=n_head, mixer_args=args, backend=backend)
    torch.manual_seed(seed)
    return NSA(cfg, 0).to(dtype)


def token_loop_reference(m, x: torch.Tensor) -> torch.Tensor:
    """The mixer written out one token at a time on top of the op's literal oracle `nsa_reference`.

    RoPE uses the shared helpers (float32 inside, like the mixer; `test_rotary_convention` checks them
    against the float64 formula) with the tables of the whole sequence, so both sides round alike.
    """
    B, T, C = x.shape
    HQ, H, D, a = m.n_head, m.n_kv_head, m.head_dim, m.args
    cos, sin = rotary_tables(D, torch.arange(T), a.rope_theta)
    ks, vs, ys = [], [], []
    for t in range(T):
        xt = x[:, t:t + 1]
        q = F.linear(xt, m.q_proj.weight, m.q_proj.bias).view(B, 1, HQ, D)
        k = F.linear(xt, m.k_proj.weight, m.k_proj.bias).view(B, 1, H, D)
        v = F.linear(xt, m.v_proj.weight, m.v_proj.bias).view(B, 1, H, D)
        g = torch.sigmoid(F.linear(xt, m.g_proj.weight)).view(B, 1, HQ, 3)
        q, k = apply_rotary(q, cos[t:t + 1], sin[t:t + 1]), apply_rotary(k, cos[t:t + 1], sin[t:t + 1])
        ks.append(k)
        vs.append(v)
        o = nsa_reference(q, torch.cat(ks, 1), torch.cat(vs, 1), g[..., 0], g[..., 1], g[..., 2],
                          a.block_size, a.block_counts, a.window_size)
        ys.append(F.linear(o.reshape(B, 1, HQ * D), m.o_proj.weight))
    return torch.cat(ys, 1)


def out_and_grads(fn, m, x, dy):
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = fn(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def test_shapes_and_modules():
    m = make_mixer(dtype=torch.float32)
    x = torch.randn(3, 20, 48)
    y, st = m(x)
    assert y.shape == x.shape and st is None
    assert (m.q_proj.out_features, m.k_proj.out_features, m.g_proj.out_features) == (4 * 12, 2 * 12, 12)
    assert m.q_proj.bias is None and m.g_proj.bias is None and m.o_proj.bias is None
    mb = make_mixer(qkv_bias=True, head_dim=8)
    assert mb.q_proj.bias.shape == (32,) and mb.v_proj.bias.shape == (16,) and mb.o_proj.in_features == 32
    assert mb(torch.randn(1, 5, 48, dtype=torch.float64))[0].shape == (1, 5, 48)


def test_rotary_convention():
    """The shared RoPE is the non-interleaved half rotation of FLA's RotaryEmbedding: pairs (i, i + D/2)
    rotated by t * theta^(-2i/D)."""
    D, T, theta = 16, 50, 500.0
    x = torch.randn(2, T, 3, D, dtype=torch.float64)
    cos, sin = rotary_tables(D, torch.arange(T), theta)
    got = apply_rotary(x.float(), cos, sin)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    assert rel_err(got, torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)) < 1e-6


@pytest.mark.parametrize("T,H,S", [(1, 2, 4), (7, 1, 2), (64, 2, 4), (65, 1, 2), (200, 2, 4), (200, 1, 8)])
def test_matches_token_loop_reference_float64(T, H, S):
    m = make_mixer(n_kv_head=H, block_counts=S, seed=T)
    torch.manual_seed(T + 1)
    x, dy = torch.randn(2, T, 48, dtype=torch.float64), torch.randn(2, T, 48, dtype=torch.float64)
    y, dx, dp = out_and_grads(lambda z: m(z)[0], m, x, dy)
    y_ref, dx_ref, dp_ref = out_and_grads(lambda z: token_loop_reference(m, z), m, x, dy)
    assert rel_err(y, y_ref) < 1e-8
    assert rel_err(dx, dx_ref) < 1e-8
    for name in dp:
        assert rel_err(dp[name], dp_ref[name]) < 1e-8, name


@pytest.mark.parametrize("splits", [(1,), (13,), (40, 41, 45), (5, 32, 33, 70)])
def test_cached_continuation_equals_forward(splits):
    """Prefill, multi-token continuations and single decode steps reproduce the full pass."""
    T = 90
    m = make_mixer(n_kv_head=1, seed=1)
    x = torch.randn(2, T, 48, dtype=torch.float64)
    ref = m(x)[0]
    st = m.init_state(2, T, "cpu", torch.float64)
    bounds = [0, *splits]
    outs = [m(x[:, a:b], st)[0] for a, b in zip(bounds, bounds[1:])]
    outs += [m(x[:, t:t + 1], st)[0] for t in range(splits[-1], T)]
    assert st.pos == T
    # RoPE tables for a slice of positions may round (float32 cos/sin) differently in the last bit
    assert rel_err(torch.cat(outs, 1), ref) < 1e-6


def test_cache_overflow_and_empty_state():
    m = make_mixer()
    st = m.init_state(1, 10, "cpu", torch.float64)
    assert st.pos == 0 and st.k.shape == (1, 10, 2, 12)
    m(torch.randn(1, 8, 48, dtype=torch.float64), st)
    with pytest.raises(RuntimeError, match="full"):
        m(torch.randn(1, 3, 48, dtype=torch.float64), st)


# ---------------------------------------------------------------------------------------------------- config


def build(n_head=4, n_embd=48, backend="auto", **args):
    return NSA(GPTConfig(mixer="nsa", n_embd=n_embd, n_head=n_head, mixer_args=args, backend=backend), 0)


@pytest.mark.parametrize("key,near", [("n_kv_heads", "n_kv_head"), ("block_count", "block_counts"),
                                      ("window", "window_size"), ("rope_base", "rope_theta")])
def test_unknown_key_names_nearest(key, near):
    with pytest.raises(ConfigError, match=rf"model\.mixer_args\.{key}.*mixer_args\.{near}\?"):
        build(**{key: 1})


@pytest.mark.parametrize("args,key", [
    ({"n_kv_head": 3}, "model.mixer_args.n_kv_head"),  # 4 query heads are not a multiple of 3
    ({"n_kv_head": 0}, "model.mixer_args.n_kv_head"),
    ({"block_size": 24}, "model.mixer_args.block_size"),
    ({"block_counts": 3}, "model.mixer_args.block_counts"),
    ({"block_size": 4, "block_counts": 4}, "model.mixer_args.block_size"),
    ({"window_size": -1}, "model.mixer_args.window_size"),
    ({"head_dim": 7}, "model.mixer_args.head_dim"),
    ({"rope_theta": 0.0}, "model.mixer_args.rope_theta"),
    ({"block_size": "big"}, "model.mixer_args.block_size"),
])
def test_invalid_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(**args)


def test_odd_default_head_dim_is_refused():
    with pytest.raises(ConfigError, match="head_dim.*even"):
        build(n_head=4, n_embd=36)  # 36 // 4 = 9


def test_fla_backend_refuses_unsupported_shape_at_construction():
    with pytest.raises(ConfigError, match=r"power of two >= 16.*model\.n_head=16.*n_kv_head=1"):
        build(n_head=4, n_kv_head=1, backend="fla")
    with pytest.raises(ConfigError, match="block_size"):
        build(n_head=16, n_embd=256, n_kv_head=1, block_size=8, block_counts=2, backend="fla")
    m = build(n_head=16, n_embd=384, n_kv_head=1, head_dim=32, block_size=32, block_counts=4, backend="fla")
    assert m.head_dim == 32
    build(n_head=4, n_kv_head=1, backend="torch")  # the torch backend takes any valid shape


def test_auto_backend_logs_one_notice(caplog, monkeypatch):
    monkeypatch.setattr(ops_backend, "_noticed", set())
    with caplog.at_level(logging.WARNING, logger="attnbench.ops"):
        build(n_head=4, n_kv_head=2)
        build(n_head=4, n_kv_head=2)
    msgs = [r.getMessage() for r in caplog.records if "NSA mixer" in r.getMessage()]
    assert len(msgs) == 1 and "PyTorch path will be used on CUDA" in msgs[0] and "n_kv_head=1" in msgs[0]


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "none"])
def test_every_pos_emb_and_cached_decode(pos_emb):
    cfg = GPTConfig(mixer="nsa", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=40, pos_emb=pos_emb,
                    mixer_args={"n_kv_head": 1, "block_size": 8, "block_counts": 2, "window_size": 8})
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    assert (m.wpe is not None) == (pos_emb == "learned")
    x = torch.randint(0, 50, (2, 40))
    ref = m(x)[0]
    cache = m.new_cache(2)
    got = torch.cat([m(x[:, :17], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(17, 40)], 1)
    assert rel_err(got, ref) < 1e-4


# ---------------------------------------------------------------------------------------------------- accounting

# The shape of configs/nsa.toml
FLOP_CFG = dict(mixer="nsa", n_embd=384, n_head=16,
                mixer_args={"n_kv_head": 1, "head_dim": 32, "block_size": 32, "block_counts": 4, "window_size": 64})


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kw) -> int:
    """FlopCounterMode has no formula for the CPU's fused SDPA kernel (it counts 0): this is PyTorch's
    own SDPA formula, 2*MACs of QK^T and PV over the query heads (k/v may have fewer heads: GQA)."""
    b, hq, tq, d = q_shape
    return 4 * b * hq * tq * k_shape[-2] * d


@pytest.mark.parametrize("T", [64, 256, 1024])
def test_torch_flops_match_flop_counter(T):
    cfg = GPTConfig(**FLOP_CFG, backend="torch")
    torch.manual_seed(0)
    m = NSA(cfg, 0)
    x = torch.randn(1, T, 384)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        m(x)
    counted = fc.get_total_flops()
    # the SDPA calls were visible to the mapping (not silently another kernel): 2 branches, 4*D*T each
    assert fc.get_flop_counts()["Global"][torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] == \
        2 * 4 * 16 * T * T * 32
    predicted = NSA.flops_per_token_torch(cfg, T) * T
    assert abs(predicted / counted - 1) < 0.05, (predicted, counted)


def test_algorithmic_flops_below_dense_and_their_relation():
    cfg = GPTConfig(**FLOP_CFG)
    proj = 2 * 384 * (16 * 32 + 2 * 32 + 48) + 2 * 16 * 32 * 384
    for T in (1, 16, 64, 100, 128, 256, 1024, 4096):
        alg, dense = NSA.flops_per_token(cfg, T), NSA.flops_per_token_torch(cfg, T)
        assert alg <= dense
        # explicit algorithmic count: compression over T//32 blocks, 128 selected keys, 64 window keys
        assert alg == proj + 16 * 4 * 32 * (T // 32 + min(128, T) + min(64, T))
        if T <= 64:  # the context is within both the selection and the window: nothing to skip
            assert alg == dense
    # long contexts: sparse branches are O(1) per token, the dense path O(T)
    assert NSA.flops_per_token_torch(cfg, 4096) / NSA.flops_per_token(cfg, 4096) > 10
    nowin = GPTConfig(**{**FLOP_CFG, "mixer_args": {**FLOP_CFG["mixer_args"], "window_size": 0}})
    assert NSA.flops_per_token(cfg, 256) - NSA.flops_per_token(nowin, 256) == 16 * 4 * 32 * 64


@pytest.mark.parametrize("T", [1, 37, 256])
def test_state_numbers_is_the_kv_cache(T):
    cfg = GPTConfig(**FLOP_CFG)
    m = NSA(cfg, 0)
    st = m.init_state(1, T, "cpu", torch.float32)
    assert NSA.state_numbers(cfg, T) == st.k.numel() + st.v.numel() == 2 * T * 1 * 32
    m(torch.randn(1, T, 384), st)  # filled by a prefill of T tokens: nothing else kept
    assert st.pos == T and NSA.state_numbers(cfg, T) == st.k[:, :st.pos].numel() + st.v[:, :st.pos].numel()


# ---------------------------------------------------------------------------------------------------- training


def test_short_training_lowers_loss():
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="nsa", n_layer=2, n_head=4, n_embd=64, vocab_size=32, block_size=64,
                    mixer_args={"n_kv_head": 1, "block_size": 8, "block_counts": 2, "window_size": 16})
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    # learnable: each row repeats a random pattern of period 7 (copyable once one period is seen)
    pat = torch.randint(0, 32, (16, 7))
    data = pat.repeat(1, 10)[:, :65]
    losses = []
    for _ in range(30):
        _, loss = m(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(32)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
