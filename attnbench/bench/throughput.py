"""Training throughput: tokens per second of full training steps (forward, backward, AdamW step) per
context length T at a fixed number of tokens per batch (batch = tokens_per_batch // T), bf16 autocast
on the GPU as in training, float32 on the CPU; on CUDA the step is captured in a CUDA graph by default
(as train.cuda_graph does: these small models are launch-bound, and a replay removes the launches). Then, for every mixer other than softmax, the context
length at which it overtakes softmax: interpolated between the two measured contexts where the ratio
of their throughputs crosses 1 (linear in log T and log ratio), None when it never does in range.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..graphed_step import GraphedStep, make_graph_safe
from ..ops.backend import record_backends
from .rows import RowWriter, backend_summary, base_row, measured, print_table
from .shapes import BenchShape, bench_config, build_model
from .timing import is_oom, precision, time_calls
from .training_step import make_optimizer, random_batch, train_step

log = logging.getLogger("attnbench.bench")


@dataclass
class ThroughputOptions:
    contexts: list[int]
    tokens_per_batch: int
    steps: int = 5
    warmup_steps: int = 2
    compile: bool = False
    cuda_graph: bool = False  # capture the training step (graphed_step.GraphedStep); CUDA only
    dtype: str = "auto"
    baseline: str = "softmax"

    @classmethod
    def defaults(cls, device: str) -> "ThroughputOptions":
        if device == "cuda":
            # up to 64k: at ~10M parameters the linear mixers are launch-bound, so a crossover with flash
            # attention lies at long contexts (none up to 16k: results/bakeoff-h200-2026-12-03/README.md)
            return cls(contexts=doubling(256, 65536), tokens_per_batch=64 * 1024, cuda_graph=True)
        return cls(contexts=doubling(64, 512), tokens_per_batch=2048, steps=2, warmup_steps=1)


def doubling(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... up to hi."""
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def crossover(baseline: dict[int, float], other: dict[int, float]) -> tuple[float | None, str]:
    """Context length at which `other` (tokens/s per T) first reaches `baseline`'s throughput."""
    ratios = [(T, other[T] / baseline[T]) for T in sorted(set(baseline) & set(other))
              if baseline[T] and other[T]]
    if not ratios:
        return None, "no context measured for both"
    if ratios[0][1] >= 1:
        return float(ratios[0][0]), "already at least as fast at the shortest context measured"
    for (T0, r0), (T1, r1) in zip(ratios, ratios[1:]):
        if r0 < 1 <= r1:
            f = -math.log(r0) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(T0) + f * (math.log(T1) - math.log(T0))), f"interpolated between {T0} and {T1}"
    return None, f"slower at every measured context (up to {ratios[-1][0]})"


