"""FLA's Triton kernels for the delta family vs the float64 token-by-token oracles, on a CUDA GPU.

bf16 inputs, relative RMS error <= 1e-2 for outputs, final states and gradients. On Hopper with a
Triton whose gated backward FLA refuses, the gated backward runs with attnbench's PyTorch version of the
refused step (ops/fla_gated_bwd.py), so the gated gradient tests check that replacement inside FLA's
backward; where even that is unavailable they skip and the fallback to the PyTorch op is tested.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench.errors import AttnbenchError
from attnbench.ops._l2norm import l2norm
from attnbench.ops.backend import fla_available, hopper_gated_backward_broken
from attnbench.ops.delta_product import gated_delta_product, gated_delta_product_recurrent
from attnbench.ops.delta_rule import delta_rule, delta_rule_recurrent
from attnbench.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_recurrent
from attnbench.ops.short_conv import causal_conv1d
from helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fla_available(), reason="needs the fla package (pip install 'attnbench[cuda]')"),
]

B, H, K, V, N_HH = 2, 4, 64, 64, 2
TOL = 1e-2
FAMILIES = ["dn", "gdn", "gdp", "dp"]  # dp: the product with g=None
GATED = {"gdn", "gdp"}
HOPPER_SKIP = "FLA's gated chunk backward is refused on Hopper with triton < 3.7.1 (FLA #640)"


def make(family: str, T: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    Tk = T * N_HH if family in ("gdp", "dp") else T

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    x = dict(q=rnd(B, T, H, K).bfloat16(), k=rnd(B, Tk, H, K).bfloat16(), v=rnd(B, Tk, H, V).bfloat16(),
             beta=rnd(B, Tk, H).sigmoid().bfloat16(), initial_state=rnd(B, H, K, V))
    if family in GATED:
        x["g"] = F.logsigmoid(rnd(B, T, H) + 1.0)
    return x


def call(family: str, x: dict, oracle: bool = False, **kw):
    """The dispatcher (q/k normalised inside), or with oracle=True the float64 recurrence on normalised q/k."""
    q, k, v, beta, h0, g = x["q"], x["k"], x["v"], x["beta"], x["initial_state"], x.get("g")
    if oracle:
        q, k = l2norm(q), l2norm(k)
        if family == "dn":
            return delta_rule_recurrent(q, k, v, beta, initial_state=h0, output_final_state=True)
        if family == "gdn":
            return gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return gated_delta_product_recurrent(q, k, v, g, beta, N_HH, initial_state=h0, output_final_state=True)
    kw.setdefault("output_final_state", True)
    if family == "dn":
        return delta_rule(q, k, v, beta, initial_state=h0, **kw)
    if family == "gdn":
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)
    return gated_delta_product(q, k, v, g, beta, N_HH, initial_state=h0, **kw)


def forward_backward(family: str, x: dict, oracle: bool, **kw):
    leaves = {n: (t.double() if oracle else t).detach().clone().requires_grad_() for n, t in x.items()}
    o, S = call(family, leaves, oracle=oracle, **kw)
    gen = torch.Generator(device="cuda").manual_seed(123)
    do = torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, device="cuda", generator=gen, dtype=torch.float64)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, grads))


def assert_matches(got, ref, where: str) -> None:
    (o, S, g), (o_ref, S_ref, g_ref) = got, ref
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    errs |= {f"d{n}": rel_err(g[n], g_ref[n]) for n in g_ref}
    print(f"{where}: " + ", ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"{where}: relative RMS errors above {TOL}: {bad}"


@pytest.mark.parametrize("T", [63, 256, 1000])
@pytest.mark.parametrize("family", FAMILIES)
def test_fla_forward_backward_vs_oracle(family, T):
    if family in GATED and hopper_gated_backward_broken():
        pytest.skip(HOPPER_SKIP + "; test_auto_falls_back_on_hopper covers this machine")
    x = make(family, T)
    got = forward_backward(family, x, oracle=False, backend="fla")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_matches(got, forward_backward(family, x, oracle=True), f"{family} T={T}")


@pytest.mark.parametrize("T", [63, 1000])
@pytest.mark.parametrize("family", ["gdn", "gdp"])
def test_fla_gated_forward_only(family, T):
    """Forward-only FLA calls run everywhere, Hopper with an old Triton included."""
    x = make(family, T)
    with torch.no_grad():
        o, S = call(family, x, backend="fla")
        o_ref, S_ref = call(family, {n: t.double() for n, t in x.items()}, oracle=True)
    print(f"{family} T={T} forward: o={rel_err(o, o_ref):.2e} S={rel_err(S, S_ref):.2e}")
    assert rel_err(o, o_ref) <= TOL and rel_err(S, S_ref) <= TOL


@pytest.mark.parametrize("family", ["gdn", "gdp"])
def test_auto_falls_back_on_hopper(family):
    if not hopper_gated_backward_broken():
        pytest.skip("a route runs the gated backward here (FLA's, TileLang or attnbench's dqkwg step; "
                    "test_gated_backward_route_on_this_machine says which): nothing to fall back from")
    x = make(family, 256)
    with pytest.raises(AttnbenchError, match="Hopper"):
        forward_backward(family, x, oracle=False, backend="fla")
    # 'auto' must take the PyTorch path (FLA's backward would raise) and give correct gradients
    got = forward_backward(family, x, oracle=False, backend="auto")
    assert_matches(got, forward_backward(family, x, oracle=True), f"{family} auto-fallback")


def test_gated_backward_route_on_this_machine():
    """Say which route the gated gradient tests above ran on; where FLA refuses its own step and TileLang is
    absent it is attnbench's replacement, and a gated call records that in its backend label."""
    from attnbench.ops import backend as be

    route = be.gated_backward_route()
    print("gated backward route:", route)
    if be._gated_backward_static_check() == "broken":
        assert route == be.TORCH_DQKWG
    if route == "torch":
        pytest.skip("no route runs FLA's gated backward here")
    with be.record_backends() as seen:
        forward_backward("gdn", make("gdn", 64), oracle=False, backend="fla")
    assert seen["gated_delta_rule"] == (be.TORCH_DQKWG if route == be.TORCH_DQKWG else "fla")


