"""The numbers and text of the report's tables: runs grouped by mixer and learning rate, the bake-off rows
and their markdown, the parameter table, the shared settings, the kernels behind the figures, benchmark
shapes that differ from the trained ones, and the benchmark captions (with where throughput crosses over)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..bench.throughput import crossover
from .colors import mixer_key, mixer_label
from .load import Results, RunResult, select_rows, throughput_rows

DECODE_CONTEXT = 1024  # the bake-off's decode latency column: ms/token at this prompt length


def mean_sd(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(mean: float | None, sd: float | None = None, digits: int = 4) -> str:
    """'mean ± sd' to `digits` decimals (just the mean without sd); '-' for a missing value."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _fmt_num(x: float | None) -> str:
    """A speed or size to about three significant digits (thousands separated from 10,000)."""
    if x is None:
        return "-"
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def by_mixer(runs: list[RunResult]) -> dict[str, dict[float, list[RunResult]]]:
    """mixer (the run's label: a sweep variant such as softmax_nope is its own row) -> learning rate -> its
    runs (one per seed), mixers in MIXER_ORDER."""
    out: dict[str, dict[float, list[RunResult]]] = {}
    for r in runs:
        out.setdefault(r.label, {}).setdefault(r.lr, []).append(r)
    return {m: out[m] for m in sorted(out, key=mixer_key)}


def best_lr(lrs: dict[float, list[RunResult]]) -> float:
    """The learning rate with the lowest mean score over its seeds (the smaller one on a tie)."""
    return min(lrs, key=lambda lr: (statistics.fmean(r.score for r in lrs[lr]), lr))


def _decode_at(rows: list[dict], mixer: str, mode: str, ctx: int = DECODE_CONTEXT) -> tuple[float, int, bool] | None:
    """(median ms/token, prompt length, torch.compile'd) at ctx, else at the nearest measured length."""
    rs = [r for r in select_rows(rows, "latency", "decode_ms_per_token", mixer)
          if r.get("mode", "eager") == mode and r.get("value") is not None and r.get("context")]
    if not rs:
        return None
    r = min(rs, key=lambda r: (abs(math.log(r["context"] / ctx)), r["context"]))
    return float(r["value"]), int(r["context"]), bool(r.get("compiled"))


def _oom_threshold(rows: list[dict], mixer: str) -> str | None:
    """'OOM at N' (the first context that ran out of memory), or how far it got without one."""
    summ = select_rows(rows, "memory", "oom_threshold", mixer)
    if summ:
        s = summ[-1]
        if s.get("first_oom"):
            return f"OOM at {int(s['first_oom']):,}"
        fits = s.get("value") or s.get("fits")
        why = {"time_budget": "time budget", "max_len": "max length"}.get(str(s.get("limited_by")), s.get("limited_by"))
        return f"none up to {int(fits):,}" + (f" ({why})" if why else "") if fits else None
    mem = [r for r in select_rows(rows, "memory", "peak_memory_mb", mixer) if r.get("context")]
    if not mem:
        return None
    # no summary row: the benchmark stopped before its search ended (interrupted), so say so
    ooms = sorted(r["context"] for r in mem if r.get("oom"))
    return (f"OOM at {ooms[0]:,}" if ooms else f"none up to {max(r['context'] for r in mem):,}") + " (search unfinished)"


@dataclass
class BakeoffRow:
    mixer: str
    lr: float
    n: int
    val_loss: tuple[float, float | None]  # best validation loss (the score)
    final_val_loss: tuple[float, float | None]
    ppl: tuple[float, float | None]
    bpc: tuple[float, float | None] | None
    tokens_per_s: float | None
    ms_per_iter: float | None
    speed_source: str  # "bench" | "train" | "train-shared"
    speed_note: str  # how the benchmark measured (tokens per batch, compiled or not)
    peak_mem_mb: float | None
    oom: str | None
    decode_ms: tuple[float, int, bool] | None  # (ms/token, prompt length, compiled)
    decode_graph_ms: tuple[float, int, bool] | None
    n_params: int | None
    under_mps: bool = False  # the shared-device runs shared it through CUDA MPS


