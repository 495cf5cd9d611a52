"""`attnbench bench latency|memory|throughput|all`: the parsers (built from bench/options.py), the
options filled in with each device's defaults, and the run of the benchmarks."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..counts import parse_count
from ..errors import AttnbenchError, ConfigError
from ..ops import fla_preload
from ..ops.backend import fla_available
from . import latency, memory, throughput
from .options import (BENCH_ARGS, LatencyArgs, MemoryArgs, SharedArgs, TargetArgs, ThroughputArgs, from_namespace,
                      groups, parse_counts)
from .rows import RowWriter, print_table
from .shapes import resolve_shapes
from .timing import resolve_device

log = logging.getLogger("attnbench.bench")


def _arg_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser raising ConfigError (argparse reports ArgumentTypeError cleanly)."""
    def read(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = name
    return read


_TYPES = {"int": int, "float": float, "count": _arg_type(parse_count, "count"),
          "counts": _arg_type(parse_counts, "counts"), "str": None}


def add_option(group: argparse._ActionsContainer, f: dataclasses.Field) -> None:
    """One dataclass field of bench/options.py as one argparse option."""
    meta = f.metadata
    kw: dict[str, Any] = {"help": meta["help"]}
    if meta["kind"] == "flag":
        kw["action"] = "store_true"
    elif meta["kind"] == "repeat":
        kw.update(action="append", default=[])
    else:
        kw.update(default=f.default, type=_TYPES[meta["kind"]])
        kw.update({k: meta[k] for k in ("choices", "nargs", "const") if k in meta})
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    group.add_argument(f"--{f.name}", **kw)


_HELP = {"latency": "prefill time and decode time per token from the mixer's state",
         "memory": "peak memory of a training step per context, up to out of memory",
         "throughput": "training tokens/s per context; crossovers vs softmax",
         "all": "latency, throughput and memory (in that order) with their defaults (no --batch)"}


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, memory and throughput benchmarks",
                       description="Benchmarks of parameter-matched models (random weights). Each prints a table "
                                   "and appends one JSON row per measurement to --json FILE.")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, helptext in _HELP.items():
        q = bsub.add_parser(name, help=helptext, description=helptext)
        for title, fields in groups(name):
            g = q.add_argument_group(title)
            for f in fields:
                add_option(g, f)
        q.set_defaults(func=run_cli)


def _pick(v, default):
    return default if v is None else v


def _use_cuda_graph(setting: str, device: str) -> bool:
    """--cuda_graph auto|on|off -> whether to capture (on without CUDA is an error)."""
    if setting == "on" and device != "cuda":
        raise AttnbenchError("--cuda_graph needs --device cuda")
    return device == "cuda" and setting != "off"


def latency_options(a: LatencyArgs, shared: SharedArgs, device: str, bench: str) -> latency.LatencyOptions:
    o = latency.LatencyOptions.defaults(device)
    o.prompt_lens = a.prompt_lens or o.prompt_lens
    o.batch = _pick(a.batch, o.batch)
    o.decode_steps = _pick(a.decode_steps, o.decode_steps)
    o.decode_warmup = _pick(a.decode_warmup, o.decode_warmup)
    o.prefill_repeats = _pick(a.prefill_repeats, o.prefill_repeats)
    o.recompute_steps = _pick(a.recompute_steps, o.recompute_steps)
    o.cuda_graph = _use_cuda_graph(a.cuda_graph, device)
    if bench == "latency" and a.compile and (device != "cuda" or a.cuda_graph == "off"):
        raise AttnbenchError("--compile compiles the CUDA-graph decode step: it needs --device cuda and CUDA graphs "
                             "(drop --cuda_graph off, or drop --compile)")
    o.compile = a.compile and o.cuda_graph
    o.dtype = shared.dtype
    return o


def memory_options(a: MemoryArgs, shared: SharedArgs, device: str, bench: str) -> memory.MemoryOptions:
    o = memory.MemoryOptions.defaults(device)
    o.batch = _pick(a.batch, o.batch)
    o.start, o.tol = a.start, a.tol
    o.max_len = _pick(a.max_len, o.max_len)
    o.time_budget_s = _pick(a.time_budget_s, o.time_budget_s)
    o.simulate_oom_above = a.simulate_oom_above
    o.isolate = device == "cpu" and not a.no_isolate
    o.dtype = shared.dtype
    if o.start < 1 or o.max_len < o.start:
        raise AttnbenchError(f"--start {o.start} / --max_len {o.max_len}: need 1 <= start <= max_len")
    return o


def throughput_options(a: ThroughputArgs, shared: SharedArgs, device: str, bench: str
                       ) -> throughput.ThroughputOptions:
    o = throughput.ThroughputOptions.defaults(device)
    o.contexts = a.contexts or o.contexts
    o.tokens_per_batch = _pick(a.tokens_per_batch, o.tokens_per_batch)
    o.steps = _pick(a.steps, o.steps)
    o.warmup_steps = _pick(a.warmup_steps, o.warmup_steps)
    o.compile, o.dtype = a.compile, shared.dtype
    o.cuda_graph = _use_cuda_graph(a.cuda_graph, device)
    return o


def run_cli(ns: argparse.Namespace) -> int:
    a, shared = from_namespace(TargetArgs, ns), from_namespace(SharedArgs, ns)
    device = resolve_device(a.device)
    mixers = [m.strip() for m in a.mixers.split(",") if m.strip()] if a.mixers else None
    shapes = resolve_shapes(mixers, a.budget, match=not a.no_match, sets=shared.set)
    for s in shapes:
        print(f"bench {s.mixer}: n_layer={s.cfg.n_layer} n_embd={s.cfg.n_embd} n_head={s.cfg.n_head} "
              f"mixer_args={s.cfg.mixer_args} ({s.source})", flush=True)
    # memory last: it drives the GPU into out-of-memory on purpose
    todo = ["latency", "throughput", "memory"] if ns.bench == "all" else [ns.bench]
    makers = {"latency": (latency_options, latency.run), "memory": (memory_options, memory.run),
              "throughput": (throughput_options, throughput.run)}
    # every option error before any work
    opts = {name: makers[name][0](from_namespace(BENCH_ARGS[name], ns), shared, device, ns.bench) for name in todo}
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
    parts of torch._dynamo: seconds per process); now wait for `go`.
    A sweep starts the next benchmark process this way while the previous one measures: that process
    never shares the GPU with it, and the imports (one CPU core) are off the critical path."""
    if device == "cuda":
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
