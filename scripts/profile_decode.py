"""Where does a decode step spend its time? The decode-time counterpart of scripts/profile_step.py.

    python scripts/profile_decode.py [--mixers a,b] [--variants graph,compiled+graph] [--prompt_len 1024]
                                     [--steps 100] [--warmup 10] [--device auto|cpu|cuda] [--dtype auto]
                                     [--tiny] [--set KEY=VALUE ...] [--out FILE]

For each mixer, at the bake-off shapes (configs/<mixer>.toml; softmax: configs/shakespeare_char.toml;
vocab 65), batch 1, in the precision `attnbench bench latency` decodes in (auto: bf16 weights on CUDA,
float32 on the CPU), a prompt of --prompt_len tokens is prefilled into a fresh cache, then:
  timing    ms/token (median of --steps) per variant, each from its own copy of the prefilled cache:
            eager (the step as is), graph (the step captured in a CUDA graph and replayed) and
            compiled+graph (the blocks torch.compile'd, then captured: the latency bench's --compile).
            Capture, screening and verification are the latency bench's own (decode_graph.graph_decode), so
            a step that is not graph-safe gets the same reason here.
  profile   one eager decode step under torch.profiler (a replay is one launch, so the kernels are
            those of the eager step): device kernels per step, the top kernels by self device time, and
            their time grouped as profile_step.py groups them (matmul, attention, FLA/Triton, other).
On the CPU (no graphs) the default variant is eager, and the profile counts aten ops instead of kernels
(calls made from Python, i.e. not nested in another aten op) and ranks them by self CPU time. --tiny
shrinks the models (2 layers, width 32) so that a CPU test can run every mixer in seconds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from attnbench import mixers
from attnbench.bench.shapes import bench_config, resolve_shapes
from attnbench.bench.timing import Precision, device_name, precision, resolve_device, summarize, sync, time_calls
from attnbench.bench.decode_graph import graph_decode
from attnbench.bench.latency import LatencyOptions, build_bench_model, count_mixer_tokens, greedy_step, random_prompt
from profile_step import kernel_group  # scripts/ is on sys.path when this runs as a script

VARIANTS = ("eager", "graph", "compiled+graph")
PROFILE_WARMUP = 3  # eager steps before the profiled one (cuBLAS handles, Triton autotuning)
TOP = 25
# the tiny shapes of tests/test_bench.py (NSA's blocks shrunk to fit a short prompt)
TINY_SETS = ["n_layer=2", "n_embd=32", "n_head=2"]
NSA_TINY_SETS = ["nsa.n_kv_head=1", "nsa.head_dim=16", "nsa.block_size=4", "nsa.block_counts=2", "nsa.window_size=8"]


def op_table(prof: profile, device: str) -> tuple[list[tuple[str, int, float]], int, str]:
    """(name, calls, self µs) of every kernel (CUDA) or aten op (CPU) of a one-step profile, how many
    the step ran, and what was counted."""
    if device == "cuda":
        # kernels (and memcpy/memset) carry the self device time; the CPU ops launching them carry none
        evs = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        rows = [(e.key, e.count, e.self_device_time_total) for e in evs]
        return rows, sum(e.count for e in evs), "device kernels"
    evs = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    rows = [(e.key, e.count, e.self_cpu_time_total) for e in evs]
    # an aten op calls others (linear -> t, addmm): count the calls made from Python, once each
    top = sum(1 for e in prof.events() if e.name.startswith("aten::")
              and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    return rows, top, "aten ops"


def profile_text(rows: list[tuple[str, int, float]], count: int, what: str, clock: str,
                 tokens: int | None) -> list[str]:
    """The profile's lines: the count per step, time per group, and the top ops."""
    total = sum(us for _, _, us in rows)
    lines = [f"  profile of one eager decode step: {count} {what} per decode step, {total / 1000:.3f} ms "
             f"self {clock} time, mixer tokens per call {tokens}"]
    groups: dict[str, float] = {}
    for name, _, us in rows:
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + us
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {g:20s} {us:9.1f} us  {100 * us / total if total else 0:5.1f}%")
    lines += [f"  top {TOP} by self {clock} time:", f"    {'total us':>10s}  {'count':>5s}  name"]
    for name, calls, us in sorted(rows, key=lambda r: -r[2])[:TOP]:
        lines.append(f"    {us:10.1f}  {calls:5d}  {name[:100]}")
    return lines


