"""Mamba-2 on a CUDA GPU: the SSD op on FLA's simple_gla kernels (bf16) against the float64 token-by-token
recurrence, and the mixer on the FLA backend under bf16 autocast against the same mixer in float64.

Op: relative RMS error <= 1e-2 for outputs, final states and gradients (x, dt, A, B, C, initial state) at
T in {63, 256, 1000}, as tests/gpu/test_fla_delta_ops.py. Mixer: outputs and input gradients within
max(1e-2, 1.5 x the bf16 floor), the floor being the same mixer on the PyTorch backend under the same
autocast (as tests/gpu/test_delta_mixers_gpu.py). FLA's chunk backward with a gate is refused on Hopper
with triton < 3.7.1 (FLA #640); there it runs with attnbench's PyTorch version of the refused step
(ops/ssd.py::install_simple_gla_dqkwg) where the gated delta rule does, and the tests print the route.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench import GPTConfig, mixers
from attnbench.errors import AttnbenchError
from attnbench.ops.backend import fla_available, gated_backward_route, hopper_gated_backward_broken, record_backends
from attnbench.ops.ssd import ssd, ssd_recurrent
from helpers import bf16_tolerance, check_cuda_decode_equals_forward, cuda_inputs, fwd_bwd, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fla_available(), reason="needs the fla package (pip install 'attnbench[cuda]')"),
]

B, H, P, N = 2, 4, 64, 64
TOL = 1e-2
HOPPER_SKIP = "FLA's gated chunk backward is refused on Hopper with triton < 3.7.1 (FLA #640) and no route replaces it"


def make(T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 x, B, C (as the mixer's convolution gives them under autocast), float32 dt, A and state."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    return dict(x=rnd(B, T, H, P).bfloat16(), dt=F.softplus(rnd(B, T, H) - 1.0), A=-rnd(H).exp(),
                B=(rnd(B, T, N) / N ** 0.25).bfloat16(), C=(rnd(B, T, N) / N ** 0.25).bfloat16(),
                initial_state=rnd(B, H, N, P))


def forward_backward(x: dict, oracle: bool, **kw):
    leaves = {n: (t.double() if oracle else t).detach().clone().requires_grad_() for n, t in x.items()}
    if oracle:
        y, S = ssd_recurrent(**leaves, output_final_state=True)
    else:
        y, S = ssd(**leaves, output_final_state=True, **kw)
    gen = torch.Generator(device="cuda").manual_seed(123)
    dy = torch.randn(y.shape, device="cuda", generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, device="cuda", generator=gen, dtype=torch.float64)
    loss = (y.double() * dy).sum() + (S.double() * dS).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return y.detach(), S.detach(), dict(zip(names, grads))


def assert_matches(got, ref, where: str) -> None:
    (y, S, g), (y_ref, S_ref, g_ref) = got, ref
    errs = {"y": rel_err(y, y_ref), "S": rel_err(S, S_ref)} | {f"d{n}": rel_err(g[n], g_ref[n]) for n in g_ref}
    print(f"{where}: " + ", ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"{where}: relative RMS errors above {TOL}: {bad}"


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_fla_forward_backward_vs_oracle(T):
    if hopper_gated_backward_broken():
        pytest.skip(HOPPER_SKIP + "; test_auto_falls_back_on_hopper covers this machine")
    x = make(T)
    with record_backends() as seen:
        got = forward_backward(x, oracle=False, backend="fla")
    print(f"T={T}: ssd ran on {seen['ssd']} (gated backward route: {gated_backward_route()})")
    assert seen["ssd"] in ("fla", "fla+torch-dqkwg")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_matches(got, forward_backward(x, oracle=True), f"ssd T={T}")


@pytest.mark.parametrize("T", [63, 1000])
def test_fla_forward_only(T):
    """Forward-only FLA calls run everywhere, Hopper with an old Triton included."""
    x = make(T)
    with torch.no_grad():
        y, S = ssd(**x, output_final_state=True, backend="fla")
        y_ref, S_ref = ssd_recurrent(**{n: t.double() for n, t in x.items()}, output_final_state=True)
    print(f"T={T} forward: y={rel_err(y, y_ref):.2e} S={rel_err(S, S_ref):.2e}")
    assert rel_err(y, y_ref) <= TOL and rel_err(S, S_ref) <= TOL


def test_auto_falls_back_on_hopper():
    if not hopper_gated_backward_broken():
        pytest.skip("a route runs the gated backward here: nothing to fall back from")
    x = make(256)
    with pytest.raises(AttnbenchError, match="Hopper"):
        forward_backward(x, oracle=False, backend="fla")
    assert_matches(forward_backward(x, oracle=False, backend="auto"), forward_backward(x, oracle=True),
                   "ssd auto-fallback")


def test_fla_decode_continues_forward():
    """A prefill on FLA's chunk kernel, then T == 1 steps on its fused recurrent kernel, equals one forward."""
    T, T0 = 48, 31
    x = make(T)

    def part(lo, hi, h0):
        return {n: (h0 if n == "initial_state" else t if n == "A" else t[:, lo:hi]) for n, t in x.items()}

    with torch.no_grad():
        y_full, S_full = ssd(**x, output_final_state=True, backend="fla")
        y_pre, S = ssd(**part(0, T0, x["initial_state"]), output_final_state=True, backend="fla")
        outs = [y_pre]
        for t in range(T0, T):
            y_t, S = ssd(**part(t, t + 1, S), output_final_state=True, backend="fla")
            assert y_t.dtype == torch.bfloat16 and S.dtype == torch.float32
            outs.append(y_t)
    y = torch.cat(outs, 1)
    worst = max(rel_err(y[:, t], y_full[:, t]) for t in range(T))
    print(f"ssd decode: worst per-position y={worst:.2e} S={rel_err(S, S_full):.2e}")
    assert worst <= TOL and rel_err(S, S_full) <= TOL


