"""KDA on a CUDA GPU: FLA's kernels (fla.ops.kda) in bf16 against the float64 token-by-token oracle, and the
mixer's decoding against its forward.

Tolerances as tests/gpu/test_fla_delta_ops.py (op level: relative RMS error <= 1e-2 for outputs, final
states and every input's gradient) and tests/gpu/test_delta_mixers_gpu.py (mixer level: 1e-2, or 1.5x
the bf16 floor of the same mixer on the PyTorch backend under the same autocast). chunk_kda's backward
does not use chunk_bwd_dqkwg, the step FLA refuses on Hopper with 3.4 <= triton < 3.7.1 (FLA #640), and
FLA raises nothing for KDA there: the gradient tests below are what shows whether its own backward
kernel is right on this GPU and Triton, and test_backward_backend_on_this_machine prints which ran.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench import GPTConfig, mixers
from attnbench.ops._l2norm import l2norm
from attnbench.ops.backend import fla_available, record_backends
from attnbench.ops.kda import kda, kda_recurrent
from helpers import fwd_bwd, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fla_available(), reason="needs the fla package (pip install 'attnbench[cuda]')"),
]

B, H, K, V = 2, 4, 64, 64
TOL = 1e-2


def make(T: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    # the mixer's gate: -A * softplus(.), A in [1, 16]; float32 as the mixer hands it over
    A = torch.empty(H, device="cuda").uniform_(1, 16, generator=gen)
    g = -A[:, None] * F.softplus(rnd(B, T, H, K) - 4.0)
    return dict(q=rnd(B, T, H, K).bfloat16(), k=rnd(B, T, H, K).bfloat16(), v=rnd(B, T, H, V).bfloat16(), g=g,
                beta=rnd(B, T, H).sigmoid().bfloat16(), initial_state=rnd(B, H, K, V))


def call(x: dict, oracle: bool = False, **kw):
    q, k, v, g, beta, h0 = x["q"], x["k"], x["v"], x["g"], x["beta"], x["initial_state"]
    if oracle:
        return kda_recurrent(l2norm(q), l2norm(k), v, g, beta, initial_state=h0, output_final_state=True)
    kw.setdefault("output_final_state", True)
    return kda(q, k, v, g, beta, initial_state=h0, **kw)


def forward_backward(x: dict, oracle: bool, **kw):
    leaves = {n: (t.double() if oracle else t).detach().clone().requires_grad_() for n, t in x.items()}
    o, S = call(leaves, oracle=oracle, **kw)
    gen = torch.Generator(device="cuda").manual_seed(123)
    do = torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, device="cuda", generator=gen, dtype=torch.float64)
    loss = (o.double() * do).sum() + (S.double() * dS).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, grads))


def assert_matches(got, ref, where: str) -> None:
    (o, S, g), (o_ref, S_ref, g_ref) = got, ref
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)} | {f"d{n}": rel_err(g[n], g_ref[n]) for n in g_ref}
    print(f"{where}: " + ", ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"{where}: relative RMS errors above {TOL}: {bad}"


@pytest.mark.parametrize("chunk_size", [64, 32])
@pytest.mark.parametrize("T", [63, 256, 1000])
def test_fla_forward_backward_vs_oracle(T, chunk_size):
    x = make(T)
    got = forward_backward(x, oracle=False, backend="fla", chunk_size=chunk_size)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_matches(got, forward_backward(x, oracle=True), f"kda T={T} C={chunk_size}")


def test_backward_backend_on_this_machine():
    """A training call records 'fla' (FLA's own KDA backward; no attnbench replacement or fallback is
    installed for it) and names the GPU and Triton it ran on."""
    import triton

    with record_backends() as seen:
        forward_backward(make(64), oracle=False, backend="auto")
    print(f"kda backward on {torch.cuda.get_device_name()} (sm {torch.cuda.get_device_capability()}), "
          f"triton {triton.__version__}: {seen}")
    assert seen == {"kda": "fla"}


def test_fla_decode_continues_forward():
    """A chunk_kda prefill, then T == 1 steps on fused_recurrent_kda, equals one FLA forward."""
    T, T0 = 48, 31
    x = make(T)

    def part(lo, hi, h0):
        return {n: (h0 if n == "initial_state" else t[:, lo:hi]) for n, t in x.items()}

    with torch.no_grad():
        o_full, S_full = call(x, backend="fla")
        o_pre, S = call(part(0, T0, x["initial_state"]), backend="fla")
        outs = [o_pre]
        for t in range(T0, T):
            o_t, S = call(part(t, t + 1, S), backend="fla")
            assert o_t.dtype == torch.bfloat16 and S.dtype == torch.float32
            outs.append(o_t)
    o_steps = torch.cat(outs, 1)
    worst = max(rel_err(o_steps[:, t], o_full[:, t]) for t in range(T))
    print(f"kda decode: worst per-position o={worst:.2e} S={rel_err(S, S_full):.2e}")
    assert worst <= TOL and rel_err(S, S_full) <= TOL


# ---------------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------------

D, NH = 256, 4  # head dim 64, as the 384/6 configs


def build(backend: str, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="kda", n_layer=2, n_head=NH, n_embd=D, block_size=1024, backend=backend)
    m = mixers.get("kda")(cfg, 0)
    with torch.no_grad():
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
    return m.to(device="cuda", dtype=dtype)


def same_weights(src, backend: str, dtype):
    m = build(backend, dtype)
    m.load_state_dict(src.state_dict())
    return m


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_mixer_fla_bf16_vs_torch_float64(T):
    fla = build("fla")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", generator=gen)
    dy = torch.randn(B, T, D, device="cuda", generator=gen, dtype=torch.float64)
    y_ref, gx_ref = fwd_bwd(same_weights(fla, "torch", torch.float64), x.double(), dy, autocast=False)
    y_fl, gx_fl = fwd_bwd(same_weights(fla, "torch", torch.float32), x, dy, autocast=True)
    floor_y, floor_gx = rel_err(y_fl, y_ref), rel_err(gx_fl, gx_ref)
    with record_backends() as seen:
        y, gx = fwd_bwd(fla, x, dy, autocast=True)
    err_y, err_gx = rel_err(y, y_ref), rel_err(gx, gx_ref)
    print(f"kda mixer T={T} ({seen}): y={err_y:.2e} (floor {floor_y:.2e}), dx={err_gx:.2e} (floor {floor_gx:.2e})")
    assert seen["kda"] == "fla"  # the short convolutions report their own backend beside it
    assert err_y <= max(TOL, 1.5 * floor_y) and err_gx <= max(TOL, 1.5 * floor_gx)


def test_mixer_decode_equals_forward():
    """bf16 autocast on FLA: a prefill, then single-token steps, equals the full forward at every position."""
    m = build("fla")
    T, T0 = 80, 33
    x = torch.randn(B, T, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = m(x)[0]
        st = m.init_state(B, T, "cuda", torch.bfloat16)
        outs = [m(x[:, :T0], st)[0]] + [m(x[:, t:t + 1], st)[0] for t in range(T0, T)]
    steps = torch.cat(outs, 1)
    worst = max(rel_err(steps[:, t], full[:, t]) for t in range(T))
    print(f"kda mixer decode: worst per-position {worst:.2e}")
    assert worst <= TOL and st.pos == T