def time_variant(variant: str, model: torch.nn.Module, cache: Any, tok: torch.Tensor, prec: Precision, device: str,
                 steps: int, warmup: int) -> str:
    """One line: the variant's median ms/token from its own copy of the prefilled cache, or why not."""
    cache, tok = copy.deepcopy(cache), tok.clone()
    step = greedy_step(model, cache, tok)
    if variant == "eager":
        with torch.no_grad(), prec.context(device):
            time_calls(step, warmup, device)
            samples = time_calls(step, steps, device)
        note = ""
    elif device != "cuda":
        return f"  {variant:15s} skipped: CUDA graphs need --device cuda"
    else:
        res = graph_decode(model, cache, tok, step, prec, warmup, steps, compile=variant == "compiled+graph")
        if res.samples is None:
            return f"  {variant:15s} no graph: {res.reason}"
        samples = res.samples
        note = f"  (replay vs eager logits rel err {res.verify_err:.1e})"
        if variant == "compiled+graph" and not res.compiled:
            note += f"  compile failed, captured uncompiled: {res.compile_error}"
    s = summarize(samples)
    return f"  {variant:15s} {s['median']:.4f} ms/token  median of {s['n']} (min {s['min']:.4f}){note}"


def profile_mixer(name: str, a: argparse.Namespace, device: str) -> str:
    """The printed section of one mixer: its decode timings per variant and the eager step's profile."""
    sets = list(a.set) + (TINY_SETS + (NSA_TINY_SETS if name == "nsa" else []) if a.tiny else [])
    shape = resolve_shapes([name], match=False, sets=sets)[0]
    shape = dataclasses.replace(shape, cfg=dataclasses.replace(shape.cfg, vocab_size=65))
    P = a.prompt_len
    # room for the longest variant (the latency bench's own count) plus the profiled steps
    opts = LatencyOptions(prompt_lens=[P], decode_steps=a.steps, decode_warmup=a.warmup, cuda_graph=True,
                          recompute_steps=0)
    max_len = P + opts.decode_budget() + PROFILE_WARMUP + 1
    prec = precision(a.dtype, device, inference=True)
    model, _ = build_bench_model(shape, bench_config(shape.cfg, max_len), device, prec)
    with torch.no_grad(), prec.context(device):
        cache = model.new_cache(1, max_len, device=device)
        logits = model(random_prompt(65, 1, P, device), cache=cache)[0]
        tok = logits[:, -1].argmax(-1, keepdim=True)
    lines = [f"## {name} ({model.num_params() / 1e6:.2f}M params, {shape.source}; prompt {P}, batch 1, "
             f"{prec.name}, {device_name(device)})",
             "  decode, per variant:"]
    variants = a.variants.split(",") if a.variants else (["graph", "compiled+graph"] if device == "cuda" else ["eager"])
    for v in variants:
        try:
            lines.append(time_variant(v, model, cache, tok, prec, device, a.steps, a.warmup))
        except Exception as e:  # noqa: BLE001 - the other variants and the profile still run
            lines.append(f"  {v:15s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

    c, t = copy.deepcopy(cache), tok.clone()
    step = greedy_step(model, c, t)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), prec.context(device):
        for _ in range(PROFILE_WARMUP):
            step()
        sync(device)
        with count_mixer_tokens(model) as seen, profile(activities=acts) as prof:
            step()
            sync(device)
    rows, count, what = op_table(prof, device)
    lines += profile_text(rows, count, what, "device" if device == "cuda" else "CPU", max(seen) if seen else None)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixers", default=",".join(mixers.available()))
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, of {','.join(VARIANTS)} "
                         "(default: graph,compiled+graph on CUDA, eager on the CPU)")
    ap.add_argument("--prompt_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed decode steps before them")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto",
                    help="as bench latency: auto (bf16 weights on CUDA), float32, bfloat16, autocast")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (2 layers, width 32): a quick CPU check")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model override as in `attnbench bench --set` (e.g. n_layer=2, nsa.block_size=16)")
    ap.add_argument("--out", default=None, help="also append the printed text to this file (as profile_step.py)")
    a = ap.parse_args(argv)
    bad = [v for v in (a.variants or "").split(",") if v and v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    device = resolve_device(a.device)
    out = []
    for name in a.mixers.split(","):
        try:
            text = profile_mixer(name, a, device)
        except Exception as e:  # noqa: BLE001 - keep profiling the others; report the failure
            text = f"## {name}: failed: {type(e).__name__}: {e}"
        if device == "cuda":
            torch.cuda.empty_cache()
        print(text, flush=True)
        out.append(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(out) + "\n")  # the printed text, as printed
    return 0 if all(": failed: " not in t.splitlines()[0] for t in out) else 1


if __name__ == "__main__":
    sys.exit(main())