@pytest.mark.parametrize("family", FAMILIES)
def test_fla_decode_continues_forward(family):
    """Prefill with FLA, then T == 1 steps through the dispatcher, equals one FLA forward."""
    T, T0 = 48, 31
    x = make(family, T)
    kt = N_HH if family in ("gdp", "dp") else 1

    def part(lo, hi, h0):
        return {n: (h0 if n == "initial_state" else t[:, lo * kt:hi * kt] if n in ("k", "v", "beta")
                    else t[:, lo:hi]) for n, t in x.items()}

    with torch.no_grad():
        o_full, S_full = call(family, x, backend="fla")
        o_pre, S = call(family, part(0, T0, x["initial_state"]), backend="fla")
        outs = [o_pre]
        for t in range(T0, T):
            o_t, S = call(family, part(t, t + 1, S), backend="fla")
            assert o_t.dtype == torch.bfloat16 and S.dtype == torch.float32
            outs.append(o_t)
    o_steps = torch.cat(outs, 1)
    worst = max(rel_err(o_steps[:, t], o_full[:, t]) for t in range(T))
    print(f"{family} decode: worst per-position o={worst:.2e} S={rel_err(S, S_full):.2e}")
    assert worst <= TOL and rel_err(S, S_full) <= TOL


# ---------------------------------------------------------------------------------------------------
# short convolution
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("T", [1, 63, 256])
def test_fla_short_conv_vs_torch(T, dtype):
    torch.manual_seed(T)
    D, W = 192, 4
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    leaves = dict(x=torch.randn(B, T, D, device="cuda", dtype=dtype), weight=torch.randn(D, W, device="cuda"),
                  bias=torch.randn(D, device="cuda"), state=torch.randn(B, D, W - 1, device="cuda", dtype=dtype))
    dy = torch.randn(B, T, D, device="cuda")
    ds = torch.randn(B, D, W - 1, device="cuda")
    res = {}
    for backend in ("fla", "torch"):
        lv = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        y, s = causal_conv1d(lv["x"], lv["weight"], lv["bias"], state=lv["state"], output_final_state=True,
                             backend=backend)
        assert y.dtype == dtype and s.shape == (B, D, W - 1)
        loss = (y.float() * dy).sum() + (s.float() * ds).sum()
        res[backend] = (y, s, dict(zip(lv, torch.autograd.grad(loss, list(lv.values())))))
    (y, s, g), (y_ref, s_ref, g_ref) = res["fla"], res["torch"]
    errs = {"y": rel_err(y, y_ref), "state": rel_err(s, s_ref)} | {f"d{n}": rel_err(g[n], g_ref[n]) for n in g}
    print(f"conv T={T} {dtype}: " + ", ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    assert all(e <= tol for e in errs.values()), errs


def test_fla_short_conv_decode():
    torch.manual_seed(0)
    D, W, T, T0 = 96, 4, 20, 2
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(D, W, device="cuda"), torch.randn(D, device="cuda")
    with torch.no_grad():
        y_full, s_full = causal_conv1d(x, w, b, output_final_state=True, backend="fla")
        y, s = causal_conv1d(x[:, :T0], w, b, output_final_state=True, backend="fla")
        outs = [y]
        for t in range(T0, T):
            y, s = causal_conv1d(x[:, t:t + 1], w, b, state=s, output_final_state=True, backend="fla")
            outs.append(y)
    assert rel_err(torch.cat(outs, 1), y_full) <= 1e-2
    assert torch.equal(s, s_full)


def test_torch_short_conv_decode_step_is_cuda_graph_capturable():
    torch.manual_seed(0)
    D, W = 64, 4
    w, b = torch.randn(D, W, device="cuda"), torch.randn(D, device="cuda")
    x_in = torch.randn(B, 1, D, device="cuda")
    s_in = torch.randn(B, D, W - 1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():  # warm up off the capture
        causal_conv1d(x_in, w, b, state=s_in, output_final_state=True, backend="torch")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y_out, s_out = causal_conv1d(x_in, w, b, state=s_in, output_final_state=True, backend="torch")
    for _ in range(3):
        x_new, s_new = torch.randn_like(x_in), torch.randn_like(s_in)
        x_in.copy_(x_new)
        s_in.copy_(s_new)
        graph.replay()
        y_ref, s_ref = causal_conv1d(x_new, w, b, state=s_new, output_final_state=True, backend="torch")
        torch.testing.assert_close(y_out, y_ref)
        torch.testing.assert_close(s_out, s_ref)
