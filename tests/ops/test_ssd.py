"""The SSD op (ops/ssd.py) on the CPU: the chunked form against the float64 token-by-token recurrence
(outputs, final states, gradients), state continuation, the T == 1 step, and the mapping onto FLA's
scalar-decay linear attention (simple_gla) that the CUDA path uses: through a literal simple_gla
recurrence written here from FLA's definition, and through FLA's own naive PyTorch recurrence where the
fla package is installed (it runs on the CPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attnbench.errors import AttnbenchError
from attnbench.ops.ssd import simple_gla_inputs, ssd, ssd_chunked, ssd_recurrent
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

Bz, H, P, N = 2, 3, 8, 6
NAMES = ("x", "dt", "A", "B", "C", "initial_state")


def make_inputs(T: int, dtype=torch.float64, batch: int = Bz, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs as the mixer makes them: dt = softplus(.) > 0, A < 0 (some strong decays), and a state."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, T, H, P, generator=g, dtype=dtype),
                dt=torch.nn.functional.softplus(torch.randn(batch, T, H, generator=g, dtype=dtype) - 1),
                A=-torch.exp(torch.randn(H, generator=g, dtype=dtype)),
                B=torch.randn(batch, T, N, generator=g, dtype=dtype),
                C=torch.randn(batch, T, N, generator=g, dtype=dtype),
                initial_state=torch.randn(batch, H, N, P, generator=g, dtype=dtype))


def grads_of(fn, inputs: dict[str, torch.Tensor]):
    """Output, final state and gradients of <y, dy> + <S, dS> w.r.t. every input (dy, dS fixed random)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    y, S = fn(**leaves)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dS = torch.randn(S.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * dy).sum() + (S.double() * dS).sum()
    gs = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), S.detach(), dict(zip(leaves, gs))


TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 7, 16, 63, 64, 65, 150])
def test_chunked_matches_recurrent(T, dtype):
    x = make_inputs(T, dtype)
    ref = grads_of(lambda **a: ssd_recurrent(**a, output_final_state=True), {n: t.double() for n, t in x.items()})
    for cs in (16, 64):
        y, S, g = grads_of(lambda **a: ssd_chunked(**a, output_final_state=True, chunk_size=cs), x)
        assert y.dtype == dtype and S.dtype == dtype
        assert rel_err(y, ref[0]) < TOL[dtype], (cs, rel_err(y, ref[0]))
        assert rel_err(S, ref[1]) < TOL[dtype], (cs, rel_err(S, ref[1]))
        for n in NAMES:
            assert rel_err(g[n], ref[2][n]) < TOL[dtype], (cs, n, rel_err(g[n], ref[2][n]))


def test_recurrence_is_the_published_one():
    """The oracle itself, on one head and two tokens by hand: h_1 = dt_1 B_1 x_1^T, h_2 = e^{dt_2 A} h_1
    + dt_2 B_2 x_2^T, y_t = h_t^T C_t."""
    x = make_inputs(2, batch=1)
    x0, dt, A, Bm, Cm = x["x"][0, :, 0], x["dt"][0, :, 0], x["A"][0], x["B"][0], x["C"][0]
    h1 = dt[0] * torch.outer(Bm[0], x0[0])
    h2 = torch.exp(dt[1] * A) * h1 + dt[1] * torch.outer(Bm[1], x0[1])
    y, S = ssd_recurrent(x["x"], x["dt"], x["A"], x["B"], x["C"], output_final_state=True)
    assert torch.allclose(y[0, 0, 0], h1.T @ Cm[0]) and torch.allclose(y[0, 1, 0], h2.T @ Cm[1])
    assert torch.allclose(S[0, 0], h2)


def test_state_continuation_and_decode_steps():
    T, t1 = 100, 37
    x = make_inputs(T)

    def part(lo, hi, h0):
        return {n: (h0 if n == "initial_state" else t if n == "A" else t[:, lo:hi]) for n, t in x.items()}

    y_full, S_full = ssd_recurrent(**x, output_final_state=True)
    for fn in (lambda **a: ssd_chunked(**a, output_final_state=True, chunk_size=16),
               lambda **a: ssd(**a, output_final_state=True, backend="torch")):
        y_a, S_a = fn(**part(0, t1, x["initial_state"]))
        outs, S = [y_a], S_a
        for t in range(t1, T):  # T == 1 steps
            y_t, S = fn(**part(t, t + 1, S))
            outs.append(y_t)
        assert rel_err(torch.cat(outs, 1), y_full) < 1e-10 and rel_err(S, S_full) < 1e-10


def test_decode_step_runs_no_chunked_form(monkeypatch):
    from attnbench.ops import ssd as mod

    calls = []
    for fn in ("_chunked", "_step"):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    x = make_inputs(20, torch.float32)
    ssd(**x, backend="torch")
    one = {n: (t if n in ("A", "initial_state") else t[:, :1]) for n, t in x.items()}
    ssd(**one, backend="torch")
    assert calls == ["_chunked", "_step"]


