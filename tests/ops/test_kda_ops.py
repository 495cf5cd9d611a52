"""KDA ops on the CPU (attnbench/ops/kda.py): the token loop against the recurrence written with explicit
matrices, the chunked WY form against the token loop (outputs, final states, gradients; chunk sizes that
do and do not divide T), the scalar-gate special case, strong decays in float32, state continuation,
decode steps, batch independence, the dispatcher's errors, and the argument contract of its FLA calls."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnbench.errors import AttnbenchError
from attnbench.ops import kda as kda_ops
from attnbench.ops._l2norm import l2norm
from attnbench.ops.backend import record_backends
from attnbench.ops.gated_delta_rule import gated_delta_rule_chunked
from attnbench.ops.kda import kda, kda_chunked, kda_recurrent
from helpers import check_recomputes_instead_of_storing, check_state_continuation_and_decode, rel_err

B, H, K, V = 2, 2, 16, 12
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def make_inputs(T: int, dtype=torch.float64, beta_max: float = 1.0, batch: int = B, seed: int = 0,
                decay: float = 2.0) -> dict:
    """Unit keys, beta in (0, beta_max), g = logsigmoid(.) per key channel, a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(batch, T, H, K, generator=gen, dtype=dtype),
        k=F.normalize(torch.randn(batch, T, H, K, generator=gen, dtype=dtype), dim=-1),
        v=torch.randn(batch, T, H, V, generator=gen, dtype=dtype),
        g=F.logsigmoid(decay * torch.randn(batch, T, H, K, generator=gen, dtype=dtype) + 1.5),
        beta=beta_max * torch.rand(batch, T, H, generator=gen, dtype=dtype),
        initial_state=torch.randn(batch, H, K, V, generator=gen, dtype=dtype),
    )


def run(form: str, x: dict, chunk_size: int = 64, **kw):
    fn = {"recurrent": kda_recurrent, "chunked": kda_chunked, "dispatch": kda}[form]
    if form != "recurrent":
        kw["chunk_size"] = chunk_size
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
              **kw)


def grads_of(form: str, x: dict, chunk_size: int = 64, seed: int = 1):
    """Output, final state and the gradients of a fixed random projection of both w.r.t. every input."""
    x = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, S = run(form, x, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)  # drawn in float64: the same projection for every dtype
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() + \
           (S * torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)).sum()
    names = sorted(x)
    return o.detach(), S.detach(), dict(zip(names, torch.autograd.grad(loss, [x[n] for n in names])))


