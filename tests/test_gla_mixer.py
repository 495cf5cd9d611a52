"""The `gla` mixer (attnbench/mixers/gla.py) on the CPU.

The whole mixer (torch backend, chunked) is checked against a literal float64 reference written here from
the definitions: separate projections cut from the fused in_proj, an optional token-loop causal
convolution, the low-rank gate, the recurrence token by token with explicit outer products, and an
explicit (gated) RMSNorm. Also: state continuation, causality, batch independence, cached generation,
graph-safe decoding, argument errors, initialisation, parameter matching, FLOPs against
FlopCounterMode, state size, and a short training run.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig, flops, mixers
from attnbench.bench.decode_graph import host_frozen_check
from attnbench.config import ModelConfig
from attnbench.errors import ConfigError
from attnbench.mixers._delta_common import DeltaState
from attnbench.ops.gla import SUB_CHUNK, chunk_len
from attnbench.params import count_params, match_shape
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_prefill_then_decode_equals_forward, counted_forward_flops, rel_err, state_elements)

B, D, NH = 2, 32, 2
VARIANTS = [
    {},
    {"use_short_conv": True, "conv_size": 3, "chunk_size": 16},
    {"use_output_gate": False, "expand_k": 1.0, "expand_v": 2.0, "num_heads": 4, "chunk_size": 32,
     "gate_low_rank_dim": 4, "gate_logit_normalizer": 4.0},
]


def make_mixer(args: dict | None = None, dtype=torch.float64, n_embd: int = D, n_head: int = NH, seed: int = 0):
    """A gla mixer on the torch backend with random (not default-valued) norm weights and gate bias."""
    torch.manual_seed(seed)
    cfg = GPTConfig(mixer="gla", n_layer=2, n_head=n_head, n_embd=n_embd, block_size=256,
                    mixer_args=dict(args or {}), backend="torch")
    m = mixers.get("gla")(cfg, 0)
    with torch.no_grad():
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
        m.gk_up.bias.copy_(torch.randn_like(m.gk_up.bias))
        m.gk_up.weight.mul_(10)  # gates that vary across channels and tokens
    return m.to(dtype)


# ------------------------------------------------------------------ the literal reference


def ref_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_t = silu(sum_j w[:, j] x_{t-W+1+j}), zeros before the sequence; one token at a time."""
    W = w.shape[1]
    out = []
    for t in range(x.shape[1]):
        acc = torch.zeros_like(x[:, 0])
        for j in range(W):
            if t - W + 1 + j >= 0:
                acc = acc + w[:, j] * x[:, t - W + 1 + j]
        out.append(acc * torch.sigmoid(acc))
    return torch.stack(out, 1)


def reference(m, x: torch.Tensor) -> torch.Tensor:
    Bx, T = x.shape[:2]
    a = m.args
    H, K, Vh = m.n_heads, m.head_k, m.head_v
    widths = [("q", H * K), ("k", H * K), ("v", H * Vh), ("gk", a.gate_low_rank_dim)]
    widths += [("g", H * Vh)] if a.use_output_gate else []
    names, sizes = zip(*widths)
    assert m.in_proj.weight.shape == (sum(sizes), m.cfg.n_embd)
    W = dict(zip(names, m.in_proj.weight.split(sizes)))
    q, k, v = (x @ W[c].T for c in "qkv")
    if a.use_short_conv:
        cw = dict(zip("qkv", m.conv1d.weight.split(sizes[:3])))
        q, k, v = ref_conv(q, cw["q"]), ref_conv(k, cw["k"]), ref_conv(v, cw["v"])
    gk = F.logsigmoid((x @ W["gk"].T) @ m.gk_up.weight.T + m.gk_up.bias) / a.gate_logit_normalizer
    q, k, gk = (t.view(Bx, T, H, K) for t in (q, k, gk))
    v = v.view(Bx, T, H, Vh)
    o = torch.zeros(Bx, T, H, Vh, dtype=x.dtype)
    S = torch.zeros(Bx, H, K, Vh, dtype=x.dtype)
    for t in range(T):
        S = torch.exp(gk[:, t])[..., None] * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] / math.sqrt(K), S)
    y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight
    if a.use_output_gate:
        gate = (x @ W["g"].T).view(Bx, T, H, Vh)
        y = y * gate * torch.sigmoid(gate)
    return y.reshape(Bx, T, -1) @ m.o_proj.weight.T


