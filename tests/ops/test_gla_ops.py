"""GLA op (attnbench/ops/gla.py) on the CPU: the chunked form vs the token-by-token oracle (outputs, final
states, gradients), stability under strong decay, state continuation and decode steps, batch
independence, the dispatcher's errors, and the FLA call contract against stand-ins with FLA 0.6.0's
signatures."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnbench.errors import AttnbenchError
from attnbench.ops import gla as gla_mod
from attnbench.ops.gla import gla, gla_chunked, gla_recurrent
from helpers import check_recomputes_instead_of_storing, check_state_continuation_and_decode, rel_err

B, H, K, V = 2, 2, 16, 12
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def make_inputs(T: int, dtype=torch.float64, batch: int = B, seed: int = 0, normaliser: float = 16.0,
                logit_shift: float = 0.0) -> dict:
    """q, k, v ~ N(0, 1), gk = logsigmoid(N(shift, 2^2)) / normaliser (GLA's gate), a random initial state."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(batch, T, H, K, generator=g, dtype=dtype),
        k=torch.randn(batch, T, H, K, generator=g, dtype=dtype),
        v=torch.randn(batch, T, H, V, generator=g, dtype=dtype),
        gk=F.logsigmoid(2 * torch.randn(batch, T, H, K, generator=g, dtype=dtype) + logit_shift) / normaliser,
        initial_state=torch.randn(batch, H, K, V, generator=g, dtype=dtype),
    )


def run(form: str, x: dict, chunk_size: int = 64, **kw):
    fn = {"recurrent": gla_recurrent, "chunked": gla_chunked, "dispatch": gla}[form]
    if form != "recurrent":
        kw["chunk_size"] = chunk_size
    return fn(x["q"], x["k"], x["v"], x["gk"], initial_state=x["initial_state"], output_final_state=True, **kw)


def grads_of(form, x, chunk_size=64, seed=1, **kw):
    """Outputs, final state, and gradients of a fixed random projection of both w.r.t. every input."""
    x = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    o, S = run(form, x, chunk_size=chunk_size, **kw)
    gen = torch.Generator().manual_seed(seed)  # drawn in float64: the same projection for every dtype
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() + \
           (S * torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)).sum()
    names = sorted(x)
    gs = torch.autograd.grad(loss, [x[name] for name in names])
    return o.detach(), S.detach(), dict(zip(names, gs))


def literal(x: dict, scale: float | None = None):
    """The definition with explicit per-channel loops over one sequence and head at a time (float64)."""
    q, k, v, gk, h0 = (t.double() for t in (x["q"], x["k"], x["v"], x["gk"], x["initial_state"]))
    Bx, T, Hx, Kx = q.shape
    scale = Kx ** -0.5 if scale is None else scale
    o = torch.zeros(Bx, T, Hx, v.shape[-1], dtype=torch.float64)
    S_all = h0.clone()
    for b in range(Bx):
        for h in range(Hx):
            S = h0[b, h].clone()
            for t in range(T):
                for c in range(Kx):  # key channel c forgets at its own rate
                    S[c] = torch.exp(gk[b, t, h, c]) * S[c] + k[b, t, h, c] * v[b, t, h]
                o[b, t, h] = scale * (q[b, t, h] @ S)
            S_all[b, h] = S
    return o, S_all


def test_oracle_is_the_definition():
    x = make_inputs(9)
    o, S = run("recurrent", x)
    o_lit, S_lit = literal(x)
    assert rel_err(o, o_lit) < 1e-12 and rel_err(S, S_lit) < 1e-12
    o, _ = gla_recurrent(x["q"], x["k"], x["v"], x["gk"], scale=0.3, initial_state=x["initial_state"])
    assert rel_err(o, literal(x, scale=0.3)[0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 7, 16, 64, 65, 200])
def test_chunked_matches_recurrent(T, dtype):
    x = make_inputs(T, dtype)
    o_ref, S_ref, g_ref = grads_of("recurrent", x)
    for cs in (16, 32, 64):
        o, S, gr = grads_of("chunked", x, chunk_size=cs)
        assert o.dtype == dtype and S.dtype == dtype
        assert rel_err(o, o_ref) < TOL[dtype], (cs, rel_err(o, o_ref))
        assert rel_err(S, S_ref) < TOL[dtype], (cs, rel_err(S, S_ref))
        for name in g_ref:
            assert rel_err(gr[name], g_ref[name]) < TOL[dtype], (cs, name, rel_err(gr[name], g_ref[name]))


