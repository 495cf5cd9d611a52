"""`attnbench bench` on a CUDA GPU: graph-captured decode replays the eager step exactly and is faster;
a real out-of-memory error is a row and leaves the process usable; the CLI writes valid rows.

Shapes are the parameter-matched ones (10.7M) the benchmark uses, so these also smoke-test the real run.
"""
from __future__ import annotations

import json

import pytest
import torch

from attnbench import mixers
from attnbench.bench import decode_graph, latency, memory
from attnbench.bench.rows import base_row
from attnbench.bench.shapes import bench_config, build_model, resolve_shapes
from attnbench.bench.timing import precision
from attnbench.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Mixers whose decode step is graph-safe (in-place state, device-side position); NSA's is not (yet).
GRAPH_SAFE = mixers.available()  # the mixer contract: every decode step captures in a CUDA graph


@pytest.fixture(scope="module")
def shapes():
    return {s.mixer: s for s in resolve_shapes()}


def _latency_rows(shape, P=512, steps=30):
    opts = latency.LatencyOptions(prompt_lens=[P], decode_steps=steps, decode_warmup=5, prefill_repeats=2,
                                  prefill_warmup=1, cuda_graph=True)
    cfg = bench_config(shape.cfg, P + opts.decode_budget())
    prec = precision("auto", "cuda", inference=True)
    model = prec.prepare(build_model(cfg, "cuda")).eval()
    base = base_row("latency", shape, cfg, model.num_params(), "cuda", prec)
    return latency.measure_prompt(model, P, opts, "cuda", prec, base)


@pytest.mark.parametrize("mixer", mixers.available())
def test_graph_decode(mixer, shapes):
    rows = _latency_rows(shapes[mixer])
    eager = next(r for r in rows if r.get("mode") == "eager")
    graph = next(r for r in rows if r.get("mode") == "cuda_graph")
    print(f"{mixer}: eager {eager['median']:.3f} ms/token, graph {graph['median']} ms/token "
          f"({graph['cuda_graph_reason'] or 'verified, rel err %s' % graph['graph_verify_rel_err']}); "
          f"backends {eager['backend_ops']}")
    assert eager["mixer_tokens_per_decode_step"] == 1 and eager["median"] > 0
    assert graph["cuda_graph"] is True, graph["cuda_graph_reason"]
    assert graph["graph_verify_rel_err"] <= decode_graph.VERIFY_TOL
    assert graph["median"] < eager["median"]


def test_real_oom_is_a_row_and_the_process_stays_usable(shapes):
    cfg = bench_config(shapes["softmax"].cfg, 0)
    prec = precision("auto", "cuda", inference=False)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    r = memory.measure_in_process(cfg, 2**23, 16, "cuda", prec)  # the embedding output alone is > 200 GB
    assert r["oom"] is True and "OutOfMemoryError" in r["error"]
    assert memory.LAST_MODEL() is None
    assert torch.cuda.memory_allocated() - before < 2**20, "memory of the failed step was not released"
    r = memory.measure_in_process(cfg, 1024, 4, "cuda", prec)
    assert r["oom"] is False and r["peak_mb"] > 0 and r["step_s"] > 0


def test_cli_on_cuda_writes_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    rc = main(["bench", "all", "--device", "cuda", "--mixers", ",".join(mixers.available()),
               "--prompt_lens", "128,2048", "--decode_steps", "20", "--start", "1024", "--max_len", "4096",
               "--contexts", "256,1024", "--tokens_per_batch", "8192", "--steps", "2", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["bench"] for r in rows} == {"latency", "memory", "throughput"}
    for r in rows:
        assert r["device"] == "cuda" and r["error"] is None, r
    for r in rows:
        if r["bench"] == "latency" and r["metric"] == "decode_ms_per_token":
            # the cached path hands each mixer one token per step; the 'recompute' rows are the seed's
            # uncached method, measured for comparison (prompt + 1 tokens per step)
            want = r["context"] + 1 if r.get("mode") == "recompute" else 1
            assert r["mixer_tokens_per_decode_step"] == want, r
        if r["bench"] == "throughput" and r["metric"] == "train_tokens_per_s":
            assert r["cuda_graph"] is True, r["cuda_graph_reason"]  # the default on CUDA: steps replayed
        if r["bench"] == "memory" and r["metric"] == "peak_memory_mb":
            assert not r["oom"] and r["value"] > 0


@pytest.mark.parametrize("mixer", [m for m in ("gated_deltanet", "softmax") if m in GRAPH_SAFE])
def test_compiled_graph_decode(mixer, shapes):
    """`bench latency --compile`: the torch.compile'd step in a graph; fused kernels should be faster still."""
    shape = shapes[mixer]
    P = 512
    opts = latency.LatencyOptions(prompt_lens=[P], decode_steps=50, decode_warmup=5, prefill_repeats=1,
                                  prefill_warmup=0, cuda_graph=True, compile=True)
    cfg = bench_config(shape.cfg, P + opts.decode_budget())
    prec = precision("auto", "cuda", inference=True)
    model = prec.prepare(build_model(cfg, "cuda")).eval()
    base = base_row("latency", shape, cfg, model.num_params(), "cuda", prec)
    torch._dynamo.reset()
    rows = latency.measure_prompt(model, P, opts, "cuda", prec, base)
    graph = next(r for r in rows if r.get("mode") == "cuda_graph")
    print(f"{mixer}: compiled graph {graph['median']} ms/token, compiled={graph['compiled']}, "
          f"compile_error={graph['compile_error']}, verify rel err {graph['graph_verify_rel_err']}")
    assert graph["cuda_graph"] is True, graph["cuda_graph_reason"]
    assert graph["compiled"] is True, graph["compile_error"]
    assert graph["graph_verify_rel_err"] <= decode_graph.VERIFY_TOL_COMPILED