def grads(m, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients of <fn(x), dy> w.r.t. x and every parameter (dy fixed random)."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    gs = torch.autograd.grad((y * dy).sum(), [x] + list(m.parameters()))
    return y.detach(), list(gs)


CASES = [({}, T) for T in (1, 7, 64, 65, 200)] + [(v, T) for v in VARIANTS[1:] for T in (7, 65)]


@pytest.mark.parametrize("args,T", CASES, ids=[f"{','.join(f'{k}={v}' for k, v in a.items()) or 'default'}-T{T}"
                                               for a, T in CASES])
def test_mixer_matches_literal_reference(args, T):
    m = make_mixer(args)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, g = grads(m, x, lambda x: m(x)[0])
    y_ref, g_ref = grads(m, x, lambda x: reference(m, x))
    assert y.shape == (B, T, D)
    assert rel_err(y, y_ref) < 1e-8
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, a, r in zip(names, g, g_ref):
        if r.norm() == 0:  # e.g. the decay at T=1 from an empty state: it multiplies zero
            assert a.norm() < 1e-12, f"gradient of {n}"
        else:
            assert rel_err(a, r) < 1e-8, f"gradient of {n}"


@pytest.mark.parametrize("args", VARIANTS[:2])
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


def test_mixer_causal_and_batch_independent():
    m = make_mixer()
    x = torch.randn(3, 40, D, dtype=torch.float64)
    ref = m(x)[0]
    y = x.clone()
    y[:, 21] += 1.0
    out = m(y)[0]
    assert torch.equal(out[:, :21], ref[:, :21]) and not torch.allclose(out[:, 21:], ref[:, 21:])
    y = x.clone()
    y[1] = torch.randn(40, D, dtype=torch.float64)
    out = m(y)[0]
    assert torch.equal(out[[0, 2]], ref[[0, 2]]) and not torch.allclose(out[1], ref[1])


@pytest.mark.parametrize("args", VARIANTS[1:], ids=["conv", "nogate"])
def test_model_level_contract(args):
    """The checks tests/test_model.py runs for every mixer (there on the defaults), on the variants."""
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="gla", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=24,
                    mixer_args=dict(args, chunk_size=16))
    model = GPT(cfg).eval()
    check_causal(model, 24)
    check_batch_independent(model, 24)
    check_prefill_then_decode_equals_forward(model, 24)
    check_greedy_generate_same_with_and_without_cache(model, 30)


def test_decode_step_is_graph_safe():
    """In-place state updates and no host-side positions (the latency benchmark's check before capture)."""
    torch.manual_seed(0)
    for args in VARIANTS[:2]:
        m = GPT(GPTConfig(mixer="gla", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=24,
                          pos_emb="none", mixer_args=args)).eval()
        cache = m.new_cache(1)
        with torch.no_grad():
            m(torch.randint(0, 50, (1, 6)), cache=cache)
        assert host_frozen_check(m, cache, torch.randint(0, 50, (4, 1, 1))) is None


# ------------------------------------------------------------------ configuration and initialisation


@pytest.mark.parametrize("args,key", [
    ({"chunksize": 32}, "did you mean mixer_args.chunk_size"),
    ({"chunk_size": 48}, "model.mixer_args.chunk_size"),
    ({"num_heads": 5}, "model.mixer_args.num_heads"),
    ({"expand_k": 0.3}, "model.mixer_args.expand_k"),
    ({"expand_v": 0.3}, "model.mixer_args.expand_v"),
    ({"gate_low_rank_dim": 0}, "model.mixer_args.gate_low_rank_dim"),
    ({"gate_logit_normalizer": 0}, "model.mixer_args.gate_logit_normalizer"),
    ({"conv_size": 0}, "model.mixer_args.conv_size"),
    ({"use_output_gate": "maybe"}, "model.mixer_args.use_output_gate"),
])
def test_args_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GPT(GPTConfig(mixer="gla", n_layer=1, n_head=NH, n_embd=D, mixer_args=args))


def test_key_head_dim_limit_and_position_embeddings():
    with pytest.raises(ConfigError, match=r"expand_k.*key head dim of 512.*FLA kernels need <= 256"):
        GPT(GPTConfig(mixer="gla", n_layer=1, n_head=1, n_embd=1024))
    with pytest.raises(ConfigError, match="pos_emb='rope'.*'learned' or 'none'"):
        GPT(GPTConfig(mixer="gla", n_layer=1, n_head=NH, n_embd=D, pos_emb="rope"))
    m = GPT(GPTConfig(mixer="gla", n_layer=1, n_head=NH, n_embd=D, block_size=16, pos_emb="none"))
    assert m.wpe is None and mixers.get("gla").encodes_position


