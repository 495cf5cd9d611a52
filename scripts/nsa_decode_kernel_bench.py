"""Time NSA's Triton decode kernel alone, in its variants, on a CUDA GPU: six calls (the bake-off model's six layers)
captured in one CUDA graph, replayed many times; microseconds per call. Shows where a decode step's time
goes at each context length, against a graph of six one-element adds (the floor per graph node).

    python scripts/nsa_decode_kernel_bench.py [--lens 1024,4096,16384] [--reps 2000]
"""
from __future__ import annotations

import argparse

import torch

from attnbench.ops import nsa_decode_triton as ndt
from attnbench.ops.nsa import nsa_cache_means

VARIANTS = {  # name -> nsa_decode_triton keyword arguments
    "default": {},
    "one chosen block per gather": dict(sel_gather=1),
    "split tiles of 32": dict(block_nb=32),
    "split tiles of 128": dict(block_nb=128),
    "16 tiles' partials per load": dict(block_split=16),
}


def per_call_us(fn, reps: int, calls: int = 6) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(50):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps // 5):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps // 5) / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="1024,4096,16384")
    ap.add_argument("--reps", type=int, default=2000)
    a = ap.parse_args()
    one = torch.zeros(1, device="cuda")
    print(f"floor: one-element add per graph node {per_call_us(lambda: one.add_(1), a.reps):.2f} us")
    torch.manual_seed(0)
    for T in (int(x) for x in a.lens.split(",")):
        L = T + 64
        kv = torch.zeros(2, 1, 1, L, 64, dtype=torch.bfloat16, device="cuda")
        kv[:, :, :, :T] = torch.randn(2, 1, 1, T, 64, device="cuda").bfloat16()
        means = nsa_cache_means(kv, 32)
        q = torch.randn(1, 1, 16, 64, device="cuda").bfloat16()
        gates = torch.rand(1, 1, 16, 3, device="cuda").bfloat16()
        pos = torch.tensor([T - 1], device="cuda")
        for name, kw in VARIANTS.items():
            us = per_call_us(lambda: ndt.nsa_decode_triton(q, kv, means, pos, gates, 32, 4, 64, 64 ** -0.5, **kw),
                             a.reps)
            print(f"prompt {T:>6}  NB {means.shape[3]:>4}  {name:<32} {us:6.2f} us/call")


if __name__ == "__main__":
    main()
