"""Delta-family ops on the CPU: chunked WY forms vs the token-by-token oracles (outputs, final
states, gradients), state continuation, decode steps, batch independence, dispatcher errors."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from attnbench.errors import AttnbenchError
from attnbench.ops._l2norm import l2norm
from attnbench.ops.delta_product import (gated_delta_product, gated_delta_product_chunked,
                                         gated_delta_product_recurrent)
from attnbench.ops.delta_rule import delta_rule, delta_rule_chunked, delta_rule_recurrent
from attnbench.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_chunked, gated_delta_rule_recurrent
from helpers import check_recomputes_instead_of_storing, rel_err

B, H, K, V = 2, 2, 16, 12
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def make_inputs(family: str, T: int, dtype=torch.float64, beta_max: float = 1.0, n: int = 2, batch: int = B,
                seed: int = 0) -> dict:
    """Realistic inputs: unit keys, beta in (0, beta_max), g = logsigmoid(.), a random initial state."""
    g = torch.Generator().manual_seed(seed)
    Tk = T * n if family == "gdp" else T
    x = dict(
        q=torch.randn(batch, T, H, K, generator=g, dtype=dtype),
        k=F.normalize(torch.randn(batch, Tk, H, K, generator=g, dtype=dtype), dim=-1),
        v=torch.randn(batch, Tk, H, V, generator=g, dtype=dtype),
        beta=beta_max * torch.rand(batch, Tk, H, generator=g, dtype=dtype),
        initial_state=torch.randn(batch, H, K, V, generator=g, dtype=dtype),
    )
    if family != "dn":
        x["g"] = F.logsigmoid(2 * torch.randn(batch, T, H, generator=g, dtype=dtype) + 2)
    return x


def run(family: str, form: str, x: dict, n: int = 2, chunk_size: int = 64, **kw):
    """Call one family's 'recurrent' / 'chunked' / 'dispatch' form with the dict of inputs."""
    x = dict(x)
    q, k, v, beta, h0 = x.pop("q"), x.pop("k"), x.pop("v"), x.pop("beta"), x.pop("initial_state")
    g = x.pop("g", None)
    common = dict(initial_state=h0, output_final_state=True, **kw)
    if form != "recurrent":
        common["chunk_size"] = chunk_size
    if family == "dn":
        fn = {"recurrent": delta_rule_recurrent, "chunked": delta_rule_chunked, "dispatch": delta_rule}[form]
        return fn(q, k, v, beta, **common)
    if family == "gdn":
        fn = {"recurrent": gated_delta_rule_recurrent, "chunked": gated_delta_rule_chunked,
              "dispatch": gated_delta_rule}[form]
        return fn(q, k, v, g, beta, **common)
    fn = {"recurrent": gated_delta_product_recurrent, "chunked": gated_delta_product_chunked,
          "dispatch": gated_delta_product}[form]
    return fn(q, k, v, g, beta, n, **common)