def test_batch_independence():
    x = make_inputs(70, batch=3)
    y0, S0 = ssd(**x, output_final_state=True, backend="torch", chunk_size=32)
    z = {n: t.clone() for n, t in x.items()}
    for n, t in z.items():
        if n != "A":
            t[1] = t[1] * 0.5 + 0.1
    y1, S1 = ssd(**z, output_final_state=True, backend="torch", chunk_size=32)
    assert torch.equal(y1[[0, 2]], y0[[0, 2]]) and torch.equal(S1[[0, 2]], S0[[0, 2]])
    assert rel_err(y1[1], y0[1]) > 1e-2


def test_causality():
    x = make_inputs(90)
    y0, _ = ssd(**x, backend="torch", chunk_size=16)
    z = {n: t.clone() for n, t in x.items()}
    for n in ("x", "dt", "B", "C"):
        z[n][:, 50:] = torch.randn_like(z[n][:, 50:]).abs()
    y1, _ = ssd(**z, backend="torch", chunk_size=16)
    assert torch.equal(y1[:, :50], y0[:, :50]) and rel_err(y1[:, 50:], y0[:, 50:]) > 1e-2


def test_strong_decay_stays_finite():
    """Decays of exp(-1e4) inside a chunk: the masked exponent keeps the gradients finite."""
    x = make_inputs(64, torch.float32)
    x["A"] = torch.full((H,), -1e4)
    y, S, g = grads_of(lambda **a: ssd(**a, output_final_state=True, backend="torch"), x)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in g.values())


def test_16bit_inputs():
    x = make_inputs(40, torch.float32)
    ref, S_ref = ssd_recurrent(**{n: t.double() for n, t in x.items()}, output_final_state=True)
    for dt in (torch.bfloat16, torch.float16):
        xh = dict(x, x=x["x"].to(dt), B=x["B"].to(dt), C=x["C"].to(dt))
        for T1 in (40, 1):
            xs = xh if T1 == 40 else {n: (t if n in ("A", "initial_state") else t[:, :1]) for n, t in xh.items()}
            y, S = ssd(**xs, output_final_state=True, backend="torch")
            assert y.dtype == dt and S.dtype == torch.float32
            assert rel_err(y, ref[:, :T1]) < 2e-2


def test_backend_errors_and_shapes():
    x = make_inputs(8, torch.float32)
    with pytest.raises(AttnbenchError, match="fla"):
        ssd(**x, backend="fla")
    with pytest.raises(AttnbenchError, match="bogus"):
        ssd(**x, backend="bogus")
    with pytest.raises(AttnbenchError, match="dt must be"):
        ssd(**dict(x, dt=x["dt"][:, :4]))
    with pytest.raises(AttnbenchError, match="C must have"):
        ssd(**dict(x, C=x["C"][..., :3]))
    with pytest.raises(AttnbenchError, match="initial_state"):
        ssd(**dict(x, initial_state=x["initial_state"][:, :, :3]))
    from attnbench.ops.backend import record_backends

    with record_backends() as seen:
        ssd(**x)
    assert seen == {"ssd": "torch"}


# ------------------------------------------------------------------ the FLA mapping


