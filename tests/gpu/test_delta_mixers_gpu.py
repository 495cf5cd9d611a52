"""Delta-family mixers on a CUDA GPU: FLA backend under bf16 autocast vs the same mixer (same weights) in
float64 on the PyTorch backend; and cached decoding on the GPU vs the forward.

Relative RMS error <= 1e-2 for outputs and input gradients at T in {63, 256, 1000}, or at most 1.5x the
bf16 floor where that floor is higher. The floor is the error of the same mixer on the PyTorch backend
under the same autocast (its op computes in float32): bf16 projections, convolutions and the output
round-trip alone cost about 1e-2 at the mixer level (measured: 0.9-1.2e-2 for outputs, 1.0-1.4e-2
for dx on the CPU, D=256, H=4), so a flat 1e-2 would fail any bf16 implementation; 1.5x the floor
still catches every real bug (those give O(1) errors). Where FLA refuses the gated backward on this
GPU (Hopper with triton < 3.7.1, FLA #640), the forward is tested on FLA and the backward through
backend='auto' (which then runs PyTorch); the test prints which ran.
"""
from __future__ import annotations

import pytest
import torch

from attnbench import GPTConfig, mixers
from attnbench.errors import AttnbenchError
from attnbench.ops.backend import fla_available, hopper_gated_backward_broken
from helpers import bf16_tolerance, check_cuda_decode_equals_forward, cuda_inputs, fwd_bwd, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not fla_available(), reason="needs the fla package (pip install 'attnbench[cuda]')"),
]

NAMES = ["deltanet", "gated_deltanet", "gated_deltaproduct"]
B, D, NH = 2, 256, 4  # head dim 64, as the 384/6 configs
TOL = 1e-2
# FLA's gated backward is refused on Hopper with an old Triton; these mixers have a gate in their op
GATED_OP = {"gated_deltanet", "gated_deltaproduct"}


def build(name: str, backend: str, dtype=torch.float32, args: dict | None = None):
    torch.manual_seed(0)
    cfg = GPTConfig(mixer=name, n_layer=2, n_head=NH, n_embd=D, block_size=1024, mixer_args=dict(args or {}),
                    backend=backend)
    m = mixers.get(name)(cfg, 0)
    with torch.no_grad():
        m.o_norm.weight.copy_(1 + 0.3 * torch.randn_like(m.o_norm.weight))
    return m.to(device="cuda", dtype=dtype)


def same_weights(src, name: str, backend: str, dtype):
    m = build(name, backend, dtype, src.args.to_dict())
    m.load_state_dict(src.state_dict())
    return m


@pytest.mark.parametrize("T", [63, 256, 1000])
@pytest.mark.parametrize("name", NAMES)
def test_fla_bf16_vs_torch_float64(name, T):
    fla = build(name, "fla")
    ref = same_weights(fla, name, "torch", torch.float64)
    x, dy = cuda_inputs(B, D, T)
    y_ref, gx_ref = fwd_bwd(ref, x.double(), dy, autocast=False)
    y_fl, gx_fl = fwd_bwd(same_weights(fla, name, "torch", torch.float32), x, dy, autocast=True)
    floor_y, floor_gx = rel_err(y_fl, y_ref), rel_err(gx_fl, gx_ref)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = fla(x)[0]
    assert y.dtype == torch.bfloat16
    e_fwd = rel_err(y, y_ref)
    if name in GATED_OP and hopper_gated_backward_broken():
        with pytest.raises(AttnbenchError, match="Hopper"):
            fwd_bwd(fla, x, dy, autocast=True)
        ran = "backward via backend='auto' -> PyTorch (FLA's gated backward is refused here)"
        y2, gx = fwd_bwd(same_weights(fla, name, "auto", torch.float32), x, dy, autocast=True)
    else:
        ran = "forward and backward on FLA"
        y2, gx = fwd_bwd(fla, x, dy, autocast=True)
    e_fwd2, e_gx = rel_err(y2, y_ref), rel_err(gx, gx_ref)
    print(f"{name} T={T}: {ran}; output (no-grad FLA) {e_fwd:.2e}, output (grad pass) {e_fwd2:.2e}, "
          f"dx {e_gx:.2e}; bf16 floor (torch backend): output {floor_y:.2e}, dx {floor_gx:.2e}")
    assert e_fwd <= bf16_tolerance(TOL, floor_y) and e_fwd2 <= bf16_tolerance(TOL, floor_y)
    assert e_gx <= bf16_tolerance(TOL, floor_gx)


@pytest.mark.parametrize("name,args", [("deltanet", {"use_gate": True, "allow_neg_eigval": True, "chunk_size": 32}),
                                       ("gated_deltanet", {"allow_neg_eigval": True, "expand_v": 2.0}),
                                       ("gated_deltaproduct", {"num_householder": 3, "use_forget_gate": False})])
def test_fla_forward_variants(name, args):
    """Other switches on the FLA forward (no grad: runs on every GPU)."""
    fla = build(name, "fla", args=args)
    ref = same_weights(fla, name, "torch", torch.float64)
    floor_m = same_weights(fla, name, "torch", torch.float32)
    x, _ = cuda_inputs(B, D, 300, seed=1)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, y_fl = fla(x)[0], floor_m(x)[0]
        y_ref = ref(x.double())[0]
    err, floor = rel_err(y, y_ref), rel_err(y_fl, y_ref)
    print(f"{name} {args}: output {err:.2e} (bf16 floor {floor:.2e})")
    assert err <= bf16_tolerance(TOL, floor)


@pytest.mark.parametrize("name", NAMES)
def test_gpu_decode_equals_forward(name):
    """bf16 autocast on FLA: a prefill then single-token steps equal one forward (and the float64 one)."""
    fla = build(name, "fla")
    check_cuda_decode_equals_forward(fla, same_weights(fla, name, "torch", torch.float64),
                                     same_weights(fla, name, "torch", torch.float32), B, D, TOL, name)