def grads_of(family, form, x, chunk_size=64, seed=1):
    """Outputs, final state, and gradients of a fixed random projection w.r.t. every input."""
    x = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    o, S = run(family, form, x, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
           (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    names = sorted(x)
    gs = torch.autograd.grad(loss, [x[name] for name in names])
    return o.detach(), S.detach(), dict(zip(names, gs))


CASES = [("dn", 1.0), ("gdn", 1.0), ("gdp", 1.0), ("dn", 2.0), ("gdn", 2.0), ("gdp", 2.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
@pytest.mark.parametrize("family,beta_max", CASES, ids=[f"{f}-beta{b:g}" for f, b in CASES])
def test_chunked_matches_recurrent(family, beta_max, T, dtype):
    x = make_inputs(family, T, dtype, beta_max=beta_max)
    o_ref, S_ref, g_ref = grads_of(family, "recurrent", x)
    for cs in (16, 64):
        o, S, gr = grads_of(family, "chunked", x, chunk_size=cs)
        assert o.dtype == dtype and S.dtype == dtype
        assert rel_err(o, o_ref) < TOL[dtype], (cs, rel_err(o, o_ref))
        assert rel_err(S, S_ref) < TOL[dtype], (cs, rel_err(S, S_ref))
        for name in g_ref:
            assert rel_err(gr[name], g_ref[name]) < TOL[dtype], (cs, name, rel_err(gr[name], g_ref[name]))


@pytest.mark.parametrize("family", ["dn", "gdn", "gdp"])
def test_state_continuation(family):
    T, t1, n = 100, 37, 2
    x = make_inputs(family, T)
    kt = n if family == "gdp" else 1  # k, v, beta have T*n rows for the product

    def part(lo, hi, h0):
        p = {}
        for name, t in x.items():
            if name == "initial_state":
                p[name] = h0
            elif name in ("k", "v", "beta"):
                p[name] = t[:, lo * kt:hi * kt]
            else:
                p[name] = t[:, lo:hi]
        return p

    for form in ("recurrent", "chunked"):
        o_full, S_full = run(family, form, x, chunk_size=16)
        o_a, S_a = run(family, form, part(0, t1, x["initial_state"]), chunk_size=16)
        o_b, S_b = run(family, form, part(t1, T, S_a), chunk_size=16)
        assert rel_err(torch.cat([o_a, o_b], 1), o_full) < 1e-10
        assert rel_err(S_b, S_full) < 1e-10

    # dispatcher: a prefill, then T == 1 decode steps, equals one full forward at every position
    o_full, S_full = run(family, "dispatch", x, backend="torch")
    o_pre, S = run(family, "dispatch", part(0, 5, x["initial_state"]), backend="torch")
    outs = [o_pre]
    for t in range(5, T):
        o_t, S = run(family, "dispatch", part(t, t + 1, S), backend="torch")
        outs.append(o_t)
    o_steps = torch.cat(outs, 1)
    per_pos = [rel_err(o_steps[:, t], o_full[:, t]) for t in range(T)]
    assert max(per_pos) < 1e-10
    assert rel_err(S, S_full) < 1e-10


@pytest.mark.parametrize("family", ["dn", "gdn", "gdp"])
@pytest.mark.parametrize("form", ["dispatch", "recurrent"])
def test_batch_independence(family, form):
    x = make_inputs(family, 70, batch=3)
    o0, S0 = run(family, form, x, chunk_size=32) if form != "recurrent" else run(family, form, x)
    j = 1
    y = {name: t.clone() for name, t in x.items()}
    for t in y.values():
        t[j] = t[j] * 0.5 + 0.1  # perturb every input of sequence j only
    o1, S1 = run(family, form, y, chunk_size=32) if form != "recurrent" else run(family, form, y)
    others = [b for b in range(3) if b != j]
    assert torch.equal(o1[others], o0[others]) and torch.equal(S1[others], S0[others])
    assert rel_err(o1[j], o0[j]) > 1e-2


def test_dispatcher_l2norm_scale_and_dtypes():
    x = make_inputs("gdn", 40, dtype=torch.float64)
    x["q"], x["k"] = 3 * x["q"], 2.5 * x["k"]  # unnormalised: the dispatcher normalises
    o, S = run("gdn", "dispatch", x, backend="torch")
    y = dict(x, q=l2norm(x["q"]), k=l2norm(x["k"]))
    o_ref, S_ref = run("gdn", "recurrent", y)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    # explicit scale and no normalisation
    o2, _ = run("gdn", "dispatch", x, backend="torch", qk_l2norm=False, scale=0.3)
    o2_ref, _ = run("gdn", "recurrent", x, scale=0.3)
    assert rel_err(o2, o2_ref) < 1e-10
    # 16-bit inputs: output in q's dtype, state in float32 (computed in float32)
    for dt in (torch.bfloat16, torch.float16):
        for fam in ("dn", "gdn", "gdp"):
            xh = {name: t.to(dt) for name, t in make_inputs(fam, 20).items()}
            for T1 in (20, 1):
                xs = xh if T1 == 20 else {n_: (t if n_ == "initial_state" else
                                               t[:, : (2 if fam == "gdp" and n_ in ("k", "v", "beta") else 1)])
                                          for n_, t in xh.items()}
                o, S = run(fam, "dispatch", xs, backend="torch")
                assert o.dtype == dt and S.dtype == torch.float32
                xf = {n_: t.float() for n_, t in xs.items()}
                o_ref, _ = run(fam, "recurrent", xf | {"q": l2norm(xf["q"]), "k": l2norm(xf["k"])})
                assert rel_err(o, o_ref) < 2e-2


def test_delta_product_special_cases():
    T = 33
    # n = 1 is the gated delta rule; with g = None it is the plain delta rule
    x = make_inputs("gdn", T)
    o_p, S_p = run("gdp", "chunked", x, n=1, chunk_size=16)
    o_g, S_g = run("gdn", "chunked", x, chunk_size=16)
    assert rel_err(o_p, o_g) < 1e-12 and rel_err(S_p, S_g) < 1e-12
    o_p, S_p = run("gdp", "dispatch", x, n=1, backend="torch")
    o_g, S_g = run("gdn", "dispatch", x, backend="torch")
    assert rel_err(o_p, o_g) < 1e-12 and rel_err(S_p, S_g) < 1e-12
    x_ng = dict(x, g=None)
    o_p, S_p = run("gdp", "dispatch", x_ng, n=1, backend="torch")
    o_d, S_d = run("dn", "dispatch", {n_: t for n_, t in x.items() if n_ != "g"}, backend="torch")
    assert rel_err(o_p, o_d) < 1e-12 and rel_err(S_p, S_d) < 1e-12
    # g = None is the ungated product, i.e. g = 0, in every form
    x = make_inputs("gdp", T, n=3)
    for form in ("recurrent", "chunked", "dispatch"):
        o_n, S_n = run("gdp", form, dict(x, g=None), n=3, **({"backend": "torch"} if form == "dispatch" else {}))
        o_z, S_z = run("gdp", form, dict(x, g=torch.zeros_like(x["g"])), n=3,
                       **({"backend": "torch"} if form == "dispatch" else {}))
        assert rel_err(o_n, o_z) < 1e-12 and rel_err(S_n, S_z) < 1e-12
    # the product really differs from a single delta step per token (n = 3 keys are used)
    o3, _ = run("gdp", "recurrent", x, n=3)
    o_chunk, _ = run("gdp", "chunked", x, n=3, chunk_size=16)
    assert rel_err(o_chunk, o3) < 1e-10


def test_dispatcher_backend_errors():
    for fam in ("dn", "gdn", "gdp"):
        x = make_inputs(fam, 8, dtype=torch.float32)
        with pytest.raises(AttnbenchError, match="fla"):
            run(fam, "dispatch", x, backend="fla")
        xb = {n_: t.to(torch.bfloat16) for n_, t in x.items()}
        with pytest.raises(AttnbenchError, match="CUDA"):
            run(fam, "dispatch", xb, backend="fla")
        with pytest.raises(AttnbenchError, match="bogus"):
            run(fam, "dispatch", x, backend="bogus")
        o, _ = run(fam, "dispatch", x, backend="auto")  # auto on CPU: PyTorch, no error
        assert torch.isfinite(o).all()


def test_shape_errors():
    x = make_inputs("gdn", 8)
    with pytest.raises(AttnbenchError, match="beta"):
        run("gdn", "dispatch", dict(x, beta=x["beta"][:, :4]))
    with pytest.raises(AttnbenchError, match="initial_state"):
        run("gdn", "chunked", dict(x, initial_state=x["initial_state"][:, :, :3]))
    xp = make_inputs("gdp", 8, n=2)
    with pytest.raises(AttnbenchError, match="T\\*n"):
        run("gdp", "dispatch", xp, n=3)


def test_record_backends_reports_the_backend_that_ran():
    from attnbench.ops.backend import record_backends

    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    v, beta = torch.randn(1, 5, 2, 8), torch.rand(1, 5, 2)
    with record_backends() as seen:
        delta_rule(q, k, v, beta)
    assert seen == {"delta_rule": "torch"}
    with record_backends() as outer:
        delta_rule(q, k, v, beta)
    assert outer and seen == {"delta_rule": "torch"}  # a finished recorder no longer changes


@pytest.mark.parametrize("family", ["dn", "gdn", "gdp"])
def test_long_context_recomputes_instead_of_storing(family, monkeypatch):
    """The delta families' PyTorch path checkpoints its chunk matrices from RECOMPUTE_FROM tokens."""
    from attnbench.ops import delta_rule as dr

    x = make_inputs(family, 160, torch.float32)
    check_recomputes_instead_of_storing(monkeypatch, dr, lambda: grads_of(family, "dispatch", x))


def test_gated_backward_check_probes_tilelang_once(monkeypatch, caplog):
    """Where FLA would refuse the gated backward but TileLang is installed, one small probe decides: a
    failing probe means the next route (here none: the PyTorch op, logged), a passing one TileLang; the
    answer is kept; a compile trace that comes before any eager decision answers 'torch' without probing."""
    from attnbench.ops import backend as be

    calls = []
    monkeypatch.setattr(be, "_gated_backward_static_check", lambda: "tilelang")
    monkeypatch.setattr(be, "fla_available", lambda: False)
    for fails, expected in ((True, "torch"), (False, "tilelang")):
        monkeypatch.setattr(be, "_GATED_ROUTE", None)
        caplog.clear()

        def probe(fails=fails):
            calls.append(torch.is_grad_enabled())
            if fails:
                raise RuntimeError("tilelang: no kernel for this shape")

        monkeypatch.setattr(be, "_probe_gated_backward", probe)
        with torch.no_grad(), caplog.at_level("WARNING", logger="attnbench.ops"):
            assert be.gated_backward_route() == expected
            assert be.hopper_gated_backward_broken() is (expected == "torch")  # kept, not probed again
        assert ("did not take the gated chunk backward" in caplog.text) == fails
    assert calls == [True, True]  # probed once per decision, with autograd on even under no_grad
    monkeypatch.setattr(be, "_GATED_ROUTE", None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert be.hopper_gated_backward_broken() is True and be._GATED_ROUTE is None


@pytest.mark.parametrize("installs", [True, False])
def test_gated_backward_route_replaces_the_refused_step(monkeypatch, caplog, installs):
    """Hopper with an affected Triton and no TileLang: FLA's gated backward runs with attnbench's PyTorch
    dqkwg step when the replacement installs (the route and the recorded backend label say so), else the
    gated ops fall back to the PyTorch op."""
    from attnbench.ops import backend as be
    from attnbench.ops import fla_gated_bwd

    monkeypatch.setattr(be, "_gated_backward_static_check", lambda: "broken")
    monkeypatch.setattr(be, "fla_available", lambda: True)
    monkeypatch.setattr(be, "_GATED_ROUTE", None)
    monkeypatch.setattr(fla_gated_bwd, "install", lambda: installs)
    with caplog.at_level("WARNING", logger="attnbench.ops"):
        route = be.gated_backward_route()
    assert route == (be.TORCH_DQKWG if installs else "torch")
    assert be.hopper_gated_backward_broken() is (not installs)
    assert ("computes that step in PyTorch" in caplog.text) == installs
    cuda_like = types.SimpleNamespace(is_cuda=True)
    with be.record_backends() as seen:
        assert be.resolve("auto", cuda_like, "gated_delta_rule", fla_label=be.TORCH_DQKWG) == "fla"
        assert be.resolve("auto", cuda_like, "gated_delta_rule") == "fla"  # a forward-only call
        be.resolve("torch", cuda_like, "delta_rule")
    assert seen == {"gated_delta_rule": "fla+torch-dqkwg", "delta_rule": "torch"}


@pytest.mark.parametrize("gated", [True, False], ids=["gdp", "dp"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_deltaproduct_decode_through_a_gated_delta_rule_kernel(gated, n, monkeypatch):
    """The FLA decode path of Gated DeltaProduct (delta_product._fla_decode) feeds FLA's gated delta rule
    recurrence the token's n interleaved entries. With that kernel replaced by the float64 gated-delta-rule
    oracle (same argument contract: g and beta by keyword, l2-norm in the kernel), one step equals the
    DeltaProduct oracle: outputs and the carried state."""
    import sys

    from attnbench.ops import delta_product as dp

    def fake_fused_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        return gated_delta_rule_recurrent(q, k, v, g.to(q.dtype), beta, scale, initial_state, output_final_state)

    fake = types.ModuleType("fla.ops.gated_delta_rule")
    fake.fused_recurrent_gated_delta_rule = fake_fused_recurrent
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)

    x = make_inputs("gdp", 1, n=n)
    x["q"] = x["q"] * 3  # not unit: the kernel normalises
    if not gated:
        x.pop("g")
    g = x.get("g")
    o, S = dp._fla_decode(x["q"], x["k"], x["v"], g, x["beta"], n, K ** -0.5, x["initial_state"], True, True)
    ref_o, ref_S = gated_delta_product_recurrent(l2norm(x["q"]), l2norm(x["k"]), x["v"], g, x["beta"], n,
                                                 initial_state=x["initial_state"], output_final_state=True)
    assert o.shape == ref_o.shape == (B, 1, H, V)
    # 1e-6: FLA takes the log-decay in float32 (rounded from float64 here); a wrong interleave is O(1)
    assert rel_err(o, ref_o) < 1e-6 and rel_err(S, ref_S) < 1e-6


def test_chunked_backward_allocates_linearly_in_the_number_of_chunks():
    """The backward of the chunk recurrence allocates O(T): with 8x the chunks, about 8x the bytes. (Indexing
    the stacked chunk tensors inside the loop would make each chunk's backward write a full-size gradient,
    quadratic in T: about 31x here, and the PyTorch op's long-context training throughput collapses.)"""
    from torch.profiler import ProfilerActivity, profile

    from attnbench.ops import delta_rule as dr

    def backward_bytes(T):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, 2, 16, generator=g, requires_grad=True) for _ in range(3))
        gate = F.logsigmoid(torch.randn(1, T, 2, generator=g)).requires_grad_()
        beta = torch.rand(1, T, 2, generator=g, requires_grad=True)
        o, _ = dr.chunked_core(q, k, v, beta, gate, 0.25, None, False, 16)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            o.sum().backward()
        return sum(max(0, e.cpu_memory_usage) for e in p.events())

    ratio = backward_bytes(16 * 64) / backward_bytes(16 * 8)
    assert ratio < 12, ratio
