"""Sliding-window attention on the GPU: FLA's windowed `parallel_attn` (the op's CUDA path) in bf16
against the float64 per-query oracle for outputs and gradients, the mixer on FLA under bf16 autocast
against a float64 copy of itself on PyTorch, cached decoding with the ring buffer wrapping, and the
decode step in a CUDA graph. Tolerances as the NSA and delta-family GPU tests: relative error <= 1e-2
(bf16 rounds at ~4e-3)."""
from __future__ import annotations

import copy

import pytest
import torch

from attnbench import GPT, GPTConfig
from attnbench.errors import AttnbenchError
from attnbench.mixers import get
from attnbench.ops.backend import fla_available, record_backends
from attnbench.ops.sliding_window import sliding_window_attention, swa_reference, swa_torch
from attnbench.resolve import load_config
from helpers import out_and_grads, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and fla"),
]

B, H, D, W = 2, 4, 64, 64
NAMES = ["o", "dq", "dk", "dv"]


def make_inputs(T, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, device="cuda").to(dtype) for _ in range(3)]


@pytest.mark.parametrize("T", [63, 256, 1000])
@pytest.mark.parametrize("window", [8, 64, 200])  # below, at and above a key tile (16-64)
def test_fla_matches_float64_reference(T, window):
    """Outputs and gradients of the bf16 kernel against the literal oracle in float64 (on the bf16-rounded
    inputs; the oracle runs on the CPU, where its per-query loop is cheaper than many tiny GPU launches)."""
    inputs = make_inputs(T, seed=T + window)
    do = torch.randn(B, T, H, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).bfloat16()
    with record_backends() as seen:
        o, grads = out_and_grads(sliding_window_attention, inputs, do, window=window, backend="fla")
    assert o.dtype == torch.bfloat16 and seen["swa"] == "fla"
    o_ref, grads_ref = out_and_grads(swa_reference, [x.double().cpu() for x in inputs], do.double().cpu(),
                                     window=window)
    errs = {n: rel_err(a.cpu(), r) for n, a, r in zip(NAMES, (o, *grads), (o_ref, *grads_ref))}
    print(f"T={T} W={window}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    for n, e in errs.items():
        assert e <= 1e-2, (n, e)


def test_fla_matches_torch_path_at_long_context():
    """At 16k tokens the kernel and the blocked PyTorch form (float32) agree; neither builds T x T."""
    T = 16384
    q, k, v = make_inputs(T, seed=3)
    o = sliding_window_attention(q, k, v, W, backend="fla")
    ref = swa_torch(q.float(), k.float(), v.float(), W)
    assert rel_err(o, ref) <= 1e-2


def test_unsupported_calls_fall_back_or_raise():
    q, k, v = make_inputs(100, seed=4)
    one = q[:, -1:]
    assert torch.equal(sliding_window_attention(one, k, v, W), swa_torch(one, k, v, W))  # TQ < TK: torch
    with pytest.raises(AttnbenchError, match="TQ"):
        sliding_window_attention(one, k, v, W, backend="fla")
    with pytest.raises(AttnbenchError, match="dtypes"):
        sliding_window_attention(q.float(), k.float(), v.float(), W, backend="fla")


# ---------------------------------------------------------------------------------------------------- mixer

C, NH = 256, 4  # head dim 64, as the bake-off's


def mixer_pair(seed=0, window=W, backend="fla"):
    """The mixer on FLA (float32 weights, bf16 autocast) and a float64 copy on the PyTorch backend."""
    torch.manual_seed(seed)
    cls = get("swa")
    args = {"window": window}
    m = cls(GPTConfig(mixer="swa", n_embd=C, n_head=NH, mixer_args=args, backend=backend), 0).cuda()
    ref = cls(GPTConfig(mixer="swa", n_embd=C, n_head=NH, mixer_args=args, backend="torch"), 0).cuda().double()
    ref.load_state_dict(m.state_dict())
    return m, ref


def out_and_dx(fn, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y.to(x.dtype) * dy.to(x.dtype)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_fla_mixer_matches_float64_torch(T):
    m, ref = mixer_pair(T)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(2, T, C, device="cuda", generator=g)
    dy = torch.randn(2, T, C, device="cuda", generator=g)

    def fla_fwd(z):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(z)[0]

    with record_backends() as seen:
        y, dx = out_and_dx(fla_fwd, x, dy)
    y_ref, dx_ref = out_and_dx(lambda z: ref(z)[0], x.double(), dy)
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref)}
    print(f"T={T}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    assert seen["swa"] == "fla" and y.dtype == torch.bfloat16
    for name, e in errs.items():
        assert e <= 1e-2, (name, e)


@pytest.mark.parametrize("split", [1, 40, 200])
def test_gpu_decode_equals_forward_with_wraparound(split):
    """Prefill (FLA when it starts the cache) + decode steps on a ring of W slots made for max_len = W,
    run to 4W tokens (the ring wraps several times) == the FLA forward, bf16 tolerance."""
    T = 4 * W
    m, _ = mixer_pair(split)
    x = torch.randn(2, T, C, device="cuda", generator=torch.Generator(device="cuda").manual_seed(split))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x)[0]
        st = m.init_state(2, W, "cuda", torch.bfloat16)
        outs = [m(x[:, :split], st)[0]] + [m(x[:, t:t + 1], st)[0] for t in range(split, T)]
    err = rel_err(torch.cat(outs, 1), ref)
    print(f"split={split}: decode vs forward rel err {err:.2e}")
    assert st.k.shape[2] == W and st.pos == T and int(st.pos_t) == T and err <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_step_replays_in_a_cuda_graph(dtype):
    """One decode step captured in a CUDA graph and replayed across several wraps of the ring equals
    eager steps on a copy of the state."""
    m, _ = mixer_pair(7, backend="auto")  # float32: the prefill runs the PyTorch op
    m = m.to(dtype)
    x = torch.randn(1, 300, C, device="cuda", dtype=dtype)
    with torch.no_grad():
        st = m.init_state(1, 1000, "cuda", dtype)
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
        for t in range(100, 300):
            buf.copy_(x[:, t:t + 1])
            graph.replay()
            errs.append(rel_err(out, m(x[:, t:t + 1], ref)[0]))
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert int(st.pos_t) == 300 and int(ref.pos_t) == 300
    assert max(errs) < tol, errs
    assert rel_err(st.k, ref.k) < tol and rel_err(st.v, ref.v) < tol


def test_gpt_with_swa_config_trains_a_step_on_fla():
    """attnbench/configs/swa.toml's model runs forward + backward on FLA under autocast."""
    cfg = load_config("swa").model
    cfg.backend, cfg.dropout = "fla", 0.0
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