def bakeoff(res: Results) -> list[BakeoffRow]:
    out = []
    tp_rows = throughput_rows(res.bench)
    for mixer, lrs in by_mixer(res.runs).items():
        lr = best_lr(lrs)
        rs = lrs[lr]
        losses = [r.score for r in rs]
        bpcs = [b for b in (r.best_bpc for r in rs) if b is not None]
        tps = [r.summary.get("tokens_per_s") for r in rs if r.summary.get("tokens_per_s")]
        msi = [r.summary.get("ms_per_iter") for r in rs if r.summary.get("ms_per_iter")]
        source = "train-shared" if any(r.shared_device > 1 for r in rs) else "train"
        tok_per_s = statistics.fmean(tps) if tps else None
        ms_iter = statistics.fmean(msi) if msi else None
        # the benchmark's tokens/s at the training context (measured alone on the device), when there is one
        T = rs[0].config["model"].get("block_size")
        bt = [r for r in tp_rows if r.get("mixer") == mixer and r.get("context") == T]
        note = ""
        if bt:
            tpb, comp, graph = (bt[-1].get(k) for k in ("tokens_per_batch", "compiled", "cuda_graph"))
            parts = ([f"{tpb:,} tokens per batch"] if tpb else []) + \
                ([] if comp is None else [f"torch.compile {'on' if comp else 'off'}"]) + \
                ([] if graph is None else [f"step {'captured in a CUDA graph' if graph else 'not graph-captured'}"])
            note = ", ".join(parts)
            tc = rs[0].config["train"]
            tokens_per_iter = tc.get("batch_size", 0) * T * tc.get("gradient_accumulation_steps", 1)
            tok_per_s = float(bt[-1]["value"])
            ms_iter = 1e3 * tokens_per_iter / tok_per_s if tok_per_s and tokens_per_iter else None
            source = "bench"
        mem = [r.summary.get("peak_mem_mb") for r in rs if r.summary.get("peak_mem_mb")]
        out.append(BakeoffRow(
            mixer, lr, len(rs), mean_sd(losses), mean_sd([r.final_val_loss for r in rs]),
            mean_sd([math.exp(x) for x in losses]),
            mean_sd(bpcs) if len(bpcs) == len(rs) else None, tok_per_s, ms_iter, source, note,
            statistics.fmean(mem) if mem else None, _oom_threshold(res.bench, mixer),
            _decode_at(res.bench, mixer, "eager"), _decode_at(res.bench, mixer, "cuda_graph"),
            rs[0].summary.get("n_params"), any(r.under_mps for r in rs)))
    return out