@pytest.mark.parametrize("normaliser", [16.0, 1.0])
def test_chunked_is_stable_in_float32_under_strong_decay(normaliser):
    """Gate logits around -30: a cumulative log-decay of ~120 (normaliser 16) to ~1900 (normaliser 1) per
    chunk of 64, far past float32's exp range. The sub-chunked form has no positive exponent, so float32
    stays finite and agrees with the float64 recurrence; the one-product form (q e^b)(k e^-b)^T does not.

    At normaliser 1 each token keeps e^-30 of the memory, so the true gradient of gk is ~1e-10 while any
    cumulative-sum form carries float32 rounding of O(1) terms that cancel: there it is checked in
    absolute terms, against the scale of the other gradients."""
    x = make_inputs(130, torch.float32, logit_shift=-30.0, normaliser=normaliser)
    b = x["gk"][:, :64].double().sum(1)
    assert b.min() < -100  # the regime where e^{-b} overflows float32
    x64 = {n: t.double() for n, t in x.items()}
    o_ref, S_ref, g_ref = grads_of("recurrent", x64)
    o, S, grads = grads_of("chunked", x)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    assert all(torch.isfinite(g).all() for g in grads.values())
    for name in g_ref:
        if name == "gk" and normaliser == 1.0:
            err = (grads[name].double() - g_ref[name]).abs().max()
            assert err < 1e-6 * g_ref["q"].abs().max(), err
        else:
            assert rel_err(grads[name], g_ref[name]) < 1e-4, name
    # the unstable single-product form for contrast (one chunk, float32): it breaks here
    q, k, gk = (x[n][:, :64].transpose(1, 2) for n in ("q", "k", "gk"))
    bb = gk.cumsum(-2)
    naive = (q * bb.exp()) @ (k * (-bb).exp()).transpose(-1, -2)
    assert not torch.isfinite(naive).all()


def test_state_continuation_and_decode_steps():
    check_state_continuation_and_decode(run, make_inputs(100))


