"""The `kda` mixer (Kimi Delta Attention, attnbench/mixers/kda.py) on the CPU.

The whole mixer (torch backend, chunked op) against a literal float64 reference written here from the
definitions: separate projections cut from the fused in_proj, a token-loop causal convolution, explicit
L2 norms, the per-channel gate, the op's token-by-token recurrence, an explicit sigmoid-gated RMSNorm.
Also: prefill + decode == forward, cached == uncached generation, causality, batch independence, FLA's
parameter count, parameter matching, FLOPs against FlopCounterMode, the state size, init, argument errors
and a short training run.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig, mixers
from attnbench.config import ModelConfig
from attnbench.errors import ConfigError
from attnbench.mixers._delta_common import DeltaState, triangular_solve_flops
from attnbench.ops.kda import kda_recurrent
from attnbench.params import count_params, match_shape
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_prefill_then_decode_equals_forward, rel_err)

B, D, NH = 2, 32, 2
VARIANTS = [{"allow_neg_eigval": True, "chunk_size": 32, "conv_size": 2},
            {"use_short_conv": False, "expand_v": 2.0, "num_heads": 3, "head_dim": 8}]


def make_mixer(args: dict | None = None, dtype=torch.float64, seed: int = 0):
    """The mixer on the torch backend with random (not default-valued) norm weights and gate bias."""
    torch.manual_seed(seed)
    cfg = GPTConfig(mixer="kda", n_layer=2, n_head=NH, n_embd=D, block_size=256, mixer_args=dict(args or {}),
                    backend="torch")
    m = mixers.get("kda")(cfg, 0)
    with torch.no_grad():
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
        m.g_up.bias.copy_(0.5 * torch.randn_like(m.g_up.bias))
    return m.to(dtype)


# ------------------------------------------------------------------ the literal reference


def ref_weights(m) -> dict[str, torch.Tensor]:
    """W_q, W_k, W_v, W_f1, W_b, W_g1 [out, d] cut from in_proj (rows q | k | v | f | b | gate) and the
    convolution weights conv_q, conv_k, conv_v [D, W], with widths from the mixer's dims."""
    H, hk, hv = m.n_heads, m.head_k, m.head_v
    parts = [("q", H * hk), ("k", H * hk), ("v", H * hv), ("f", hv), ("b", H), ("gate", hv)]
    names, widths = zip(*parts)
    assert m.in_proj.weight.shape == (sum(widths), m.cfg.n_embd)
    w = dict(zip(names, m.in_proj.weight.split(widths)))
    if m.conv1d is not None:
        w |= {f"conv_{c}": cw for c, cw in zip("qkv", m.conv1d.weight.split(widths[:3]))}
    return w


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
    H, hk, hv = m.n_heads, m.head_k, m.head_v
    W = ref_weights(m)
    q, k, v = (x @ W[c].T for c in "qkv")
    if m.conv1d is None:
        q, k, v = (t * torch.sigmoid(t) for t in (q, k, v))
    else:
        q, k, v = ref_conv(q, W["conv_q"]), ref_conv(k, W["conv_k"]), ref_conv(v, W["conv_v"])

    def l2(t):
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q, k, v = l2(q.view(Bx, T, H, hk)), l2(k.view(Bx, T, H, hk)), v.view(Bx, T, H, hv)
    f = (x @ W["f"].T) @ m.f_up.weight.T + m.decay.dt_bias                    # [B, T, H*K]
    g = -m.decay.A_log.exp()[:, None] * torch.log1p(torch.exp(f.view(Bx, T, H, hk)))
    beta = torch.sigmoid(x @ W["b"].T) * (2.0 if m.args.allow_neg_eigval else 1.0)
    o, _ = kda_recurrent(q, k, v, g, beta)
    gate = ((x @ W["gate"].T) @ m.g_up.weight.T + m.g_up.bias).view(Bx, T, H, hv)
    y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight * torch.sigmoid(gate)
    return y.reshape(Bx, T, -1) @ m.o_proj.weight.T