def bakeoff_markdown(rows: list[BakeoffRow]) -> tuple[str, list[str]]:
    """The bake-off table (markdown) and its footnotes."""
    has_graph = any(r.decode_graph_ms for r in rows)
    has_decode = any(r.decode_ms for r in rows)
    has_oom = any(r.oom for r in rows)
    head = ["mixer", "best lr", "seeds", "val loss", "final val loss", "perplexity", "bits/char", "tokens/s", "ms/iter",
            "peak train mem (MB)"]
    if has_oom:
        head.append("OOM threshold (context)")
    if has_decode:
        head.append(f"decode ms/token @{DECODE_CONTEXT // 1000}k")
    if has_graph:
        head.append(f"decode ms/token @{DECODE_CONTEXT // 1000}k (CUDA graph)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    shared = any(r.speed_source == "train-shared" for r in rows)
    for r in rows:
        mark = {"bench": "", "train": "", "train-shared": " †"}[r.speed_source]
        cells = [mixer_label(r.mixer), f"{r.lr:g}", str(r.n), _fmt(*r.val_loss), _fmt(*r.final_val_loss),
                 _fmt(*r.ppl, digits=3),
                 _fmt(*r.bpc, digits=4) if r.bpc else "-", _fmt_num(r.tokens_per_s) + mark,
                 _fmt_num(r.ms_per_iter) + mark, _fmt_num(r.peak_mem_mb)]
        if has_oom:
            cells.append(r.oom or "-")
        for on, val in ((has_decode, r.decode_ms), (has_graph, r.decode_graph_ms)):
            if on:
                cells.append("-" if val is None else f"{val[0]:.3g}" + ("" if val[1] == DECODE_CONTEXT else f" (@{val[1]})"))
        lines.append("| " + " | ".join(cells) + " |")
    notes.append("val loss, perplexity and bits/char: the best evaluation on the whole validation split (the "
                 "checkpoint one would keep), mean ± sample standard deviation over seeds at the mixer's best "
                 "learning rate (lowest mean val loss); final val loss: the last evaluation (above val loss: the "
                 "model overfits by the end of training).")
    if any(r.speed_source == "bench" for r in rows):
        how = sorted({r.speed_note for r in rows if r.speed_note})
        notes.append("tokens/s and ms/iter: throughput benchmark at the training context (one model alone on the "
                     "device" + (f"; {', '.join(how)}" if how else "") + "); ms/iter = tokens per training "
                     "iteration / tokens/s.")
    if any(r.speed_source.startswith("train") for r in rows):
        notes.append("tokens/s and ms/iter without a throughput benchmark: steady-state training speed from the runs.")
    if shared:
        mps = " through CUDA MPS (their kernels overlapping)" if any(r.under_mps for r in rows) else ""
        notes.append(f"† measured while several training runs shared the device (jobs_per_device > 1){mps}: "
                     "indicative only; compare the throughput benchmark instead.")
    notes.append("peak train mem: the training process's peak (CUDA: max allocated; CPU: process RSS, which "
                 "includes the Python runtime).")
    if has_decode:
        notes.append(f"decode ms/token: latency benchmark, eager decode from the cached state after a "
                     f"{DECODE_CONTEXT}-token prompt (batch 1); '(@N)' where that length was not measured.")
    if has_graph:
        comp = {r.decode_graph_ms[2] for r in rows if r.decode_graph_ms}
        notes.append("decode (CUDA graph): the same decode step captured once and replayed" +
                     (", torch.compile'd inside the graph" if comp == {True} else
                      ", some mixers torch.compile'd inside the graph" if comp == {True, False} else "") + ".")
    return "\n".join(lines), notes


def kernel_lines(res: Results) -> list[str]:
    """Per mixer, which backend ran each dispatched op: in training (the runs' summaries, `op_backends`)
    and in each benchmark (the rows' `backend_ops`). 'fla+torch-dqkwg': FLA with attnbench's PyTorch step
    of the gated backward; 'triton': attnbench's own kernel; a mixer with no dispatched op (softmax:
    PyTorch SDPA) has no line."""
    def merged(dicts) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for d in dicts:
            for op, label in (d or {}).items():
                out.setdefault(op, set()).update(str(label).split("+"))
        return out

    def text(ops: dict[str, set[str]]) -> str:
        return ", ".join(f"{op} {'+'.join(sorted(v))}" for op, v in sorted(ops.items()))

    lines = []
    for mixer, lrs in by_mixer(res.runs).items():
        parts = []
        train = merged(r.summary.get("op_backends") for runs in lrs.values() for r in runs)
        if train:
            parts.append(f"training: {text(train)}")
        for bench in ("latency", "throughput", "memory"):
            ops = merged(r.get("backend_ops") for r in select_rows(res.bench, bench, mixer=mixer))
            if ops:
                parts.append(f"{bench}: {text(ops)}")
        if parts:
            lines.append(f"{mixer}: " + "; ".join(parts))
    return lines


def param_table(res: Results) -> str:
    head = "| mixer | layers | width | heads | head dim | mixer args | parameters | vs budget |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for mixer, lrs in by_mixer(res.runs).items():
        r = lrs[best_lr(lrs)][0]
        m = r.config["model"]
        match = r.run_meta.get("match") or {}
        dev = f"{100 * match['deviation']:+.2f}% of {match['budget'] / 1e6:.3g}M" if "deviation" in match else "-"
        hd = match.get("head_dim") or (m["n_embd"] // m["n_head"] if m.get("n_head") else "-")
        heads = match.get("heads") or m.get("n_head")
        if match.get("kv_heads"):
            heads = f"{heads} (kv {match['kv_heads']})"
        if match.get("per_mixer"):  # a hybrid: each mixer's, in pattern order
            per = match["per_mixer"].values()
            hd = "/".join(str(p["head_dim"]) for p in per)
            heads = "/".join(f"{p['heads']}" + (f" (kv {p['kv_heads']})" if p.get("kv_heads") else "") for p in per)
        args = ", ".join(f"{k}={v}" for k, v in sorted(_flat_args(m.get("mixer_args") or {}))) or "-"
        mixer = mixer_label(mixer)
        n = r.summary.get("n_params")
        lines.append(f"| {mixer} | {m['n_layer']} | {m['n_embd']} | {heads} | {hd} | {args} | "
                     f"{n:,} ({n / 1e6:.2f}M) | {dev} |" if n else f"| {mixer} | {m['n_layer']} | {m['n_embd']} | "
                     f"{heads} | {hd} | {args} | - | {dev} |")
    return "\n".join(lines)


def _flat_args(args: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A hybrid's per-mixer sub-tables as "mixer.arg" keys; a plain mixer's args as they are."""
    out = []
    for k, v in args.items():
        out += _flat_args(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def settings_lines(res: Results) -> list[str]:
    """The settings every reported run shares (dataset, context, batch, iterations, schedule, device)."""
    if not res.runs:
        return []
    c = res.runs[0].config
    s = res.runs[0].summary
    lrs = sorted({r.lr for r in res.runs})
    seeds = sorted({r.seed for r in res.runs})
    devices = sorted({f"{r.summary.get('device_name', r.summary.get('device', '?'))}" for r in res.runs})
    shared = max(r.shared_device for r in res.runs)
    how = " through CUDA MPS" if any(r.under_mps for r in res.runs) else ""
    return [
        f"dataset `{c.get('data', {}).get('dataset', '?')}`; context {c['model'].get('block_size')} tokens; batch "
        f"{c['train'].get('batch_size')} x {c['train'].get('gradient_accumulation_steps', 1)} accumulation; "
        f"{c['train'].get('max_iters')} iterations ({s.get('tokens', 0):,} training tokens per run); dropout "
        f"{c['model'].get('dropout')}",
        f"AdamW, warmup {c['optim'].get('warmup_iters')} iterations, cosine decay to min_lr "
        f"{c['optim'].get('min_lr'):g}; learning rates {', '.join(f'{x:g}' for x in lrs)}; seeds "
        f"{', '.join(map(str, seeds))}",
        f"trained on {', '.join(devices)} ({s.get('dtype', '?')}, compile={s.get('compile')}); "
        + (f"up to {shared} runs shared a device{how}" if shared > 1 else "one run per device"),
    ]


def bench_shape_mismatches(res: Results) -> list[str]:
    """Benchmarks must measure the trained models: compare each bench row's shape with the trained one."""
    out = []
    trained = {m: lrs[best_lr(lrs)][0].config["model"] for m, lrs in by_mixer(res.runs).items()}
    seen = set()
    for r in res.bench:
        m, shape = r.get("mixer"), r.get("shape")
        if m not in trained or not isinstance(shape, dict) or m in seen:
            continue
        t = trained[m]
        diffs = [f"{k} {shape.get(k)} (trained {t.get(k)})" for k in ("n_layer", "n_embd", "n_head")
                 if k in shape and shape.get(k) != t.get(k)]
        ta = {k: v for k, v in (t.get("mixer_args") or {}).items() if v is not None}
        ba = {k: v for k, v in (shape.get("mixer_args") or {}).items() if v is not None}
        if ba != ta:
            diffs.append(f"mixer_args {ba} (trained {ta})")
        if diffs:
            seen.add(m)
            out.append(f"benchmark shape of {m} differs from the trained model: {'; '.join(diffs)}")
    return out


def bench_caption(rows: list[dict], what: str) -> str:
    rs = select_rows(rows, what)
    if not rs:
        return ""
    devs = sorted({str(r.get("device_name") or r.get("device")) for r in rs})
    dts = sorted({str(r.get("dtype")) for r in rs if r.get("dtype")})
    cap = f"Measured on {', '.join(devs)}" + (f" ({', '.join(dts)})" if dts else "")
    return cap + "; points are medians, bars min..max of the repeats."


def crossover_text(rows: list[dict], baseline: str = "softmax") -> str:
    """Where each mixer's training throughput overtakes the baseline's, from the rows' medians per context
    (log-log interpolation between the two measured contexts around it; bench.throughput.crossover)."""
    curves: dict[str, dict[int, float]] = {}
    for r in throughput_rows(rows):
        curves.setdefault(r["mixer"], {})[int(r["context"])] = float(r.get("median") or r["value"])
    if baseline not in curves:
        return ""
    parts = []
    for m in sorted(set(curves) - {baseline}):
        T, how = crossover(curves[baseline], curves[m])
        parts.append(f"{m} at ~{T:,.0f} tokens ({how})" if T is not None else f"{m} does not: {how}")
    return f"\n\nOvertakes {baseline}: " + "; ".join(parts) + "." if parts else ""