def simple_gla_literal(q, k, v, g, scale, initial_state):
    """FLA's simple_gla by its definition (fla/ops/simple_gla docstrings and naive.py):
    S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, per head; state [B, H, K, V]."""
    S = initial_state.clone()
    outs = []
    for t in range(q.shape[1]):
        S = torch.exp(g[:, t])[..., None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("T", [1, 37, 130])
def test_simple_gla_mapping_is_the_ssd_recurrence(T):
    """q = C, k = B (per head), v = dt * x, g = dt * A, scale = 1: simple_gla's recurrence is the SSD one."""
    x = make_inputs(T)
    q, k, v, g = simple_gla_inputs(x["x"], x["dt"], x["A"], x["B"], x["C"])
    assert q.shape == k.shape == (Bz, T, H, N) and v.shape == (Bz, T, H, P) and g.shape == (Bz, T, H)
    o, S = simple_gla_literal(q, k, v, g, 1.0, x["initial_state"])
    y, S_ref = ssd_recurrent(**x, output_final_state=True)
    assert rel_err(o, y) < 1e-12 and rel_err(S, S_ref) < 1e-12


def _fla_naive():
    """fla/ops/simple_gla/naive.py loaded by path (importing the fla package would define its Triton
    kernels); None where fla or einops is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("einops") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "simple_gla" / "naive.py"
    if not path.exists():
        return None
    mod_spec = importlib.util.spec_from_file_location("_fla_simple_gla_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("T", [37, 130])
def test_fla_naive_simple_gla_matches_ssd(T):
    """FLA's own reference recurrence and chunked form of simple_gla (float32), fed the mapping."""
    naive = _fla_naive()
    if naive is None:
        pytest.skip("needs the fla package and einops (pip install 'attnbench[cuda]')")
    x = make_inputs(T)
    q, k, v, g = simple_gla_inputs(x["x"], x["dt"], x["A"], x["B"], x["C"])
    y, S_ref = ssd_recurrent(**x, output_final_state=True)
    o, S = naive.naive_recurrent_simple_gla(q, k, v, g, scale=1.0, initial_state=x["initial_state"].float(),
                                            output_final_state=True)
    assert rel_err(o, y) < 1e-5 and rel_err(S, S_ref) < 1e-5
    o2, S2 = naive.naive_chunk_simple_gla(q, k, v, g, initial_state=x["initial_state"].float(),
                                          output_final_state=True, chunk_size=16, scale=1.0)
    assert rel_err(o2, y) < 1e-5 and rel_err(S2, S_ref) < 1e-5


def test_fla_call_receives_the_mapping(monkeypatch):
    """The FLA path (ops.ssd._fla_ssd) hands chunk_simple_gla / fused_recurrent_simple_gla exactly the mapped
    inputs, g and the state in float32, scale 1, chunk_size; checked with the kernels replaced by the literal
    recurrence (same keyword contract as FLA 0.6.0's functions)."""
    import sys
    import types

    from attnbench.ops import ssd as mod

    seen = []

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         **kw):
        seen.append(("chunk", g.dtype, initial_state.dtype, scale, kw))
        o, S = simple_gla_literal(q.double(), k.double(), v.double(), g.double(), scale, initial_state.double())
        return o.to(q.dtype), (S.float() if output_final_state else None)

    def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                                   output_final_state=False, **kw):
        seen.append(("recurrent", g.dtype, initial_state.dtype, scale, kw))
        o, S = simple_gla_literal(q.double(), k.double(), v.double(), g.double(), scale, initial_state.double())
        return o.to(q.dtype), (S.float() if output_final_state else None)

    fake = types.ModuleType("fla.ops.simple_gla")
    fake.chunk_simple_gla, fake.fused_recurrent_simple_gla = chunk_simple_gla, fused_recurrent_simple_gla
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", fake)
    x = make_inputs(40)
    y_ref, S_ref = ssd_recurrent(**x, output_final_state=True)
    call = mod._fla_ssd
    xf = dict(x, x=x["x"].float(), B=x["B"].float(), C=x["C"].float(), initial_state=x["initial_state"].float())
    y, S = call(xf["x"], xf["dt"], xf["A"], xf["B"], xf["C"], xf["initial_state"], True, 32, False)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    one = {n: (t if n in ("A", "initial_state") else t[:, :1]) for n, t in xf.items()}
    y1, _ = call(one["x"], one["dt"], one["A"], one["B"], one["C"], one["initial_state"], True, 32, False)
    assert rel_err(y1, y_ref[:, :1]) < 1e-5
    assert seen == [("chunk", torch.float32, torch.float32, 1.0, {"chunk_size": 32}),
                    ("recurrent", torch.float32, torch.float32, 1.0, {})]


def test_simple_gla_dqkwg_replacement_matches_autograd():
    """The step routed into simple_gla's backward on Hopper (fla_gated_bwd.dqkwg with zero w and dv) gives
    dq, dk and dg of FLA's chunk read-out, per chunk given h and dh (log2-scaled chunk-local cumsum g)."""
    import math

    from attnbench.ops.fla_gated_bwd import dqkwg

    torch.manual_seed(0)
    b, T, h, K, V, c = 1, 40, 2, 8, 5, 16
    n = -(-T // c)
    q, k, v, do = (torch.randn(b, T, h, d, dtype=torch.float64) for d in (K, K, V, V))
    gl = -torch.rand(b, T, h, dtype=torch.float64)
    G = torch.cat([gl[:, i * c:(i + 1) * c].cumsum(1) for i in range(n)], 1)  # chunk-local cumsum (natural)
    hs = torch.randn(b, n, h, K, V, dtype=torch.float64)
    dh = torch.randn(b, n, h, K, V, dtype=torch.float64)
    qq, kk, GG = (t.clone().requires_grad_() for t in (q, k, G))
    loss = 0
    for i in range(n):
        sl = slice(i * c, min((i + 1) * c, T))
        Gi = GG[:, sl].transpose(1, 2)                                    # [b, h, c]
        qi, ki, vi = qq[:, sl].transpose(1, 2), kk[:, sl].transpose(1, 2), v[:, sl].transpose(1, 2)
        m = torch.ones(Gi.shape[-1], Gi.shape[-1], dtype=torch.bool).tril()
        dec = (Gi[..., :, None] - Gi[..., None, :]).masked_fill(~m, float("-inf")).exp()
        o = (qi * Gi.exp()[..., None]) @ hs[:, i] + ((qi @ ki.transpose(-1, -2)) * dec) @ vi
        h_end = Gi[..., -1].exp()[..., None, None] * hs[:, i] + (ki * (Gi[..., -1:] - Gi).exp()[..., None]).transpose(-1, -2) @ vi
        loss = loss + (o * do[:, sl].transpose(1, 2)).sum() + (h_end * dh[:, i]).sum()
    dq_ref, dk_ref, dG_ref = torch.autograd.grad(loss, [qq, kk, GG])
    dq, dk, _, dg = dqkwg(q, k, v, do, hs, dh, k, G / math.log(2.0), torch.zeros_like(v), 1.0, c)
    assert rel_err(dq, dq_ref) < 1e-10 and rel_err(dk, dk_ref) < 1e-10 and rel_err(dg, dG_ref) < 1e-6