def run(shapes: list[BenchShape], device: str, opts: ThroughputOptions, writer: RowWriter) -> list[dict]:
    out: list[dict] = []
    prec = precision(opts.dtype, device, inference=False)
    for shape in shapes:
        cfg = bench_config(shape.cfg, 0)
        model = prec.prepare(build_model(cfg, device)).train()
        opt = make_optimizer(model, device)
        if opts.cuda_graph:
            make_graph_safe(opt, device)
        fwd = torch.compile(model) if opts.compile else model
        base = base_row("throughput", shape, cfg, model.num_params(), device, prec)
        for T in opts.contexts:
            B = max(1, opts.tokens_per_batch // T)
            common = dict(context=T, batch=B, tokens_per_batch=B * T, compiled=opts.compile)
            step = GraphedStep(lambda a, b: train_step(fwd, opt, a, b, prec, device, zero_grad=False,
                                                       autocast_cache=not opts.cuda_graph),
                               lambda: opt.zero_grad(set_to_none=True), enabled=opts.cuda_graph,
                               warmup_steps=max(1, opts.warmup_steps), label=f"throughput {shape.mixer} T={T}")
            try:
                x, y = random_batch(cfg.vocab_size, B, T, device, seed=T)
                with record_backends() as ops:
                    step(x, y)
                # the rest of the warm-up, then (CUDA graph) the capture and its first replay: all untimed
                for _ in range(max(1, opts.warmup_steps) - 1 + int(opts.cuda_graph)):
                    step(x, y)
                ms = time_calls(lambda: step(x, y), opts.steps, device)
                tps = [B * T / (m / 1e3) for m in ms]
                row = measured(base, "train_tokens_per_s", "tokens/s", tps, **common,
                               step_ms=sorted(ms)[len(ms) // 2], backend=backend_summary(ops), backend_ops=dict(ops),
                               cuda_graph=step.captured, cuda_graph_reason=step.reason if opts.cuda_graph else None)
            except Exception as e:  # noqa: BLE001 - OOM (or a failing mixer) is a row, not a crash
                oom = is_oom(e)
                log.error("throughput %s T=%d: %s", shape.mixer, T, e, exc_info=not oom)
                row = measured(base, "train_tokens_per_s", "tokens/s", None, **common)
                row.update(oom=oom, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            opt.zero_grad(set_to_none=True)
            x = y = step = None  # frees this context's graph and its memory pool
            if device == "cuda":
                torch.cuda.empty_cache()
            writer.emit(row)
            out.append(row)
            v = row["value"]
            print(f"throughput {shape.mixer:>20} T={T:<6} batch={B:<5} "
                  f"{'OOM' if row['oom'] else ('-' if v is None else f'{v:,.0f} tokens/s')}", flush=True)
        del model, opt, fwd
        if device == "cuda":
            torch.cuda.empty_cache()
    out += _crossovers(out, shapes, opts, writer)
    print_throughput(out)
    return out


def _crossovers(rows: list[dict], shapes: list[BenchShape], opts: ThroughputOptions, writer: RowWriter) -> list[dict]:
    curves: dict[str, dict[int, float]] = {}
    bases: dict[str, dict] = {}
    for r in rows:
        if r["metric"] == "train_tokens_per_s" and r["value"]:
            curves.setdefault(r["mixer"], {})[r["context"]] = r["value"]
        bases.setdefault(r["mixer"], r)
    if opts.baseline not in curves:
        return []
    out = []
    for s in shapes:
        if s.mixer == opts.baseline or s.mixer not in bases:
            continue
        T, how = crossover(curves[opts.baseline], curves.get(s.mixer, {}))
        keep = {k: bases[s.mixer][k] for k in ("bench", "mixer", "n_params", "n_params_matched", "shape", "shape_source",
                                                "device", "device_name", "dtype", "config_backend", "torch", "time")}
        row = measured(keep, "crossover_context", "tokens of context", [T] if T is not None else None,
                       context=T, batch=None, baseline=opts.baseline, how=how, tokens_per_batch=opts.tokens_per_batch,
                       ratios={str(t): curves.get(s.mixer, {}).get(t, 0) / v
                               for t, v in sorted(curves[opts.baseline].items()) if t in curves.get(s.mixer, {})})
        row["backend"] = bases[s.mixer].get("backend")
        writer.emit(row)
        out.append(row)
    return out


def print_throughput(rows: list[dict]) -> None:
    pts = [r for r in rows if r["metric"] == "train_tokens_per_s"]
    mixers = list(dict.fromkeys(r["mixer"] for r in pts))
    Ts = sorted({r["context"] for r in pts})
    val = {(r["mixer"], r["context"]): ("OOM" if r["oom"] else ("error" if r["error"] else r["value"])) for r in pts}
    body = [[m] + [val.get((m, T)) for T in Ts] + [next((r.get("backend") for r in pts if r["mixer"] == m), None)]
            for m in mixers]
    print_table("throughput: training tokens/s by context length", ["mixer"] + [f"T={T}" for T in Ts] + ["backend"], body)
    cross = [[r["mixer"], r["value"], r["how"]] for r in rows if r["metric"] == "crossover_context"]
    if cross:
        print_table("throughput: context at which each mixer overtakes softmax", ["mixer", "context", "how"], cross)
