"""FLA's NSA path (parallel_nsa + parallel_attn for the window) against the float64 PyTorch oracle.

The oracle is `nsa_torch` in float64 on the GPU (itself checked against the literal `nsa_reference` on
the CPU in tests/ops/test_nsa_ops.py), fed with the bf16-rounded inputs. The top-k selection is a
discontinuous function: bf16 rounding inside FLA's kernels (bf16 pooled keys, bf16 q*scale) can flip
near-ties between blocks, and one flipped block changes a row's output by O(1). So the output and
gradient comparison feeds the oracle FLA's own selection (`block_indices`, computed by the same FLA
calls parallel_nsa makes), and a separate check shows the selections agree except on near-ties.
"""
from __future__ import annotations

import pytest
import torch

from attnbench.errors import AttnbenchError
from attnbench.ops.backend import fla_available
from attnbench.ops.nsa import nsa, nsa_select_blocks, nsa_torch
from helpers import fla_selection, out_and_grads, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not fla_available(), reason="needs CUDA and fla"),
]

B, H, HQ, D, W = 2, 1, 16, 64, 64


def make_inputs(T, hq=HQ, h=H, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, hq, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(B, T, h, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(B, T, h, D, generator=g, device="cuda").to(dtype)
    gates = [torch.sigmoid(torch.randn(B, T, hq, generator=g, device="cuda")).to(dtype) for _ in range(3)]
    return [q, k, v, *gates]


def as_sets(block_indices: torch.Tensor) -> torch.Tensor:
    """Selections compared as sets: sort each row (unused -1 slots first)."""
    return block_indices.long().sort(-1).values


NAMES = ["o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"]


@pytest.mark.parametrize("T,BS,S", [(63, 32, 4), (63, 64, 16), (256, 32, 4), (256, 64, 16),
                                    (1000, 32, 4), (1000, 64, 16), (1000, 32, 16)])
def test_fla_matches_float64_oracle(T, BS, S):
    inputs = make_inputs(T, seed=T + BS + S)
    do = torch.randn(B, T, HQ, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    do = do.bfloat16()
    kw = dict(block_size=BS, block_counts=S, window_size=W)
    o, grads = out_and_grads(nsa, inputs, do, backend="fla", **kw)
    assert o.dtype == torch.bfloat16
    sel = fla_selection(inputs[0], inputs[1], BS, S)
    o_ref, grads_ref = out_and_grads(nsa_torch, [x.double() for x in inputs], do.double(), block_indices=sel, **kw)
    errs = {n: rel_err(a, r) for n, a, r in zip(NAMES, (o, *grads), (o_ref, *grads_ref))}
    print(f"T={T} BS={BS} S={S}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    for n, e in errs.items():
        assert e <= 1e-2, (n, e)


@pytest.mark.parametrize("T,BS,S", [(256, 32, 4), (1000, 32, 4), (1000, 64, 16), (1000, 32, 16)])
def test_fla_selection_agrees_up_to_near_ties(T, BS, S):
    """FLA's top-k equals ours on the bf16-rounded inputs, except where the importance gap between the
    blocks that differ is within bf16 rounding of the scores."""
    q, k = make_inputs(T, seed=T + BS + S)[:2]
    sel = as_sets(fla_selection(q, k, BS, S))
    ours = as_sets(nsa_select_blocks(q.double(), k.double(), BS, S))
    same = (sel == ours).all(-1)
    print(f"T={T} BS={BS} S={S}: {same.float().mean().item():.4f} of {same.numel()} rows select the same set")
    assert same.float().mean() >= 0.98  # 0.996-1.0 on an H200
    # For every differing row: the importance (float64) of what FLA kept instead of ours is close.
    qd, kd = q.double(), k.double()
    NF = T // BS
    kc = kd[:, :NF * BS].reshape(B, NF, BS, H, D).mean(2)
    s = torch.einsum("bthd,bchd->bthc", qd, kc.repeat_interleave(HQ // H, 2)) * D ** -0.5
    t = torch.arange(T, device="cuda")
    vis = (torch.arange(NF, device="cuda")[None] + 1) * BS - 1 <= t[:, None]
    p = torch.softmax(s.masked_fill(~vis[None, :, None], float("-inf")), -1).nan_to_num(0.0)
    imp = p.reshape(B, T, H, HQ // H, NF).sum(3)  # [B, T, H, NF]
    imp = torch.cat([imp, imp.new_zeros(B, T, H, 1)], -1)  # index -1 (an unused slot) has importance 0
    worst = 0.0
    for b, i, h in (~same).nonzero().tolist():
        mine, theirs = set(ours[b, i, h].tolist()), set(sel[b, i, h].tolist())
        lo = min(imp[b, i, h, c].item() for c in mine - theirs)  # the weakest block only we kept
        hi = max(imp[b, i, h, c].item() for c in theirs - mine)  # the strongest block only FLA kept
        assert hi <= lo, (b, i, h, mine, theirs, lo, hi)  # ours is the exact top-k in float64
        worst = max(worst, (lo - hi) / lo)
    print(f"   worst relative importance gap on differing rows: {worst:.2e}")
    assert worst <= 1e-2  # <= 2e-4 on an H200


def test_torch_decode_continues_fla_full_pass():
    """The mixer trains/prefills on FLA (TQ == TK) and decodes on the torch path (TQ < TK): same rows."""
    T, BS, S = 300, 32, 4
    q, k, v, *gates = make_inputs(T, seed=9)
    kw = dict(block_size=BS, block_counts=S, window_size=W)
    full = nsa(q, k, v, *gates, backend="fla", **kw)
    sel = fla_selection(q, k, BS, S)
    for t in (0, 31, 32, 100, 299):
        sl = slice(t, t + 1)
        o = nsa(q[:, sl], k[:, :t + 1], v[:, :t + 1], *[g[:, sl] for g in gates], block_indices=sel[:, sl], **kw)
        assert rel_err(o[:, 0], full[:, t]) <= 1e-2, t


@pytest.mark.parametrize("window", [1, 64, 300])
def test_parallel_attn_window_semantics(window):
    """fla.ops.attn.parallel_attn(window_size=W) attends to keys j in [i-W+1, i] (causal, grouped heads)."""
    from fla.ops.attn import parallel_attn

    T = 300
    q, k, v = make_inputs(T, seed=window)[:3]
    o = parallel_attn(q, k, v, scale=D ** -0.5, window_size=window)
    i, j = torch.arange(T, device="cuda")[:, None], torch.arange(T, device="cuda")[None]
    mask = (j <= i) & (j > i - window)
    kk, vv = (x.double().repeat_interleave(HQ // H, 2).transpose(1, 2) for x in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double().transpose(1, 2), kk, vv, attn_mask=mask)
    assert rel_err(o, ref.transpose(1, 2)) <= 1e-2


def test_unsupported_falls_back_or_raises():
    # group size 2 is below FLA's minimum of 16: 'auto' runs the torch path, 'fla' refuses
    inputs = make_inputs(100, hq=4, h=2, seed=3)
    kw = dict(block_size=32, block_counts=4, window_size=W)
    assert torch.equal(nsa(*inputs, **kw), nsa_torch(*inputs, **kw))
    with pytest.raises(AttnbenchError, match="group size"):
        nsa(*inputs, **kw, backend="fla")
    # decode (TQ != TK) also falls back
    q, k, v, *gates = make_inputs(100, seed=4)
    one = [g[:, -1:] for g in gates]
    assert torch.equal(nsa(q[:, -1:], k, v, *one, **kw), nsa_torch(q[:, -1:], k, v, *one, **kw))
    # block_counts < 4: FLA breaks the tie among the three forced blocks differently (fla_supported)
    with pytest.raises(AttnbenchError, match="block_counts"):
        nsa(*make_inputs(100, seed=6), block_size=32, block_counts=2, window_size=W, backend="fla")
    # float32 is not a kernel dtype here
    with pytest.raises(AttnbenchError, match="dtypes"):
        nsa(*[x.float() for x in make_inputs(64, seed=5)], **kw, backend="fla")