def test_layout_and_init():
    """FLA's layer's parameters (separate q, k, v, g, W_1 projections stacked in in_proj; W_2 with bias);
    the generic init; the initial decay e^{logsigmoid(0) / 16} ~ 0.958 per token."""
    torch.manual_seed(0)
    d = 64
    m = GPT(GPTConfig(mixer="gla", n_layer=2, n_head=2, n_embd=d))
    mx = m.blocks[0].mixer
    H, K, Vh = mx.n_heads, mx.head_k, mx.head_v
    assert (H, K, Vh) == (2, 16, 32)  # expand_k 0.5, expand_v 1
    assert [n for n, mod in mx.named_modules() if isinstance(mod, torch.nn.Linear)] == ["in_proj", "o_proj", "gk_up"]
    dk, dv, r = H * K, H * Vh, 16
    fla_count = d * dk + d * dk + d * dv + d * dv + (d * r + r * dk + dk) + Vh + dv * d  # q k v g gk norm o
    assert sum(p.numel() for p in mx.parameters()) == fla_count
    assert mx.conv1d is None
    assert abs(mx.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(mx.o_proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.001
    assert mx.gk_up.bias.eq(0).all() and mx.o_norm.weight.eq(1).all()
    with torch.no_grad():
        decay = mx.log_decay(torch.zeros(1, 1, r)).exp()
    assert torch.allclose(decay, torch.full_like(decay, math.exp(-math.log(2) / 16)))


# ------------------------------------------------------------------ accounting


def test_parameter_matching():
    m = match_shape("gla", "10.7M")
    cfg = m.model_cfg
    assert abs(m.deviation) <= 0.01 and m.kernel_ok
    assert count_params(cfg) == m.n_params == sum(p.numel() for p in GPT(cfg).parameters())
    assert 48 <= m.head_dim <= 80 and 0.85 < cfg.n_embd / 384 < 1.15
    small = match_shape("gla", "3M", n_layer=4)
    assert abs(small.deviation) <= 0.01 and count_params(small.model_cfg) == small.n_params


def diag_flops(T: int, H: int, K: int, C: int) -> int:
    """The elementwise diagonal sub-chunk products, which FlopCounterMode does not see."""
    C = chunk_len(T, C)
    return H * (-(-T // C)) * 2 * C * SUB_CHUNK * K


FLOP_CASES = [({}, T) for T in (64, 100, 1024)] + [(VARIANTS[1], 100), (VARIANTS[2], 100)]


@pytest.mark.parametrize("args,T", FLOP_CASES, ids=[f"{i}-T{T}" for i, (_, T) in enumerate(FLOP_CASES)])
def test_flops_per_token_vs_counter(args, T):
    """At the matched shape (d = 384, 3 heads): the formula equals FlopCounterMode plus the diagonal
    sub-chunk products it cannot see (within 0.5%), and the counter alone within 5%."""
    cfg = GPTConfig(mixer="gla", n_layer=6, n_head=3, n_embd=384, block_size=T, backend="torch", mixer_args=args)
    m = mixers.get("gla")(cfg, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.randn(1, T, 384))
    counted = fc.get_total_flops()
    formula = m.flops_per_token(cfg, T) * T
    unseen = diag_flops(T, m.n_heads, m.head_k, m.args.chunk_size)
    assert abs(formula / (counted + unseen) - 1) < 0.005, (formula, counted, unseen)
    assert abs(formula / counted - 1) < 0.05


def test_model_flops_and_state_at_the_matched_shape():
    cfg = replace(match_shape("gla", "10.7M").model_cfg, n_layer=1, block_size=256, backend="torch")
    model = GPT(cfg).eval()
    measured = counted_forward_flops(model, torch.randint(0, cfg.vocab_size, (1, 256)))
    predicted = flops.model_flops_per_token(cfg, 256, torch_path=True)["total"] * 256
    assert abs(predicted / measured - 1) < 0.05
    cache = model.new_cache(1, 40)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 40)), cache=cache)
    mx = model.blocks[0].mixer
    assert state_elements(cache.states) == flops.decode_state_elements(cfg, 40) == mx.n_heads * mx.head_k * mx.head_v


@pytest.mark.parametrize("args", VARIANTS[:2])
def test_decode_state_elements_equal_state_size(args):
    cfg = GPTConfig(mixer="gla", n_layer=1, n_head=NH, n_embd=D, mixer_args=args, backend="torch")
    m = mixers.get("gla")(cfg, 0)
    st = m.init_state(2, 50, "cpu", torch.float32)
    assert isinstance(st, DeltaState)
    numel = sum(t.numel() for t in st.tensors()) // 2
    assert m.decode_state_elements(cfg, 50) == numel
    _, st = m(torch.randn(2, 20, D), st)
    assert sum(t.numel() for t in st.tensors()) // 2 == numel  # constant in T
    assert m.decode_state_elements(cfg, 1000) == numel
    assert (st.conv is not None) == bool(args.get("use_short_conv"))


def test_bundled_config_matches():
    from attnbench.resolve import load_config

    cfg = load_config("gla")
    assert cfg.model.mixer == "gla" and abs(count_params(cfg.model) / 10_700_000 - 1) <= 0.01


# ------------------------------------------------------------------ training


def test_short_training_run_lowers_loss():
    """Sequences repeating a random period-4 pattern: the next token is the one 4 steps back. With the
    optional short convolution, as the delta family's test: without it (FLA's default) GLA has to find
    "4 steps back" through the learned position table, which 30 steps do not show."""
    torch.manual_seed(0)
    V, T = 16, 32
    cfg = GPTConfig(mixer="gla", n_layer=2, n_head=2, n_embd=32, vocab_size=V, block_size=T, backend="torch",
                    mixer_args={"use_short_conv": True})
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        pattern = torch.randint(0, V, (16, 4), generator=gen)
        seq = pattern.repeat(1, (T + 1) // 4 + 1)[:, :T + 1]
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert start > 0.95 * math.log(V) and end < start - 0.5, (start, end)
