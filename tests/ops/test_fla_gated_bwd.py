"""attnbench's PyTorch replacement for FLA's gated chunk_bwd_dqkwg (ops/fla_gated_bwd.py), on the CPU.

The step's contract (module docstring) is checked against autograd of the chunk maths in float64: a
scalar F whose gradients are exactly what FLA's kernel returns. That FLA calls the step with this
contract is checked on the GPU (tests/gpu/test_fla_delta_ops.py: the gated ops' gradients vs the
float64 oracle with the replacement installed).
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from attnbench.ops import fla_gated_bwd
from attnbench.ops.fla_gated_bwd import dqkwg
from helpers import rel_err


def chunk_objective(q, k, v, w, G, h, do, dh, dv, scale, C):
    """sum <do, o> + sum_n <dh_n, h_end_n> - sum <dv, w h>: its gradients in q, k, w, G are dq, dk, dw, dG."""
    B, T, H, K = q.shape
    total = 0.0
    for n in range(-(-T // C)):
        lo, hi = n * C, min(n * C + C, T)
        qn, kn, vn, wn, Gn, don, dvn = (x[:, lo:hi] for x in (q, k, v, w, G, do, dv))
        hn, dhn = h[:, n], dh[:, n]                                      # [B, H, K, V]
        Gi = Gn.transpose(1, 2)                                          # [B, H, c]
        c = hi - lo
        mask = torch.ones(c, c, dtype=torch.bool).tril()
        decay = torch.where(mask, (Gi[..., :, None] - Gi[..., None, :]), float("-inf")).exp()
        scores = torch.einsum("bihk,bjhk->bhij", qn, kn) * decay
        o = scale * (torch.einsum("bihk,bhkv->bihv", qn * Gn.exp()[..., None], hn)
                     + torch.einsum("bhij,bjhv->bihv", scores, vn))
        GL = Gn[:, -1]                                                   # [B, H]
        h_end = GL.exp()[..., None, None] * hn + torch.einsum(
            "bjhk,bjhv->bhkv", kn * (GL[:, None] - Gn).exp()[..., None], vn)
        total = total + (do[:, lo:hi] * o).sum() + (dhn * h_end).sum() \
            - (dvn * torch.einsum("bihk,bhkv->bihv", wn, hn)).sum()
    return total


@pytest.mark.parametrize("T,C", [(64, 64), (200, 64), (7, 16), (33, 16)])
def test_dqkwg_matches_autograd_of_the_chunk_maths(T, C):
    torch.manual_seed(0)
    B, H, K, V = 2, 3, 8, 5
    N = -(-T // C)
    dt = torch.float64
    q, k, w = (torch.randn(B, T, H, K, dtype=dt, requires_grad=True) for _ in range(3))
    v, do, dv = (torch.randn(B, T, H, V, dtype=dt) for _ in range(3))
    # chunk-local cumsum of log-decays, as FLA's chunk_local_cumsum gives it (natural units here)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, dtype=dt) + 2)
    G = torch.cat([c.cumsum(1) for c in g.split(C, dim=1)], 1).requires_grad_()
    h, dh = torch.randn(B, N, H, K, V, dtype=dt), torch.randn(B, N, H, K, V, dtype=dt)
    scale = K ** -0.5
    F = chunk_objective(q, k, v, w, G, h, do, dh, dv, scale, C)
    ref = dict(zip(("dq", "dk", "dw", "dg"), torch.autograd.grad(F, (q, k, w, G))))

    got = dict(zip(("dq", "dk", "dw", "dg"),
                   dqkwg(q.detach(), k.detach(), v, do, h, dh, w.detach(), G.detach() / math.log(2.0), dv,
                         scale, chunk_size=C)))
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    # float64 maths inside; dg is returned in float32 as FLA's is
    assert errs["dq"] < 1e-10 and errs["dk"] < 1e-10 and errs["dw"] < 1e-10 and errs["dg"] < 1e-6, errs
    assert got["dg"].dtype == torch.float32 and got["dg"].shape == (B, T, H)
    assert all(t.is_contiguous() for t in got.values())  # FLA's backward views them (l2norm_bwd)
    assert got["dq"].dtype == torch.float64


def test_dqkwg_under_autocast_keeps_float32_and_input_dtypes():
    torch.manual_seed(0)
    B, T, H, K = 1, 20, 2, 8
    x = {n: torch.randn(B, T, H, K).bfloat16() for n in ("q", "k", "v", "do", "w", "dv")}
    h, dh = torch.randn(B, 2, H, K, K), torch.randn(B, 2, H, K, K)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H)).cumsum(1)
    plain = dqkwg(x["q"], x["k"], x["v"], x["do"], h, dh, x["w"], g, x["dv"], 0.3, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = dqkwg(x["q"], x["k"], x["v"], x["do"], h, dh, x["w"], g, x["dv"], 0.3, chunk_size=16)
    assert [t.dtype for t in auto] == [torch.bfloat16] * 3 + [torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(plain, auto))  # autocast did not lower the inner maths


def _fake_fla(monkeypatch, original):
    mod = types.ModuleType("fla.ops.gated_delta_rule.chunk")
    mod.chunk_bwd_dqkwg = original
    for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule.chunk", mod)
    sys.modules["fla.ops.gated_delta_rule"].chunk = mod
    return mod


def test_install_routes_only_gated_calls_and_is_idempotent(monkeypatch):
    calls = []

    def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
        calls.append("fla")
        return "fla"

    mod = _fake_fla(monkeypatch, chunk_bwd_dqkwg)
    assert fla_gated_bwd.install() and fla_gated_bwd.install()
    patched = mod.chunk_bwd_dqkwg
    assert patched is not chunk_bwd_dqkwg
    B, T, H, K = 1, 8, 1, 4
    t = torch.randn(B, T, H, K)
    h = torch.randn(B, 1, H, K, K)
    g = torch.zeros(B, T, H)
    # ungated (DeltaNet's backward) and varlen calls stay on FLA's kernel
    assert patched(t, t, t, t, h, h, w=t, g=None, dv=t) == "fla"
    assert patched(t, t, t, t, h, h, w=t, g=g, dv=t, cu_seqlens=torch.tensor([0, T])) == "fla"
    out = patched(t, t, t, t, h, h, w=t, g=g, dv=t, scale=0.5, chunk_size=16)
    assert len(out) == 4 and calls == ["fla", "fla"]


def test_install_refuses_an_unknown_signature(monkeypatch, caplog):
    def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, dv=None, scale=None, new_arg=None):
        return "fla"

    mod = _fake_fla(monkeypatch, chunk_bwd_dqkwg)
    assert fla_gated_bwd.install() is False
    assert mod.chunk_bwd_dqkwg is chunk_bwd_dqkwg and "unknown signature" in caplog.text