# ---------------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------------

D = 256  # 8 heads of 64 at expand 2


def build(backend: str, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="mamba2", n_layer=2, n_head=4, n_embd=D, block_size=1024, backend=backend)
    m = mixers.get("mamba2")(cfg, 0)
    with torch.no_grad():
        m.norm_weight.copy_(1 + 0.3 * torch.randn_like(m.norm_weight))
        m.in_proj.weight.normal_(0, 0.02)
        m.o_proj.weight.normal_(0, 0.02)
    return m.to(device="cuda", dtype=dtype)


def same_weights(src, backend: str, dtype):
    m = build(backend, dtype)
    m.load_state_dict(src.state_dict())
    return m


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_mixer_fla_bf16_vs_torch_float64(T):
    fla = build("fla")
    ref = same_weights(fla, "torch", torch.float64)
    x, dy = cuda_inputs(B, D, T)
    y_ref, gx_ref = fwd_bwd(ref, x.double(), dy, autocast=False)
    y_fl, gx_fl = fwd_bwd(same_weights(fla, "torch", torch.float32), x, dy, autocast=True)
    floor_y, floor_gx = rel_err(y_fl, y_ref), rel_err(gx_fl, gx_ref)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = fla(x)[0]
    e_fwd = rel_err(y, y_ref)
    if hopper_gated_backward_broken():
        ran = "backward via backend='auto' -> PyTorch (FLA's gated backward is refused here)"
        y2, gx = fwd_bwd(same_weights(fla, "auto", torch.float32), x, dy, autocast=True)
    else:
        with record_backends() as seen:
            y2, gx = fwd_bwd(fla, x, dy, autocast=True)
        ran = f"forward and backward on {seen['ssd']}"
    e_fwd2, e_gx = rel_err(y2, y_ref), rel_err(gx, gx_ref)
    print(f"mamba2 T={T}: {ran}; output (no-grad FLA) {e_fwd:.2e}, output (grad pass) {e_fwd2:.2e}, "
          f"dx {e_gx:.2e}; bf16 floor (torch backend): output {floor_y:.2e}, dx {floor_gx:.2e}")
    assert e_fwd <= bf16_tolerance(TOL, floor_y) and e_fwd2 <= bf16_tolerance(TOL, floor_y)
    assert e_gx <= bf16_tolerance(TOL, floor_gx)


def test_mixer_gpu_decode_equals_forward():
    """bf16 autocast on FLA: a prefill then single-token steps equal one forward (and the float64 one)."""
    fla = build("fla")
    check_cuda_decode_equals_forward(fla, same_weights(fla, "torch", torch.float64),
                                     same_weights(fla, "torch", torch.float32), B, D, TOL, "mamba2")
