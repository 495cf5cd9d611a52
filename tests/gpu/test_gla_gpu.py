"""GLA on a CUDA GPU: FLA's kernels (`fla.ops.gla.chunk_gla`, `fused_recurrent_gla`) in bf16 against the
float64 token-by-token oracle, and the `gla` mixer on FLA under bf16 autocast against the same mixer in
float64 on the PyTorch backend; decoding on the GPU against the forward.

Tolerances as tests/gpu/test_fla_delta_ops.py and test_delta_mixers_gpu.py: relative RMS error <= 1e-2 for
the op's outputs, final states and gradients; for the mixer, 1e-2 or 1.5x the bf16 floor (the same mixer
on the PyTorch backend under the same autocast), whichever is larger.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench import GPTConfig, mixers
from attnbench.errors import AttnbenchError
from attnbench.ops.backend import fla_available, record_backends
from attnbench.ops.gla import gla, gla_recurrent
from helpers import bf16_tolerance, check_cuda_decode_equals_forward, cuda_inputs, fwd_bwd, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fla_available(), reason="needs the fla package (pip install 'attnbench[cuda]')"),
]

B, H, K, V = 2, 4, 64, 128  # the matched shape's heads: key dim 64, value dim 128 (expand_k 0.5, expand_v 1)
TOL = 1e-2


def make(T: int, seed: int = 0) -> dict:
    """bf16 q, k, v; GLA's gate logsigmoid(.)/16 in float32; a float32 initial state."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    return dict(q=rnd(B, T, H, K).bfloat16(), k=rnd(B, T, H, K).bfloat16(), v=rnd(B, T, H, V).bfloat16(),
                gk=F.logsigmoid(rnd(B, T, H, K)) / 16, initial_state=rnd(B, H, K, V))


def call(x: dict, oracle: bool = False, **kw):
    """The dispatcher, or with oracle=True the float64 recurrence."""
    if oracle:
        return gla_recurrent(x["q"], x["k"], x["v"], x["gk"], initial_state=x["initial_state"],
                             output_final_state=True)
    kw.setdefault("output_final_state", True)
    return gla(x["q"], x["k"], x["v"], x["gk"], initial_state=x["initial_state"], **kw)


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


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_fla_forward_backward_vs_oracle(T):
    x = make(T)
    with record_backends() as seen:
        got = forward_backward(x, oracle=False, backend="fla")
    assert seen == {"gla": "fla"}
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    (o, S, g), (o_ref, S_ref, g_ref) = got, forward_backward(x, oracle=True)
    errs = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)} | {f"d{n}": rel_err(g[n], g_ref[n]) for n in g_ref}
    print(f"gla T={T}: " + ", ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    bad = {n: e for n, e in errs.items() if not e <= TOL}
    assert not bad, f"relative RMS errors above {TOL}: {bad}"


def test_fla_decode_continues_forward():
    """A prefill on chunk_gla, then T == 1 steps on fused_recurrent_gla (no autograd): one FLA forward, and
    the float64 oracle."""
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
        o_ref, S_ref = call({n: t.double() for n, t in x.items()}, oracle=True)
    o_steps = torch.cat(outs, 1)
    worst = max(rel_err(o_steps[:, t], o_full[:, t]) for t in range(T))
    print(f"gla decode: worst per-position o={worst:.2e} S={rel_err(S, S_full):.2e}, "
          f"vs float64 o={rel_err(o_steps, o_ref):.2e} S={rel_err(S, S_ref):.2e}")
    assert worst <= TOL and rel_err(S, S_full) <= TOL
    assert rel_err(o_steps, o_ref) <= TOL and rel_err(S, S_ref) <= TOL


def test_float32_stays_on_pytorch():
    """float32 CUDA inputs: 'auto' runs the PyTorch op (Triton's float32 dots are TF32), 'fla' says why."""
    x = {n: t.float() for n, t in make(40).items()}
    with pytest.raises(AttnbenchError, match="float32"):
        call(x, backend="fla")
    with record_backends() as seen:
        o, S = call(x, backend="auto")
    assert seen == {"gla": "torch"} and o.dtype == torch.float32
    o_ref, S_ref = call({n: t.double() for n, t in x.items()}, oracle=True)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4


# ---------------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------------

D, NH = 256, 2  # key head dim 256 * 0.5 / 2 = 64, value head dim 128: the matched shape's heads


def build(backend: str, dtype=torch.float32, args: dict | None = None):
    torch.manual_seed(0)
    cfg = GPTConfig(mixer="gla", n_layer=2, n_head=NH, n_embd=D, block_size=1024, mixer_args=dict(args or {}),
                    backend=backend)
    m = mixers.get("gla")(cfg, 0)
    with torch.no_grad():
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
        m.gk_up.bias.copy_(torch.randn_like(m.gk_up.bias))
    return m.to(device="cuda", dtype=dtype)


def same_weights(src, backend: str, dtype):
    m = build(backend, dtype, src.args.to_dict())
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
    with record_backends() as seen:
        y, gx = fwd_bwd(fla, x, dy, autocast=True)
    assert seen == {"gla": "fla"} and y.dtype == torch.bfloat16
    e_y, e_gx = rel_err(y, y_ref), rel_err(gx, gx_ref)
    print(f"gla mixer T={T}: output {e_y:.2e}, dx {e_gx:.2e}; bf16 floor (torch backend): output {floor_y:.2e}, "
          f"dx {floor_gx:.2e}")
    assert e_y <= bf16_tolerance(TOL, floor_y) and e_gx <= bf16_tolerance(TOL, floor_gx)


@pytest.mark.parametrize("args", [{}, {"use_short_conv": True}, {"use_output_gate": False}])
def test_mixer_gpu_decode_equals_forward(args):
    """bf16 autocast on FLA: a prefill then single-token steps equal one forward (and the float64 one)."""
    fla = build("fla", args=args)
    check_cuda_decode_equals_forward(fla, same_weights(fla, "torch", torch.float64),
                                     same_weights(fla, "torch", torch.float32), B, D, TOL, f"gla {args}")


def test_mixer_decode_step_captures_in_a_cuda_graph():
    """The decode step (FLA's fused_recurrent_gla under no_grad) replays from a CUDA graph with the
    state updated in place: replays equal eager steps."""
    fla = build("fla").to(torch.bfloat16)
    x, _ = cuda_inputs(B, D, 40, seed=3)
    x = x.bfloat16()
    with torch.no_grad():
        st = fla.init_state(B, 64, "cuda", torch.bfloat16)
        fla(x[:, :30], st)
        st_eager = fla.init_state(B, 64, "cuda", torch.bfloat16)
        fla(x[:, :30], st_eager)
        x_in = x[:, 30:31].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles) off the capture, on a copy of the state
            warm = fla.init_state(B, 64, "cuda", torch.bfloat16)
            warm.recurrent.copy_(st.recurrent)
            fla(x_in, warm)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_out, _ = fla(x_in, st)
        # capture ran nothing: the state still holds the 30-token prefill
        for t in range(30, 40):
            x_in.copy_(x[:, t:t + 1])
            graph.replay()
            y_ref, _ = fla(x[:, t:t + 1], st_eager)
            assert rel_err(y_out, y_ref) < 1e-3 and rel_err(st.recurrent, st_eager.recurrent) < 1e-5
