"""The NSA mixer on the CPU: whole-mixer equality with a literal token loop over the op's oracle,
cached decoding (the graph-safe decode step: equality with the forward at every position, frozen host
counters, stable storage, static ops, block means), argument validation, FLA refusal at construction,
FLOP and state accounting, and a short training run. One GPU test: the decode step in a CUDA graph."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnbench import GPT, GPTConfig
from attnbench.bench import decode_graph
from attnbench.errors import ConfigError
from attnbench.mixers import get
from attnbench.ops import backend as ops_backend
from attnbench.ops.nsa import nsa_reference
from attnbench.ops.rotary import apply_rotary, rotary_tables
from helpers import OpLog, rel_err

NSA = get("nsa")


pytestmark = pytest.mark.usefixtures("one_thread")


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


# ---------------------------------------------------------------------------------------------------- graph-safe decode


@pytest.mark.parametrize("P,args", [
    (0, {}), (1, {}), (15, {}), (16, {}), (17, {}), (40, {}),  # block boundaries (BS = 16), window 32
    (33, {"n_kv_head": 1, "block_counts": 2, "window_size": 8}),  # S = 2 (priority), window < positions
    (5, {"window_size": 0}),
    (20, {"qkv_bias": True, "head_dim": 8}),  # the decode step's concatenated projection with biases
])
def test_decode_steps_equal_forward_at_every_position(P, args):
    """Prefill P tokens, then one-token decode steps (the graph-safe path) to T: every row == the full
    pass. The cache (75) is longer than T and not a multiple of the block size."""
    T = 70
    m = make_mixer(seed=P, **args)
    torch.manual_seed(P + 100)
    x = torch.randn(2, T, 48, dtype=torch.float64)
    ref = m(x)[0]
    st = m.init_state(2, 75, "cpu", torch.float64)
    outs = [m(x[:, :P], st)[0]] if P else []
    outs += [m(x[:, t:t + 1], st)[0] for t in range(P, T)]
    got = torch.cat(outs, 1)
    assert st.pos == T and int(st.pos_t) == T
    # per row; RoPE tables of different position sets may round (float32 cos/sin) differently in the last bit
    errs = [rel_err(got[:, t], ref[:, t]) for t in range(T)]
    assert max(errs) < 1e-6, (max(errs), errs.index(max(errs)))


def check_block_means(st, BS=16):
    """kv_means: the mean of every complete block of the cached keys/values, sum / BS of a partial one,
    zeros after."""
    n, r = divmod(st.pos, BS)
    for cached, means in ((st.k, st.k_means), (st.v, st.v_means)):
        B, _, H, D = cached.shape
        assert rel_err(means[:, :n], cached[:, :n * BS].reshape(B, n, BS, H, D).mean(2)) < 1e-12
        if r:
            assert rel_err(means[:, n], cached[:, n * BS:st.pos].sum(1) / BS) < 1e-12
        assert not means[:, n + (r > 0):].any()


def test_block_means_after_prefill_and_steps():
    m = make_mixer(seed=3)
    x = torch.randn(2, 60, 48, dtype=torch.float64)
    st = m.init_state(2, 70, "cpu", torch.float64)
    m(x[:, :21], st)
    check_block_means(st)
    for t in range(21, 50):
        m(x[:, t:t + 1], st)
        check_block_means(st)
    m(x[:, 50:60], st)  # a multi-token continuation re-pools the blocks it touches
    check_block_means(st)
    assert st.k_means.dtype == torch.float64
    assert m.init_state(1, 8, "cpu", torch.bfloat16).kv_means.dtype == torch.float32


def test_decode_with_frozen_host_counters_and_stable_storage():
    """What a CUDA-graph replay sees: Python ints of the state frozen at their first value, every state
    tensor on its original storage. Steps run that way equal ordinary steps, bit for bit."""
    m = make_mixer(seed=4)
    x = torch.randn(2, 50, 48, dtype=torch.float64)
    st = m.init_state(2, 50, "cpu", torch.float64)
    with torch.no_grad():  # (deepcopy needs tensors outside autograd)
        m(x[:, :14], st)
        ref = copy.deepcopy(st)
        frozen = st.pos
        before = decode_graph.state_tensors(st)
        assert {"states.kv", "states.kv_means", "states.pos_t", "states.rope"} <= {p for p, _ in before}
        for t in range(14, 50):  # crosses the block boundaries at 16, 32 and 48
            st.pos = frozen
            got = m(x[:, t:t + 1], st)[0]
            assert torch.equal(got, m(x[:, t:t + 1], ref)[0]), t
            assert decode_graph.inplace_violation(before, decode_graph.state_tensors(st)) is None
    assert torch.equal(st.kv, ref.kv) and torch.equal(st.kv_means, ref.kv_means) and int(st.pos_t) == 50


def test_bench_host_frozen_check_passes():
    """The benchmark's own screen (bench latency --cuda_graph) on a GPT with NSA in every block (the
    benchmark drops the learned position table, which the model indexes with a host-side position)."""
    cfg = GPTConfig(mixer="nsa", n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=40, pos_emb="none",
                    mixer_args={"n_kv_head": 1, "block_size": 4, "block_counts": 2, "window_size": 8})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    cache = model.new_cache(2, 40)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 11)), cache=cache)
    assert decode_graph.host_frozen_check(model, cache, torch.randint(0, 50, (6, 2, 1))) is None


def test_decode_step_is_static_and_lean():
    """The same ops on the same shapes at every position (what a graph captures once), no host sync.
    The op count is a proxy for kernel launches per step (batch-1 decode is launch-bound on a GPU)."""
    m = make_mixer(dtype=torch.float32, seed=5, n_kv_head=1)
    x = torch.randn(1, 40, 48)
    st = m.init_state(1, 64, "cpu", torch.float32)
    m(x[:, :3], st)
    logs = []
    with torch.no_grad():
        for t in range(3, 40):
            with OpLog() as log:
                m(x[:, t:t + 1], st)
            logs.append(log.calls)
    assert all(calls == logs[0] for calls in logs)
    views = {"view", "_unsafe_view", "transpose", "t", "permute", "expand", "slice", "select", "unsqueeze",
             "split", "split_with_sizes", "unbind", "alias", "detach", "promote_types"}
    n = sum(name not in views for name, _ in logs[0])
    assert n <= 40, n  # a step that re-pooled the whole cache would run about twice as many


def test_bf16_cache_decode_equals_cached_continuation():
    """With a bf16 cache (the GPU's inference setting) the decode steps (float32 running block means)
    equal a two-token continuation over the same cache (the eager path, pooling the bf16 cache)."""
    m = make_mixer(dtype=torch.float32, seed=6)
    x = torch.randn(2, 50, 48)
    st = m.init_state(2, 50, "cpu", torch.bfloat16)
    with torch.no_grad():
        m(x[:, :20], st)
        for t in range(20, 48, 2):
            ref = copy.deepcopy(st)
            steps = torch.cat([m(x[:, t:t + 1], st)[0], m(x[:, t + 1:t + 2], st)[0]], 1)
            both = m(x[:, t:t + 2], ref)[0]
            assert rel_err(steps, both) < 1e-5, t
            assert torch.equal(st.kv, ref.kv)
            assert rel_err(st.kv_means, ref.kv_means) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_step_replays_in_a_cuda_graph(dtype):
    """One decode step captured in a CUDA graph and replayed 40 times (crossing block boundaries and
    the window) equals eager steps on a copy of the state."""
    m = make_mixer(dtype=dtype, seed=7, n_kv_head=1).cuda()
    x = torch.randn(1, 160, 48, device="cuda", dtype=dtype)
    with torch.no_grad():
        st = m.init_state(1, 200, "cuda", dtype)
        m(x[:, :100], st)
        ref = copy.deepcopy(st)
        buf = x[:, 100:101].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a throwaway copy (cuBLAS handles)
            warm = copy.deepcopy(st)
            for _ in range(3):
                m(buf, warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(buf, st)[0]
        errs = []
        for t in range(100, 140):
            buf.copy_(x[:, t:t + 1])
            graph.replay()
            errs.append(rel_err(out, m(x[:, t:t + 1], ref)[0]))
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # the same kernels on the same data: ~0 either way
    assert int(st.pos_t) == 140 and int(ref.pos_t) == 140
    assert max(errs) < tol, errs
    assert rel_err(st.kv, ref.kv) < tol and rel_err(st.kv_means, ref.kv_means) < tol


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
def test_decode_state_elements_are_the_kv_cache_and_block_means(T):
    cfg = GPTConfig(**FLOP_CFG)
    m = NSA(cfg, 0)
    st = m.init_state(1, T, "cpu", torch.float32)
    n_blocks = -(-T // 32)
    numel = st.k.numel() + st.v.numel() + st.k_means.numel() + st.v_means.numel()
    assert NSA.decode_state_elements(cfg, T) == numel == 2 * (T + n_blocks) * 1 * 32
    m(torch.randn(1, T, 384), st)  # filled by a prefill of T tokens: nothing else kept
    assert st.pos == T and int(st.pos_t) == T
    assert NSA.decode_state_elements(cfg, T) == st.k[:, :st.pos].numel() + st.v[:, :st.pos].numel() + \
        st.k_means.numel() + st.v_means.numel()


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
