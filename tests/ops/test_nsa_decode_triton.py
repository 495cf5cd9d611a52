"""NSA's Triton decode kernel (ops/nsa_decode_triton.py) against the PyTorch step, on the CPU under
Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU; needs the `triton` package: the
`dev` extra installs it on Linux x86-64). On a GPU the same comparison runs at the first call per shape
(nsa._triton_decode), and tests/gpu covers the kernel there."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from attnbench.ops import nsa as nsa_ops
from attnbench.ops import nsa_decode_triton as ndt
from attnbench.ops.nsa import nsa_decode
from helpers import nsa_random_cache, rel_err
from ops.test_nsa_ops import BS, cache_of, gates_at, make_inputs

pytestmark = [pytest.mark.skipif(not ndt.available(), reason="needs the triton package (its interpreter)"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                 reason="CPU tests under Triton's interpreter (tests/gpu runs the kernel on a GPU)"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # the interpreter's numpy scalars


@pytest.fixture
def interpreted():
    return ndt


@pytest.mark.parametrize("H,G,S,W,L", [
    (2, 2, 4, 32, 100),   # window shorter than the later positions, longer than the early ones
    (1, 4, 2, 32, 107),   # S = 2: own and previous block only; L not a multiple of BS
    (2, 2, 4, 0, 100),    # no window branch
    (1, 2, 8, 5, 120),    # S * BS > L: fewer blocks than block_counts early on; tiny window
    (1, 16, 4, 64, 300),  # 16 query heads per KV head (the bake-off's NSA): tl.dot on every product
])
@pytest.mark.parametrize("split,gather", [(False, None), (True, None), (False, 3)],
                         ids=["one-program", "split", "gathers-of-3-blocks"])
def test_kernel_equals_the_pytorch_step(interpreted, H, G, S, W, L, split, gather):
    T = 100
    q, k, v, *gates = make_inputs(2, T, H, G, seed=S + W)
    kv, means = cache_of(k.float(), v.float(), L, fill=7.0)
    D = q.shape[-1]
    block_nb = (4 if G < 16 else 16) if split else None  # split: tiles of 4 (16 for tl.dot) block means
    assert not split or means.shape[3] > block_nb  # so the split kernel scores several tiles
    # split: the main program reads 2 tiles' partials and 8 block scores per load, so it takes several
    # loads, the last one ragged (NB = 7..19 block means, 2..5 tiles)
    wide = dict(block_split=2, block_imp=8) if split else {}
    for t in (0, 1, BS - 1, BS, 2 * BS + 3, T - 1):  # block boundaries, no complete block yet, the end
        args = (torch.tensor([t]), gates_at(gates, t), BS, S, W)
        ref = nsa_decode(q[:, t:t + 1], kv.double(), means.double(), *args)  # float64 PyTorch step
        got = interpreted.nsa_decode_triton(q[:, t:t + 1].float(), kv, means.float(), args[0], args[1].float(),
                                            BS, S, W, D ** -0.5, block_nb=block_nb, sel_gather=gather, **wide)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert rel_err(got, ref) < 1e-5, t


def test_kernel_at_the_seed_shape_with_a_bf16_cache_over_several_tiles(interpreted):
    """G = 16, D = 64, BS = 32, S = 4, W = 64 (configs/nsa.toml), a bf16 cache of 5000 positions: 157 block
    means, three tiles of the compressed pass, scored by the split kernel; bf16 out, float32 inside."""
    B, H, G, D, bs, S, W, L, T = 1, 1, 16, 64, 32, 4, 64, 5000, 4200
    kv, means = nsa_random_cache(L, T, D=D, block_size=bs)
    # block_sel 16, 32: several selection scan tiles; block_split 2, block_imp 64: the main program reads the
    # three tiles' partials in two loads and the 157 scores in three (the defaults: one load each)
    for t, block_sel, wide in ((5, None, {}), (32, None, {}), (700, 16, {}), (T - 1, None, {}), (T - 1, 32, {}),
                               (T - 1, None, dict(block_split=2, block_imp=64)),
                               (1500, None, dict(block_split=2, block_imp=64)), (1500, None, dict(sel_gather=3))):
        q, gates = torch.randn(B, 1, H * G, D).bfloat16(), torch.rand(B, 1, H * G, 3).bfloat16()
        ref = nsa_decode(q.double(), kv.double(), means.double(), torch.tensor([t]), gates.double(), bs, S, W)
        got = interpreted.nsa_decode_triton(q, kv, means, torch.tensor([t]), gates, bs, S, W, D ** -0.5,
                                            block_sel=block_sel, **wide)
        assert got.dtype == torch.bfloat16 and rel_err(got, ref) < 1e-2, t  # bf16 rounding of the output


def test_kernel_at_16k_with_its_default_loads(interpreted):
    """The GPU latency benchmark's longest prompt: a 16,448-position bf16 cache holds 514 block means, nine tiles for
    the split kernel; the main program reads their partials in two loads (8 + 1) and the 514 scores in two
    (512 + 2), the defaults, both ragged."""
    B, H, G, D, bs, S, W, L, T = 1, 1, 16, 64, 32, 4, 64, 16448, 16384
    kv, means = nsa_random_cache(L, T, D=D, block_size=bs, seed=1)
    assert means.shape[3] == 514
    for t in (T - 1, 9000, 100):
        q, gates = torch.randn(B, 1, H * G, D).bfloat16(), torch.rand(B, 1, H * G, 3).bfloat16()
        ref = nsa_decode(q.double(), kv.double(), means.double(), torch.tensor([t]), gates.double(), bs, S, W)
        got = interpreted.nsa_decode_triton(q, kv, means, torch.tensor([t]), gates, bs, S, W, D ** -0.5)
        assert rel_err(got, ref) < 1e-2, t  # bf16 rounding of the output


def test_first_call_per_shape_checks_the_kernel_and_falls_back_on_a_mismatch(interpreted, monkeypatch, caplog):
    """nsa._triton_decode: the first call per shape runs both steps; a kernel that matches is used (and
    recorded as 'triton'), one that differs is logged and the PyTorch step runs for that shape."""
    from attnbench.ops.backend import record_backends

    monkeypatch.setattr(nsa_ops, "_TRITON_DECODE_OK", {})
    q, k, v, *gates = make_inputs(1, 40, 1, 2, seed=3)
    kv, means = cache_of(k.float(), v.float(), 48)
    args = (q[:, 39:40].float(), kv, means.float(), torch.tensor([39]), gates_at(gates, 39).float(), BS, 4, 8,
            q.shape[-1] ** -0.5, None)
    with record_backends() as seen:
        o = nsa_ops._triton_decode(*args)
    assert o is not None and seen == {"nsa_decode": "triton"} and list(nsa_ops._TRITON_DECODE_OK.values()) == [True]

    monkeypatch.setattr(nsa_ops, "_TRITON_DECODE_OK", {})
    monkeypatch.setattr(interpreted, "nsa_decode_triton", lambda *a: torch.zeros_like(a[0]))
    with caplog.at_level(logging.WARNING, logger="attnbench.ops"):
        assert nsa_ops._triton_decode(*args) is None
        assert nsa_ops._triton_decode(*args) is None  # decided once per shape
    assert caplog.text.count("differs from the PyTorch step") == 1
    # backend='torch' never takes the kernel; nor does a CPU tensor
    assert nsa_decode(*args[:5], BS, 4, 8, backend="torch").shape == args[0].shape


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnbench.ops import nsa_decode_triton as m

def compile(fn, sig, const):
    names = list(sig) + list(const)
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}},
                    constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "cubin" in k.asm

sig = dict(q_ptr="*bf16", gate_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", km_ptr="*fp32", vm_ptr="*fp32",
           imp_ptr="*fp32", o_ptr="*bf16", pos_ptr="*i64", s_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32",
           pacc_ptr="*fp32", L="i32", NB="i32", NSPLIT="i32", scale="fp32")
SHAPES = ((dict(G=16, D=64, BLOCK_G=16, BLOCK_D=64, BS=32, S=4, W=64, BLOCK_W=64, BLOCK_NB=64, BLOCK_SEL=1024,
                DOT=True), dict(BLOCK_SPLIT=8, BLOCK_IMP=512)),
          (dict(G=2, D=16, BLOCK_G=2, BLOCK_D=16, BS=16, S=4, W=0, BLOCK_W=16, BLOCK_NB=16, BLOCK_SEL=16,
                DOT=False), dict(BLOCK_SPLIT=2, BLOCK_IMP=16)))
# with and without the split; the selection in registers and in memory; all chosen blocks in one gather and
# one per gather
for split in (False, True):
    for const, wide in SHAPES:  # the constexprs in the kernel's parameter order: compile() places them so
        for one_sel, ch in ((True, 4), (False, 1)):
            compile(m._nsa_decode_kernel, sig, {**const, "SPLIT": split, **wide, "ONE_SEL": one_sel, "BLOCK_S": 4,
                                                "CH": ch, "BLOCK_SB": max(16, ch * const["BS"])})
split_sig = dict(q_ptr="*bf16", km_ptr="*fp32", vm_ptr="*fp32", s_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32",
                 pacc_ptr="*fp32", pos_ptr="*i64", NB="i32", NSPLIT="i32", scale="fp32")
compile(m._compressed_split_kernel, split_sig, dict(G=16, D=64, BLOCK_G=16, BLOCK_D=64, BS=32, BLOCK_NB=64,
                                                    DOT_NB=True))
print("compiled")
"""


def test_kernel_compiles_for_hopper_with_the_real_compiler():
    """The interpreter does not apply the compiler's rules (e.g. kernels may read only constexpr globals):
    compile the kernels to sm_90 cubins with Triton's own toolchain (no GPU needed), in a process
    without TRITON_INTERPRET, for the bake-off's shape (tl.dot paths) and a small one (broadcast paths), with
    and without the split compressed pass."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0 and "compiled" in p.stdout, p.stderr[-2000:]