def test_decode_step_runs_the_recurrence(monkeypatch):
    calls = []
    for fn in ("chunked_core", "recurrent_core"):
        orig = getattr(gla_mod, fn)
        monkeypatch.setattr(gla_mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    x = make_inputs(33, torch.float32)
    run("dispatch", x, backend="torch")
    assert calls == ["chunked_core"]
    calls.clear()
    run("dispatch", {n: (t if n == "initial_state" else t[:, :1]) for n, t in x.items()}, backend="torch")
    assert calls == ["recurrent_core"]


@pytest.mark.parametrize("form", ["dispatch", "recurrent"])
def test_batch_independence(form):
    x = make_inputs(70, batch=3)
    kw = {"chunk_size": 32} if form != "recurrent" else {}
    o0, S0 = run(form, x, **kw)
    j = 1
    y = {name: t.clone() for name, t in x.items()}
    for t in y.values():
        t[j] = t[j] * 0.5 + 0.1  # perturb every input of sequence j only (gk stays <= 0)
    y["gk"][j] = y["gk"][j].clamp(max=0)
    o1, S1 = run(form, y, **kw)
    others = [b for b in range(3) if b != j]
    assert torch.equal(o1[others], o0[others]) and torch.equal(S1[others], S0[others])
    assert rel_err(o1[j], o0[j]) > 1e-2


def test_dispatcher_dtypes_and_scale():
    x = make_inputs(40)
    o, _ = run("dispatch", x, backend="torch", scale=0.3)
    o_ref, _ = gla_recurrent(x["q"], x["k"], x["v"], x["gk"], scale=0.3, initial_state=x["initial_state"])
    assert rel_err(o, o_ref) < 1e-10
    # 16-bit inputs: output in q's dtype, state in float32 (computed in float32)
    for dt in (torch.bfloat16, torch.float16):
        for T in (20, 1):
            xh = {n: t[:, :T].to(dt) if n != "initial_state" else t.to(dt) for n, t in x.items()}
            o, S = run("dispatch", xh, backend="torch")
            assert o.dtype == dt and S.dtype == torch.float32
            o_ref, _ = run("recurrent", {n: t.float() for n, t in xh.items()})
            assert rel_err(o, o_ref) < 2e-2


def test_dispatcher_backend_and_shape_errors():
    x = make_inputs(8, torch.float32)
    with pytest.raises(AttnbenchError, match="fla"):
        run("dispatch", x, backend="fla")
    xb = {n: t.to(torch.bfloat16) for n, t in x.items()}
    with pytest.raises(AttnbenchError, match="CUDA"):
        run("dispatch", xb, backend="fla")
    with pytest.raises(AttnbenchError, match="bogus"):
        run("dispatch", x, backend="bogus")
    assert torch.isfinite(run("dispatch", x, backend="auto")[0]).all()  # auto on the CPU: PyTorch
    with pytest.raises(AttnbenchError, match="gk must have q's shape"):
        run("dispatch", dict(x, gk=x["gk"][..., 0]))
    with pytest.raises(AttnbenchError, match="initial_state"):
        run("chunked", dict(x, initial_state=x["initial_state"][:, :, :3]))
    with pytest.raises(AttnbenchError, match="chunk_size"):
        run("dispatch", x, chunk_size=48)


def test_record_backends_names_the_op():
    from attnbench.ops.backend import record_backends

    x = make_inputs(5, torch.float32)
    with record_backends() as seen:
        run("dispatch", x)
    assert seen == {"gla": "torch"}


def test_long_context_recomputes_instead_of_storing(monkeypatch):
    x = make_inputs(160, torch.float32)
    check_recomputes_instead_of_storing(monkeypatch, gla_mod, lambda: grads_of("dispatch", x))


# ---------------------------------------------------------------------------------------------------
# The FLA call, against stand-ins with FLA 0.6.0's signatures (fla/ops/gla/chunk.py, fused_recurrent.py)
# ---------------------------------------------------------------------------------------------------


def _fake_fla(monkeypatch, calls: list):
    """A fake `fla.ops.gla` whose two functions have FLA 0.6.0's exact parameter lists, check what FLA
    asserts or assumes (layouts [B, T, H, D], a float32 initial state, the key-major state layout) and
    compute with the float64 oracle."""

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
                  cu_seqlens=None, cu_seqlens_cpu=None):
        calls.append("chunk_gla")
        assert q.shape == k.shape == g.shape, "q, k, g must have the same shape."
        assert v.shape == (*q.shape[:3], v.shape[-1])
        assert initial_state is None or initial_state.dtype == torch.float32, "initial_state must be in float32."
        assert not state_v_first and cu_seqlens is None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o, S = gla_recurrent(q.double(), k.double(), v.double(), g.double(), scale,
                             initial_state.double() if initial_state is not None else None, output_final_state)
        return o.to(v.dtype), (S.float() if S is not None else None)

    def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                            reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
        calls.append("fused_recurrent_gla")
        assert gk is not None and gk.shape == q.shape and gv is None and not reverse and not state_v_first
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        o, S = gla_recurrent(q.double(), k.double(), v.double(), gk.double(), scale,
                             initial_state.double() if initial_state is not None else None, output_final_state)
        return o.to(q.dtype), (S.float() if S is not None else None)

    fake = types.ModuleType("fla.ops.gla")
    fake.chunk_gla, fake.fused_recurrent_gla = chunk_gla, fused_recurrent_gla
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.gla", fake)


def test_fla_call_contract(monkeypatch):
    """The dispatcher's FLA branch: chunk_gla for prefills and training, fused_recurrent_gla for a decode
    step without autograd; outputs in q's dtype, states float32, equal to the oracle."""
    calls = []
    _fake_fla(monkeypatch, calls)
    x = make_inputs(37)
    xb = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v") else t) for n, t in x.items()}
    scale = K ** -0.5
    o, S = gla_mod._fla_gla(xb["q"], xb["k"], xb["v"], xb["gk"], scale, xb["initial_state"], True, False)
    assert calls == ["chunk_gla"] and o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_ref, S_ref = run("recurrent", {n: t.double() for n, t in xb.items()})
    assert rel_err(o, o_ref) < 1e-2 and rel_err(S, S_ref) < 1e-6
    step = {n: (t if n == "initial_state" else t[:, :1]) for n, t in xb.items()}
    calls.clear()
    o1, S1 = gla_mod._fla_gla(step["q"], step["k"], step["v"], step["gk"], scale, S_ref.float(), True, False)
    assert calls == ["fused_recurrent_gla"] and o1.shape == (B, 1, H, V)
    calls.clear()
    gla_mod._fla_gla(step["q"], step["k"], step["v"], step["gk"], scale, None, False, True)  # needs a backward
    assert calls == ["chunk_gla"]
