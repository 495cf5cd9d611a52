"""`attnbench bench latency|memory|throughput|all`: options, defaults per device, dispatch."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path

from ..errors import AttnbenchError
from ..ops import fla_preload
from . import latency, memory, throughput
from ..counts import parse_count
from .common import (DEFAULT_BUDGET, RowWriter, parse_int_list, print_table, resolve_device,
                     resolve_shapes)

log = logging.getLogger("attnbench.bench")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and output")
    g.add_argument("--mixers", default=None, help="comma-separated mixers (default: every registered mixer)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--json", default=None, metavar="FILE", help="append one JSON row per measurement to FILE")
    g.add_argument("--budget", default=DEFAULT_BUDGET,
                   help="parameter budget for the matched shapes (attnbench.params), e.g. 10.7M")
    g.add_argument("--no_match", action="store_true",
                   help="use configs/<mixer>.toml shapes instead of parameter matching")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model key for every mixer (n_layer=2) or one mixer's mixer_args "
                        "(nsa.block_size=16); repeatable")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "autocast"],
                   help="auto: float32 on the CPU; on CUDA bf16 weights for latency, bf16 autocast for training")
    g.add_argument("--wait_for", default=None, metavar="FILE",
                   help="start up (imports, shapes, options; with CUDA also FLA's import), then wait until FILE "
                        "exists before using the device: a sweep starts the next benchmark so while one measures")


def _latency_opts(p: argparse.ArgumentParser, with_batch: bool = True) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--prompt_lens", default=None, help="comma-separated (GPU default 128,1024,4096,16384; CPU 64,256,1024)")
    if with_batch:
        g.add_argument("--batch", type=int, default=None, help="sequences decoded together (default 1)")
    g.add_argument("--decode_steps", type=int, default=None, help="timed decode steps (GPU 100, CPU 20)")
    g.add_argument("--decode_warmup", type=int, default=None, help="untimed decode steps first (GPU 10, CPU 3)")
    g.add_argument("--prefill_repeats", type=int, default=None, help="timed prefills (GPU 5, CPU 3)")
    g.add_argument("--recompute_steps", type=int, default=None,
                   help="timed tokens of the seed's uncached decoding (each re-runs the whole context) for "
                        "comparison; 0 skips it (default 3)")


def _memory_opts(p: argparse.ArgumentParser, with_batch: bool = True) -> None:
    g = p.add_argument_group("memory")
    if with_batch:
        g.add_argument("--batch", type=int, default=None, help="sequences per training step (default 4)")
    g.add_argument("--start", type=parse_count, default=256, help="first context length (doubles from here)")
    g.add_argument("--max_len", type=parse_count, default=None, help="largest context tried (GPU 1Mi, CPU 2048)")
    g.add_argument("--tol", type=float, default=0.1, help="bisect the threshold until first_oom/fits <= 1 + tol")
    g.add_argument("--time_budget_s", type=float, default=None,
                   help="per mixer: stop growing the context once the steady step time spent plus the next step's "
                        "would overrun it (GPU 60, CPU 300)")
    g.add_argument("--simulate_oom_above", type=parse_count, default=None,
                   help="raise torch.OutOfMemoryError inside the forward above this context (testing)")
    g.add_argument("--no_isolate", action="store_true",
                   help="CPU: measure in this process (peak RSS is then a process-lifetime maximum)")


def _throughput_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("throughput")
    g.add_argument("--contexts", default=None, help="comma-separated context lengths (GPU 256..65536, CPU 64..512)")
    g.add_argument("--tokens_per_batch", type=parse_count, default=None, help="GPU 65536 (64 x 1024), CPU 2048")
    g.add_argument("--steps", type=int, default=None, help="timed training steps per context (GPU 5, CPU 2)")
    g.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (GPU 2, CPU 1)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (in `bench all` also the CUDA-graph decode step of latency)")


def _cuda_graph_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda_graph", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="CUDA graphs (auto: on for CUDA): latency captures the decode step (a mixer whose step is "
                        "not graph-safe gets cuda_graph=false and the reason); throughput captures the whole "
                        "training step as train.cuda_graph does")


def _compile_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step captured in the CUDA graph (compiles once per mixer "
                        "and prompt length: slow to start)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, memory and throughput benchmarks",
                       description="Benchmarks of parameter-matched models (random weights). Each prints a table "
                                   "and appends one JSON row per measurement to --json FILE.")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, adders, helptext in (
            ("latency", [_latency_opts, _cuda_graph_opt, _compile_opt], "prefill time and decode time per token from the mixer's state"),
            ("memory", [_memory_opts], "peak memory of a training step per context, up to out of memory"),
            ("throughput", [_throughput_opts, _cuda_graph_opt], "training tokens/s per context; crossovers vs softmax"),
            ("all", [], "latency, throughput and memory (in that order) with their defaults (no --batch)")):
        q = bsub.add_parser(name, help=helptext, description=helptext)
        _common(q)
        if name == "all":
            _latency_opts(q, with_batch=False)
            _memory_opts(q, with_batch=False)
            _throughput_opts(q)
            _cuda_graph_opt(q)
        for add in adders:
            add(q)
        q.set_defaults(func=run_cli)


def _pick(v, default):
    return default if v is None else v


def _use_cuda_graph(a: argparse.Namespace, device: str) -> bool:
    """--cuda_graph auto|on|off -> whether to capture (on without CUDA is an error)."""
    if a.cuda_graph == "on" and device != "cuda":
        raise AttnbenchError("--cuda_graph needs --device cuda")
    return device == "cuda" and a.cuda_graph != "off"


def latency_options(a: argparse.Namespace, device: str) -> latency.LatencyOptions:
    o = latency.LatencyOptions.defaults(device)
    o.prompt_lens = parse_int_list(a.prompt_lens) or o.prompt_lens
    o.batch = _pick(getattr(a, "batch", None), o.batch)
    o.decode_steps = _pick(a.decode_steps, o.decode_steps)
    o.decode_warmup = _pick(a.decode_warmup, o.decode_warmup)
    o.prefill_repeats = _pick(a.prefill_repeats, o.prefill_repeats)
    o.recompute_steps = _pick(a.recompute_steps, o.recompute_steps)
    o.cuda_graph = _use_cuda_graph(a, device)
    if a.bench == "latency" and a.compile and (device != "cuda" or a.cuda_graph == "off"):
        raise AttnbenchError("--compile compiles the CUDA-graph decode step: it needs --device cuda and CUDA graphs "
                             "(drop --cuda_graph off, or drop --compile)")
    o.compile = a.compile and o.cuda_graph
    o.dtype = a.dtype
    return o


def memory_options(a: argparse.Namespace, device: str) -> memory.MemoryOptions:
    o = memory.MemoryOptions.defaults(device)
    o.batch = _pick(getattr(a, "batch", None), o.batch)
    o.start, o.tol = a.start, a.tol
    o.max_len = _pick(a.max_len, o.max_len)
    o.time_budget_s = _pick(a.time_budget_s, o.time_budget_s)
    o.simulate_oom_above = a.simulate_oom_above
    o.isolate = device == "cpu" and not a.no_isolate
    o.dtype = a.dtype
    if o.start < 1 or o.max_len < o.start:
        raise AttnbenchError(f"--start {o.start} / --max_len {o.max_len}: need 1 <= start <= max_len")
    return o


def throughput_options(a: argparse.Namespace, device: str) -> throughput.ThroughputOptions:
    o = throughput.ThroughputOptions.defaults(device)
    o.contexts = parse_int_list(a.contexts) or o.contexts
    o.tokens_per_batch = _pick(a.tokens_per_batch, o.tokens_per_batch)
    o.steps = _pick(a.steps, o.steps)
    o.warmup_steps = _pick(a.warmup_steps, o.warmup_steps)
    o.compile, o.dtype = a.compile, a.dtype
    o.cuda_graph = _use_cuda_graph(a, device)
    return o


def run_cli(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    mixers = [m.strip() for m in a.mixers.split(",") if m.strip()] if a.mixers else None
    shapes = resolve_shapes(mixers, a.budget, match=not a.no_match, sets=a.set)
    for s in shapes:
        print(f"bench {s.mixer}: n_layer={s.cfg.n_layer} n_embd={s.cfg.n_embd} n_head={s.cfg.n_head} "
              f"mixer_args={s.cfg.mixer_args} ({s.source})", flush=True)
    # memory last: it drives the GPU into out-of-memory on purpose
    todo = ["latency", "throughput", "memory"] if a.bench == "all" else [a.bench]
    makers = {"latency": (latency_options, latency.run), "memory": (memory_options, memory.run),
              "throughput": (throughput_options, throughput.run)}
    opts = {name: makers[name][0](a, device) for name in todo}  # every option error before any work
    if a.wait_for:
        wait_for_go(Path(a.wait_for), device)
    writer = RowWriter(a.json)
    t0 = time.perf_counter()
    if device == "cuda":  # compile the mixers' FLA kernels in threads first (off: ATTNBENCH_FLA_PRELOAD=0)
        for s in shapes:
            if (done := fla_preload.preload_for_run(s.mixer, "bench")) is not None:
                print(f"bench {s.mixer}: preloaded {done['kernels']} FLA kernels in {done['seconds']} s", flush=True)
    # ATTNBENCH_FLA_CAPTURE=DIR: keys and kernels are saved per mixer, so one mixer per process (as sweeps run)
    capture = fla_preload.capturing(shapes[0].mixer, "bench") if len(shapes) == 1 else contextlib.nullcontext()
    if len(shapes) > 1 and os.environ.get(fla_preload.CAPTURE_ENV):
        print(f"{fla_preload.CAPTURE_ENV} ignored: it captures one mixer per bench process (--mixers M)", flush=True)
    with capture:
        for name in todo:
            t = time.perf_counter()
            makers[name][1](shapes, device, opts[name], writer)
            print(f"[bench {name}: {time.perf_counter() - t:.1f} s]", flush=True)
    if len(todo) > 1:
        print_summary(writer.rows)
    if a.json:
        print(f"{len(writer.rows)} rows appended to {a.json} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


def wait_for_go(go: Path, device: str, poll_s: float = 0.01) -> None:
    """The start-up that touches no GPU is done (on CUDA also FLA's import: FLA imports transformers and
    parts of torch._dynamo, which took several seconds per process on the H200 host); now wait for `go`.
    A sweep starts the next benchmark process this way while the previous one measures: that process
    never shares the GPU with it, and the imports (one CPU core) are off the critical path."""
    if device == "cuda":
        from ..ops.backend import fla_available

        fla_available()  # installs the saved FLA autotuner choices first, then imports FLA
    print(f"bench: started up; waiting for {go}", flush=True)
    t = time.perf_counter()
    while not go.exists():
        time.sleep(poll_s)
    print(f"bench: go after {time.perf_counter() - t:.1f} s of waiting", flush=True)


def print_summary(rows: list[dict]) -> None:
    """One line per mixer with the headline numbers of `bench all` (decode at the shortest and longest
    prompt, graph where it ran, and their ratio; the memory threshold; the crossover vs softmax)."""
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    dec = [r for r in rows if r["metric"] == "decode_ms_per_token" and r["value"] is not None]
    Ps = sorted({r["context"] for r in dec})
    body = []
    for m in mixers:
        def decode(P):
            rs = [r for r in dec if r["mixer"] == m and r["context"] == P and r.get("mode") != "recompute"]
            g = [r for r in rs if r.get("cuda_graph")]
            return (g or rs or [{}])[0].get("value")
        lo, hi = (decode(Ps[0]), decode(Ps[-1])) if Ps else (None, None)
        thr = next((r for r in rows if r["mixer"] == m and r["metric"] == "oom_threshold"), {})
        cross = next((r for r in rows if r["mixer"] == m and r["metric"] == "crossover_context"), {})
        graphs = any(r.get("cuda_graph") for r in dec if r["mixer"] == m)
        body.append([m, next((r["n_params"] for r in rows if r["mixer"] == m), None), lo, hi,
                     (hi / lo) if (lo and hi) else None, "yes" if graphs else "no",
                     thr.get("value"), thr.get("limited_by"), cross.get("value")])
    p0, p1 = (Ps[0], Ps[-1]) if Ps else ("-", "-")
    print_table("summary", ["mixer", "params", f"decode ms/tok P={p0}", f"P={p1}", "ratio", "graph",
                            "trains at context", "limited by", "overtakes softmax at"], body)
