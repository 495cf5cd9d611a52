"""NSA's Triton decode kernel on a CUDA GPU: equal to the PyTorch step at the bake-off's shapes, taken by the
decode dispatcher (recorded as 'triton'), and replayable from a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from attnbench.ops import nsa as nsa_ops
from attnbench.ops import nsa_decode_triton as ndt
from attnbench.ops.backend import record_backends
from attnbench.ops.nsa import nsa_decode
from helpers import nsa_random_cache, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not ndt.available(), reason="needs triton")]


def bakeoff_cache(L: int, T: int):
    return nsa_random_cache(L, T, device="cuda")


@pytest.mark.parametrize("gather", [None, 1], ids=["one-gather", "one-block-per-gather"])
@pytest.mark.parametrize("L,T", [(1100, 1024), (16448, 16384)])
def test_kernel_equals_the_pytorch_step_on_the_gpu(L, T, gather):
    kv, means = bakeoff_cache(L, T)
    for t in (0, 31, 32, T // 2, T - 1):
        q = torch.randn(1, 1, 16, 64, device="cuda").bfloat16()
        gates = torch.rand(1, 1, 16, 3, device="cuda").bfloat16()
        pos = torch.tensor([t], device="cuda")
        ref = nsa_decode(q.double(), kv.double(), means.double(), pos, gates.double(), 32, 4, 64, backend="torch")
        got = ndt.nsa_decode_triton(q, kv, means, pos, gates, 32, 4, 64, 64 ** -0.5, sel_gather=gather)
        print(f"L={L} t={t}: {rel_err(got, ref):.2e}")
        assert rel_err(got, ref) < 1e-2


def test_dispatcher_takes_the_kernel_and_a_graph_replays_it(monkeypatch):
    monkeypatch.setattr(nsa_ops, "_TRITON_DECODE_OK", {})
    kv, means = bakeoff_cache(1100, 1024)
    q = torch.randn(1, 1, 16, 64, device="cuda").bfloat16()
    gates = torch.rand(1, 1, 16, 3, device="cuda").bfloat16()
    pos = torch.tensor([700], device="cuda")
    with record_backends() as seen:
        eager = nsa_decode(q, kv, means, pos, gates, 32, 4, 64)
    assert seen == {"nsa_decode": "triton"} and list(nsa_ops._TRITON_DECODE_OK.values()) == [True]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nsa_decode(q, kv, means, pos, gates, 32, 4, 64)
    pos.fill_(1000)
    graph.replay()
    ref = nsa_decode(q, kv, means, pos, gates, 32, 4, 64, backend="torch")
    assert rel_err(out, ref) < 1e-2 and not torch.equal(out, eager)  # the replay read the new position


def test_split_replays_from_a_graph_at_16k():
    """At 16k the compressed pass is split over a second launch: replayed from a CUDA graph at positions on
    both sides of the split's tiles it matches the PyTorch step."""
    kv, means = bakeoff_cache(16448, 16384)
    q = torch.randn(1, 1, 16, 64, device="cuda").bfloat16()
    gates = torch.rand(1, 1, 16, 3, device="cuda").bfloat16()
    pos = torch.tensor([16383], device="cuda")
    ndt.nsa_decode_triton(q, kv, means, pos, gates, 32, 4, 64, 64 ** -0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ndt.nsa_decode_triton(q, kv, means, pos, gates, 32, 4, 64, 64 ** -0.5)
    for t in (16383, 40, 9000, 16383):
        pos.fill_(t)
        graph.replay()
        ref = nsa_decode(q.double(), kv.double(), means.double(), pos, gates.double(), 32, 4, 64, backend="torch")
        assert rel_err(out, ref) < 1e-2, t