def grads(m, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    return y.detach(), list(torch.autograd.grad((y * dy).sum(), [x] + list(m.parameters())))


CASES = [({}, T) for T in (1, 7, 64, 65, 200)] + [(v, T) for v in VARIANTS for T in (7, 65)]


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


@pytest.mark.parametrize("args", [{}, VARIANTS[1]])
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
    m32 = m.float()  # float32, the CPU training dtype: the matrix stays float32
    st = m32.init_state(B, T, "cpu", torch.float32)
    assert st.recurrent.dtype == torch.float32
    y = torch.cat([m32(x[:, :40].float(), st)[0]] + [m32(x[:, t:t + 1].float(), st)[0] for t in range(40, 50)], 1)
    assert rel_err(y, full[:, :50]) < 1e-4


def test_decode_step_is_one_recurrent_step(monkeypatch):
    """A T == 1 call with a state runs the recurrence, a prefill the chunked form."""
    import attnbench.ops.kda as ops

    calls = []
    for fn in ("chunked_core", "recurrent_core"):
        orig = getattr(ops, fn)
        monkeypatch.setattr(ops, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    m = make_mixer(dtype=torch.float32)
    st = m.init_state(1, 40, "cpu", torch.float32)
    m(torch.randn(1, 33, D), st)
    assert calls == ["chunked_core"]
    m(torch.randn(1, 1, D), st)
    assert calls == ["chunked_core", "recurrent_core"]


def tiny_model(args: dict | None = None, T: int = 70) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(mixer="kda", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=T,
                         mixer_args=dict(args or {"chunk_size": 32}))).eval()


def test_model_level_checks_across_several_chunks():
    """tests/test_model.py's checks at T = 70 (three chunks of 32), where the model-level tests use 24."""
    m = tiny_model()
    check_causal(m, 70)
    check_batch_independent(m, 70)
    check_prefill_then_decode_equals_forward(m, 70, splits=(1, 33, 64))
    check_greedy_generate_same_with_and_without_cache(tiny_model(T=40), 50)


def test_decode_step_is_graph_safe():
    """The latency benchmark's CPU check (in-place state updates, no host-side position) passes for kda."""
    from attnbench.bench import decode_graph
    from attnbench.bench.shapes import bench_config, build_model, resolve_shapes

    shape = resolve_shapes(["kda"], match=False, sets=["n_layer=2", "n_embd=32", "n_head=2"])[0]
    m = build_model(bench_config(shape.cfg, 28), "cpu").eval()
    torch.manual_seed(1)
    with torch.no_grad():
        cache = m.new_cache(2, 28)
        m(torch.randint(0, 65, (2, 12)), cache=cache)
    assert decode_graph.host_frozen_check(m, cache, torch.randint(0, 65, (4, 2, 1))) is None


# ------------------------------------------------------------------ configuration and init


@pytest.mark.parametrize("args,key", [
    ({"chunk_size": 16}, "model.mixer_args.chunk_size"),
    ({"chunksize": 32}, "did you mean mixer_args.chunk_size"),
    ({"head_dim": 512}, "FLA kernels need <= 256"),
    ({"expand_v": 0.3}, "model.mixer_args.expand_v"),
    ({"num_heads": 0}, "model.mixer_args.num_heads"),
    ({"conv_size": 0}, "model.mixer_args.conv_size"),
    ({"use_short_conv": "maybe"}, "model.mixer_args.use_short_conv"),
])
def test_args_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GPT(GPTConfig(mixer="kda", n_layer=1, n_head=NH, n_embd=D, mixer_args=args))


def test_rope_is_refused():
    with pytest.raises(ConfigError, match="pos_emb='rope'.*'learned' or 'none'"):
        GPT(GPTConfig(mixer="kda", n_layer=1, n_head=NH, n_embd=D, pos_emb="rope"))
    assert mixers.get("kda").encodes_position


def test_init_survives_model_init():
    """The GPT's generic init keeps the convolution, the gate parameters (FLA's draws) and the norm."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(mixer="kda", n_layer=2, n_head=4, n_embd=64))
    for blk in m.blocks:
        mx = blk.mixer
        w = mx.conv1d.weight
        assert w.abs().max() <= 0.5 and w.std() > 0.2
        assert mx.o_norm.weight.eq(1).all() and mx.g_up.bias.eq(0).all()
        for lin in (mx.in_proj, mx.f_up, mx.g_up):
            assert abs(lin.weight.std().item() - 0.02) < 0.003
        assert abs(mx.o_proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.001
        A = mx.decay.A_log.exp()
        dt = F.softplus(mx.decay.dt_bias)
        assert (A >= 1 - 1e-6).all() and (A <= 16 + 1e-5).all() and mx.decay.dt_bias.shape == (4 * 16,)
        assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all() and dt.std() > 0.01
        assert mx.decay.A_log._no_weight_decay and mx.decay.dt_bias._no_weight_decay


def fla_param_count(a: dict, d: int, H: int, hk: int, hv: int) -> int:
    """FLA's KimiDeltaAttention: q, k, v, b projections, three convolutions (no bias), f_proj and g_proj
    (low rank hv, g's second Linear with a bias), A_log [H], dt_bias [H*K], the norm weight, o_proj."""
    dk, dv, W = H * hk, H * hv, a.get("conv_size", 4)
    conv = W * (2 * dk + dv) if a.get("use_short_conv", True) else 0
    return (d * (2 * dk + dv) + conv + d * hv + hv * dk + d * H + H + dk + d * hv + hv * dv + dv + hv + dv * d)


@pytest.mark.parametrize("args", [{}] + VARIANTS, ids=["default", "neg-eig", "no-conv"])
def test_parameter_count_is_flas(args):
    m = make_mixer(args, dtype=torch.float32)
    assert sum(p.numel() for p in m.parameters()) == fla_param_count(args, D, m.n_heads, m.head_k, m.head_v)
    assert [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)] == ["in_proj", "o_proj", "f_up",
                                                                                         "g_up"]


@pytest.mark.parametrize("budget,n_layer", [("10.7M", 6), ("300k", 2)])
def test_parameter_matching_within_one_percent(budget, n_layer):
    match = match_shape("kda", budget, n_layer=n_layer)
    assert abs(match.deviation) <= 0.01 and match.kernel_ok
    torch.manual_seed(0)
    assert count_params(match.model_cfg) == sum(p.numel() for p in GPT(match.model_cfg).parameters())


# ------------------------------------------------------------------ accounting


@pytest.mark.parametrize("T", [64, 256, 1024])
def test_flops_per_token_vs_counter(T):
    """The analytic forward FLOPs agree with FlopCounterMode plus the triangular solve it cannot see."""
    cfg = GPTConfig(mixer="kda", n_layer=6, n_head=6, n_embd=384, block_size=T, backend="torch")
    m = mixers.get("kda")(cfg, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.randn(1, T, 384))
    unseen = triangular_solve_flops(T, m.n_heads, m.head_k, m.head_v, m.args.chunk_size)
    ratio = m.flops_per_token(cfg, T) * T / (fc.get_total_flops() + unseen)
    assert abs(ratio - 1) < 0.05, ratio


@pytest.mark.parametrize("args", [{}, VARIANTS[1]])
def test_decode_state_elements_equal_state_size(args):
    cfg = GPTConfig(mixer="kda", n_layer=1, n_head=NH, n_embd=D, mixer_args=args, backend="torch")
    m = mixers.get("kda")(cfg, 0)
    st = m.init_state(2, 50, "cpu", torch.float32)
    assert isinstance(st, DeltaState) and (st.conv is None) == (not m.args.use_short_conv)
    numel = sum(t.numel() for t in st.tensors()) // 2
    assert m.decode_state_elements(cfg, 50) == numel == m.decode_state_elements(cfg, 1000)
    _, st = m(torch.randn(2, 20, D), st)
    assert sum(t.numel() for t in st.tensors()) // 2 == numel  # constant in T


# ------------------------------------------------------------------ training


def test_short_training_run_lowers_loss():
    """Sequences repeating a random period-4 pattern: the next token is the one 4 steps back."""
    torch.manual_seed(0)
    V, T = 16, 32
    model = GPT(GPTConfig(mixer="kda", n_layer=2, n_head=2, n_embd=32, vocab_size=V, block_size=T, backend="torch"))
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
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3  # ln 16 = 2.77 without the context
    assert start > 0.95 * math.log(V) and end < start - 0.5, (start, end)


def test_bundled_config_matches_the_budget():
    from attnbench.resolve import load_config

    cfg = load_config("kda")
    assert cfg.model.mixer == "kda" and isinstance(cfg.model, ModelConfig)
    assert abs(count_params(cfg.model) / 10_700_000 - 1) <= 0.01
