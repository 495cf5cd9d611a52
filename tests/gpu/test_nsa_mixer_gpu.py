"""The NSA mixer on the GPU: FLA's kernels under bf16 autocast against the same mixer (same weights) in
float64 on the PyTorch backend, and cached decoding against the forward.

Top-k selection is discontinuous: bf16 rounding inside FLA's kernels can flip near-tied blocks, and one
flipped block changes a row by O(1) (tests/gpu/test_fla_nsa_ops.py measures how rarely and by how
little). So the error bounds are checked with both sides on FLA's own selection: the op the mixer calls
is wrapped to compute FLA's block_indices from the bf16 q, k it receives and pass them on. The error
with each side choosing its own blocks is printed for information.
"""
from __future__ import annotations

import pytest
import torch

import attnbench.mixers.nsa as nsa_mixer
from attnbench import GPT, GPTConfig
from attnbench.ops.backend import fla_available
from attnbench.ops.nsa import nsa as nsa_op
from attnbench.ops.nsa import nsa_decode as nsa_decode_op
from helpers import fla_selection, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and fla"),
]

# configs/nsa.toml's mixer at a smaller width
ARGS = {"n_kv_head": 1, "head_dim": 32, "block_size": 32, "block_counts": 4, "window_size": 64}
C, HQ = 256, 16


class SharedSelection:
    """Wraps the mixer's op: the first full-sequence call (the FLA side, bf16) records FLA's selection;
    every call then uses the rows of it that belong to its queries (the last TQ of TK positions)."""

    def __init__(self):
        self.sel = None

    def __call__(self, q, k, v, *args, block_indices=None, **kw):
        if self.sel is None:
            assert q.dtype == torch.bfloat16 and q.shape[1] == k.shape[1]
            self.sel = fla_selection(q, k, kw["block_size"], kw["block_counts"])
        TQ, TK = q.shape[1], k.shape[1]
        return nsa_op(q, k, v, *args, block_indices=self.sel[:, TK - TQ:TK], **kw)

    def decode(self, q, kv, kv_means, pos, gates, *args, **kw):
        """The graph-safe one-token decode path, fed the recorded selection of its position."""
        t = int(pos)
        return nsa_decode_op(q, kv, kv_means, pos, gates, *args, block_indices=self.sel[:, t:t + 1], **kw)


def mixer_pair(seed=0):
    """The mixer on FLA (float32 weights, bf16 autocast) and a float64 copy on the PyTorch backend."""
    torch.manual_seed(seed)
    m = nsa_mixer.NativeSparseAttention(GPTConfig(mixer="nsa", n_embd=C, n_head=HQ, mixer_args=ARGS,
                                                  backend="fla"), 0).cuda()
    ref = nsa_mixer.NativeSparseAttention(GPTConfig(mixer="nsa", n_embd=C, n_head=HQ, mixer_args=ARGS,
                                                    backend="torch"), 0).cuda().double()
    ref.load_state_dict(m.state_dict())
    return m, ref


def out_and_dx(fn, x, dy):
    """y = fn(x) and d(sum(y * dy))/dx, the loss formed in x's dtype."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y.to(x.dtype) * dy.to(x.dtype)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("T", [63, 256, 1000])
def test_fla_mixer_matches_float64_torch(T, monkeypatch):
    m, ref = mixer_pair(T)
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(2, T, C, device="cuda", generator=g)
    dy = torch.randn(2, T, C, device="cuda", generator=g)

    def fla_fwd(z):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(z)[0]

    # free selections first (information only), then both sides on FLA's selection
    y_free, dx_free = out_and_dx(fla_fwd, x, dy)
    y_ref_free, dx_ref_free = out_and_dx(lambda z: ref(z)[0], x.double(), dy)
    shared = SharedSelection()
    monkeypatch.setattr(nsa_mixer, "nsa", shared)
    y, dx = out_and_dx(fla_fwd, x, dy)
    y_ref, dx_ref = out_and_dx(lambda z: ref(z)[0], x.double(), dy)
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref)}
    print(f"T={T}: shared selection y={errs['y']:.2e} dx={errs['dx']:.2e}; own selections "
          f"y={rel_err(y_free, y_ref_free):.2e} dx={rel_err(dx_free, dx_ref_free):.2e}")
    assert y.dtype == torch.bfloat16  # FLA ran (backend='fla' raises rather than fall back)
    for name, e in errs.items():
        assert e <= 1e-2, (name, e)


@pytest.mark.parametrize("split", [1, 40, 200])
def test_gpu_decode_equals_forward(split, monkeypatch):
    """Prefill (FLA) + decode steps (PyTorch op on the bf16 cache) == the FLA forward, bf16 tolerance."""
    T = 256
    m, _ = mixer_pair(split)
    shared = SharedSelection()
    monkeypatch.setattr(nsa_mixer, "nsa", shared)
    monkeypatch.setattr(nsa_mixer, "nsa_decode", shared.decode)
    x = torch.randn(2, T, C, device="cuda", generator=torch.Generator(device="cuda").manual_seed(split))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x)[0]
        st = m.init_state(2, T, "cuda", torch.bfloat16)
        outs = [m(x[:, :split], st)[0]] + [m(x[:, t:t + 1], st)[0] for t in range(split, T)]
    err = rel_err(torch.cat(outs, 1), ref)
    print(f"split={split}: decode vs forward rel err {err:.2e}")
    assert st.pos == T and err <= 1e-2


def test_gpt_with_nsa_config_trains_a_step_on_fla():
    """configs/nsa.toml's model (16 query heads, 1 KV head) runs forward + backward on FLA under autocast."""
    from attnbench.resolve import load_config

    cfg = load_config("nsa").model
    cfg.backend, cfg.dropout = "fla", 0.0
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