def explicit_matrices(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(K),
    with each matrix formed explicitly, one sequence and head at a time."""
    Bx, T = x["q"].shape[:2]
    o = torch.zeros(Bx, T, H, V, dtype=torch.float64)
    S_end = torch.zeros(Bx, H, K, V, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(Bx):
        for h in range(H):
            S = x["initial_state"][b, h].clone()
            for t in range(T):
                k, v, beta = x["k"][b, t, h], x["v"][b, t, h], x["beta"][b, t, h]
                S = (eye - beta * torch.outer(k, k)) @ torch.diag(x["g"][b, t, h].exp()) @ S + beta * torch.outer(k, v)
                o[b, t, h] = S.T @ x["q"][b, t, h] * K ** -0.5
            S_end[b, h] = S
    return o, S_end


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_recurrence_is_the_stated_one(beta_max):
    x = make_inputs(9, beta_max=beta_max)
    o, S = run("recurrent", x)
    o_ref, S_ref = explicit_matrices(x)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(S, S_ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 200])
@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_chunked_matches_recurrent(beta_max, T, dtype):
    x = make_inputs(T, dtype, beta_max=beta_max)
    o_ref, S_ref, g_ref = grads_of("recurrent", x)
    for cs in (16, 24, 32, 64):  # 24: a chunk that is not a whole number of 16-row sub-blocks
        o, S, gr = grads_of("chunked", x, chunk_size=cs)
        assert o.dtype == dtype and S.dtype == dtype
        assert rel_err(o, o_ref) < TOL[dtype], (cs, rel_err(o, o_ref))
        assert rel_err(S, S_ref) < TOL[dtype], (cs, rel_err(S, S_ref))
        for name in g_ref:
            assert rel_err(gr[name], g_ref[name]) < TOL[dtype], (cs, name, rel_err(gr[name], g_ref[name]))


def test_a_decay_shared_by_the_channels_is_the_gated_delta_rule():
    x = make_inputs(70)
    g_head = x["g"][..., 0]
    xs = dict(x, g=g_head[..., None].expand(-1, -1, -1, K))
    o, S = run("chunked", xs, chunk_size=32)
    o_g, S_g = gated_delta_rule_chunked(x["q"], x["k"], x["v"], g_head, x["beta"], initial_state=x["initial_state"],
                                        output_final_state=True, chunk_size=32)
    assert rel_err(o, o_g) < 1e-12 and rel_err(S, S_g) < 1e-12


def test_strong_decays_stay_finite_in_float32():
    """Decays as the gate can make them (A up to 16, softplus large): a chunk's cumulative log-decay reaches
    -1000 and beyond, so e^{-gamma} alone would overflow; the sub-block products never form it."""
    x = make_inputs(256, torch.float32, decay=6.0)
    x["g"] = -16 * F.softplus(3 * torch.randn(B, 256, H, K, generator=torch.Generator().manual_seed(5)))
    assert x["g"][:, :64].sum(1).min() < -1000
    o_ref, S_ref, g_ref = grads_of("recurrent", {n: t.double() for n, t in x.items()})
    o, S, gr = grads_of("chunked", x)
    assert torch.isfinite(o).all() and all(torch.isfinite(t).all() for t in gr.values())
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4
    for name in g_ref:
        assert rel_err(gr[name], g_ref[name]) < 1e-3, name


def test_state_continuation_and_decode():
    check_state_continuation_and_decode(run, make_inputs(100))


@pytest.mark.parametrize("form", ["dispatch", "recurrent"])
def test_batch_independence(form):
    x = make_inputs(70, batch=3)
    o0, S0 = run(form, x, chunk_size=32)
    j = 1
    y = {n: t.clone() for n, t in x.items()}
    for t in y.values():
        t[j] = t[j] * 0.5 + 0.1  # perturb every input of sequence j only (g stays < 0)
    y["g"][j] = -y["g"][j].abs()
    o1, S1 = run(form, y, chunk_size=32)
    others = [b for b in range(3) if b != j]
    assert torch.equal(o1[others], o0[others]) and torch.equal(S1[others], S0[others])
    assert rel_err(o1[j], o0[j]) > 1e-2


def test_causality_of_the_chunked_form():
    x = make_inputs(50)
    o0, _ = run("chunked", x, chunk_size=16)
    y = {n: t.clone() for n, t in x.items()}
    for n in ("q", "k", "v", "beta"):
        y[n][:, 30:] = y[n][:, 30:] * 2 + 0.3
    y["g"][:, 30:] = y["g"][:, 30:] * 2
    o1, _ = run("chunked", y, chunk_size=16)
    assert torch.equal(o0[:, :30], o1[:, :30]) and rel_err(o1[:, 30:], o0[:, 30:]) > 1e-2


def test_dispatcher_l2norm_scale_and_dtypes():
    x = make_inputs(40)
    x["q"], x["k"] = 3 * x["q"], 2.5 * x["k"]  # unnormalised: the dispatcher normalises
    o, S = run("dispatch", x, backend="torch")
    o_ref, S_ref = run("recurrent", dict(x, q=l2norm(x["q"]), k=l2norm(x["k"])))
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    o2, _ = run("dispatch", x, backend="torch", qk_l2norm=False, scale=0.3)
    o2_ref, _ = run("recurrent", x, scale=0.3)
    assert rel_err(o2, o2_ref) < 1e-10
    # 16-bit inputs: output in q's dtype, state in float32 (computed in float32)
    for dt in (torch.bfloat16, torch.float16):
        xh = {n: t.to(dt) for n, t in make_inputs(20).items()}
        for T1 in (20, 1):
            xs = {n: (t if n == "initial_state" else t[:, :T1]) for n, t in xh.items()}
            o, S = run("dispatch", xs, backend="torch")
            assert o.dtype == dt and S.dtype == torch.float32
            xf = {n: t.float() for n, t in xs.items()}
            o_ref, _ = run("recurrent", xf | {"q": l2norm(xf["q"]), "k": l2norm(xf["k"])})
            assert rel_err(o, o_ref) < 2e-2


def test_dispatcher_backend_and_shape_errors():
    x = make_inputs(8, dtype=torch.float32)
    with pytest.raises(AttnbenchError, match="kda: backend='fla'.*float32"):
        run("dispatch", x, backend="fla")
    xb = {n: t.to(torch.bfloat16) for n, t in x.items()}
    with pytest.raises(AttnbenchError, match="CUDA"):
        run("dispatch", xb, backend="fla")
    with pytest.raises(AttnbenchError, match="chunk_size=16"):
        run("dispatch", xb, backend="fla", chunk_size=16)
    with pytest.raises(AttnbenchError, match="bogus"):
        run("dispatch", x, backend="bogus")
    assert torch.isfinite(run("dispatch", x, backend="auto")[0]).all()  # auto on the CPU: PyTorch
    with pytest.raises(AttnbenchError, match=r"g must be \[B, T, H, K\]"):
        run("dispatch", dict(x, g=x["g"][..., 0]))
    with pytest.raises(AttnbenchError, match="beta"):
        run("chunked", dict(x, beta=x["beta"][:, :4]))
    with pytest.raises(AttnbenchError, match="initial_state"):
        run("recurrent", dict(x, initial_state=x["initial_state"][:, :, :3]))


def test_record_backends_names_the_op():
    x = make_inputs(5, torch.float32)
    with record_backends() as seen:
        run("dispatch", x)
    assert seen == {"kda": "torch"}


def test_long_context_recomputes_instead_of_storing(monkeypatch):
    x = make_inputs(160, torch.float32)
    check_recomputes_instead_of_storing(monkeypatch, kda_ops, lambda: grads_of("dispatch", x))


def fake_fla(calls: list) -> types.ModuleType:
    """fla.ops.kda with FLA 0.6.0's signatures, computing with the float64 oracle and checking what
    attnbench hands FLA: the gate already applied, beta post-sigmoid, a float32 initial state."""
    def check(g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel):
        assert g.dtype == torch.float32 and (g <= 0).all()
        assert not use_gate_in_kernel and not use_beta_sigmoid_in_kernel
        assert initial_state is None or initial_state.dtype == torch.float32

    def oracle(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        if use_qk_l2norm_in_kernel:
            q, k = l2norm(q), l2norm(k)
        return kda_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)

    def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                  allow_neg_eigval=False, safe_gate=False, lower_bound=None, disable_recompute=False,
                  return_intermediate_states=False, state_v_first=False, cu_seqlens=None, **kwargs):
        chunk_size = kwargs.pop("chunk_size", 64)
        assert chunk_size in (32, 64) and not kwargs and not state_v_first
        check(g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel)
        calls.append("chunk_kda")
        return oracle(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel)

    def fused_recurrent_kda(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, initial_state=None,
                            output_final_state=False, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                            use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, lower_bound=None,
                            state_v_first=False, cu_seqlens=None, **kwargs):
        assert not kwargs and not state_v_first
        check(g, beta, initial_state, use_gate_in_kernel, use_beta_sigmoid_in_kernel)
        calls.append("fused_recurrent_kda")
        return oracle(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel)

    mod = types.ModuleType("fla.ops.kda")
    mod.chunk_kda, mod.fused_recurrent_kda = chunk_kda, fused_recurrent_kda
    return mod


def test_fla_calls_follow_fla_0_6_0_signatures(monkeypatch):
    """The FLA branch of the dispatcher (taken here by forcing the backend choice) calls chunk_kda for a
    prefill and fused_recurrent_kda for a forward-only decode step, with arguments FLA reads as intended."""
    calls: list[str] = []
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.kda", fake_fla(calls))
    x = make_inputs(30, torch.float32)
    x["q"] = 3 * x["q"]
    o_ref, S_ref = run("dispatch", x, backend="torch")
    monkeypatch.setattr(kda_ops, "resolve", lambda *a, **k: "fla")
    o_pre, S = run("dispatch", {n: (t if n == "initial_state" else t[:, :29]) for n, t in x.items()}, chunk_size=32)
    assert calls == ["chunk_kda"] and S.dtype == torch.float32
    with torch.no_grad():
        o_last, S = run("dispatch", {n: (S if n == "initial_state" else t[:, 29:]) for n, t in x.items()})
    assert calls == ["chunk_kda", "fused_recurrent_kda"]
    assert rel_err(torch.cat([o_pre, o_last], 1), o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
