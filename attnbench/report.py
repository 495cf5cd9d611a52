"""`attnbench report DIR`: report.md and PNG figures from a results folder, from its files alone.

Input (see attnbench.sweep): `DIR/runs/<run>/{config.json, metrics.jsonl, summary.json, run.json}` and
`DIR/bench/*.jsonl`; DIR may also be a folder of run folders, or one run folder. When DIR/sweep.json
exists only the runs it plans are reported (others in runs/ are listed as not part of the sweep).
Nothing else is needed: no checkpoints, no dataset, no GPU; the mixers need not even be installed.

Output, in DIR/report/ (or --out):
  report.md                 parameter table, bake-off table, the kernels behind the figures (which backend ran
                            each op, in training and in each benchmark), figures (the throughput one says where
                            each mixer overtakes softmax), skipped runs, notes
  loss_vs_step.png          training and validation loss against steps
  loss_vs_time.png          the same against training wall time
  ppl_vs_flops.png          validation perplexity against cumulative training FLOPs (log-log)
  val_vs_train.png          validation loss against training loss at each evaluation (the generalisation gap)
  lr_sensitivity.png        best validation loss against learning rate (when several were swept)
  decode_latency.png        decode ms/token against prompt length (latency benchmark)
  memory_vs_context.png     peak training memory against context length (memory benchmark)
  throughput_vs_context.png training tokens/s against context length (throughput benchmark)

Aggregation: a run's score is its best validation loss (the lowest of its evaluations: the checkpoint
one would keep, as nanoGPT keeps the best-val checkpoint; small models on small data overfit, and a
final-only score then ranks how fast a mixer memorises, not how well it models); the final validation
loss stays beside it, so the overfitting shows. A mixer's best learning rate is the one with the
lowest mean score over its seeds; the bake-off shows mean +- sample standard deviation over the seeds
at that learning rate (just the value for one seed). Curves show every seed at the best learning rate.
Speed columns come from the throughput benchmark at the training context when there is one (runs
measured alone on their device); otherwise from the training runs, flagged when several runs shared a
device (their tokens/s then depends on the neighbours). One colour per mixer in every figure
(MIXER_COLORS). A run folder that cannot be read (bad JSON, no summary: unfinished) is listed as
skipped with the reason; missing benchmark data omits those figures and columns with a note.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AttnbenchError
from .files import atomic_write_text, read_jsonl

# One colour per mixer, fixed, so every figure (and every report) reads the same way.
MIXER_COLORS = {
    "softmax": "#1f77b4",  # blue
    "deltanet": "#ff7f0e",  # orange
    "gated_deltanet": "#2ca02c",  # green
    "gated_deltaproduct": "#d62728",  # red
    "nsa": "#9467bd",  # purple
}
_SPARE = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#843c39"]
MIXER_ORDER = list(MIXER_COLORS)
DECODE_CONTEXT = 1024  # the bake-off's decode latency column: ms/token at this prompt length


def mixer_color(mixer: str) -> str:
    if mixer in MIXER_COLORS:
        return MIXER_COLORS[mixer]
    import zlib

    return _SPARE[zlib.crc32(mixer.encode()) % len(_SPARE)]  # stable across runs and machines


def _mixer_key(m: str) -> tuple:
    return (MIXER_ORDER.index(m) if m in MIXER_ORDER else len(MIXER_ORDER), m)


# ------------------------------------------------------------------------------------- loading


@dataclass
class RunResult:
    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    run_meta: dict[str, Any] = field(default_factory=dict)  # run.json (sweep runs only)

    @property
    def mixer(self) -> str:
        return self.config["model"]["mixer"]

    @property
    def lr(self) -> float:
        return float(self.config["optim"]["learning_rate"])

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])

    @property
    def shared_device(self) -> int:
        """Most runs that shared this run's device in any of its launches (1 = alone)."""
        return max([int(x.get("jobs_per_device", 1)) for x in self.run_meta.get("launches", [])] or [1])

    @property
    def under_mps(self) -> bool:
        """Did a launch of this run share its GPU through the sweep's CUDA MPS daemon?"""
        return any(x.get("cuda_mps") for x in self.run_meta.get("launches", []))

    @property
    def final_val_loss(self) -> float:
        return float(self.summary["final_val_loss"])

    @property
    def score(self) -> float:
        """The run's best validation loss (the final one when the summary has no best)."""
        b = self.summary.get("best_val_loss")
        return float(b) if isinstance(b, (int, float)) and math.isfinite(b) else self.final_val_loss

    @property
    def best_bpc(self) -> float | None:
        b = self.summary.get("best_val_bpc")
        if isinstance(b, (int, float)) and self.score == self.summary.get("best_val_loss"):
            return float(b)
        return self.final_bpc

    @property
    def final_bpc(self) -> float | None:
        """bits/char of the final evaluation (bpc is linear in the loss: scale the best one)."""
        if self.eval_rows and "val_bpc" in self.eval_rows[-1]:
            return float(self.eval_rows[-1]["val_bpc"])
        b, bl = self.summary.get("best_val_bpc"), self.summary.get("best_val_loss")
        return b * self.final_val_loss / bl if b and bl else None


@dataclass
class Results:
    root: Path
    runs: list[RunResult]
    skipped: list[tuple[str, str]]
    bench: list[dict[str, Any]]
    notes: list[str]
    name: str


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {path.name}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path.name} is not valid JSON ({str(e).splitlines()[0][:80]})") from None


def _dedupe(rows: list[dict]) -> list[dict]:
    """One row per step (the last written wins: a resumed run may repeat a step)."""
    by = {}
    for r in rows:
        by[r["step"]] = r
    return [by[s] for s in sorted(by)]


def load_run(path: Path) -> RunResult:
    """A finished run folder; ValueError with the reason when it cannot be used."""
    cfg = _read_json(path / "config.json")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(s), dict) for s in ("model", "optim", "train")):
        raise ValueError("config.json lacks the model/optim/train sections")
    if not (path / "summary.json").exists():
        raise ValueError("unfinished: no summary.json")
    summary = _read_json(path / "summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("final_val_loss"), (int, float)):
        raise ValueError("summary.json lacks final_val_loss")
    if not math.isfinite(summary["final_val_loss"]):
        raise ValueError(f"final_val_loss is {summary['final_val_loss']}")
    if not (path / "metrics.jsonl").is_file():
        raise ValueError("no metrics.jsonl")
    rows = [r for r in read_jsonl(path / "metrics.jsonl") if isinstance(r, dict) and isinstance(r.get("step"), int)]
    train = _dedupe([r for r in rows if isinstance(r.get("loss"), (int, float))])
    evals = _dedupe([r for r in rows if isinstance(r.get("val_loss"), (int, float))])
    if not evals:
        raise ValueError("metrics.jsonl has no evaluation rows")
    meta = {}
    with contextlib.suppress(ValueError):
        meta = _read_json(path / "run.json") if (path / "run.json").exists() else {}
    return RunResult(path.name, path, cfg, summary, train, evals, meta if isinstance(meta, dict) else {})


def _run_folders(root: Path) -> tuple[list[Path], dict[str, dict] | None, str]:
    """Candidate run folders, the runs the sweep plans with what sweep.json says of them (None: no
    sweep.json), and a name for the report."""
    planned, name = None, root.name
    manifest = root / "sweep.json"
    if manifest.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            m = _read_json(manifest)
            planned = {k: v if isinstance(v, dict) else {} for k, v in m.get("runs", {}).items()}
            name = m.get("name", name)
    if (root / "config.json").is_file() or (root / "summary.json").is_file():
        return [root], None, name  # a single run folder
    base = root / "runs" if (root / "runs").is_dir() else root
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in ("report", "bench", "logs"))
    if planned is not None:
        folders += [base / n for n in sorted(planned) if not (base / n).is_dir()]
    return folders, planned, name


def _bench_rows(root: Path) -> list[dict]:
    rows = []
    for p in sorted((root / "bench").glob("*.jsonl")) if (root / "bench").is_dir() else []:
        rows += [r for r in read_jsonl(p) if isinstance(r, dict) and "bench" in r and "mixer" in r]
    return rows


def load_results(root: str | Path) -> Results:
    root = Path(root)
    if not root.is_dir():
        raise AttnbenchError(f"{root} is not a folder; pass a sweep's --out folder (it holds runs/ and bench/)")
    folders, planned, name = _run_folders(root)
    runs, skipped, notes = [], [], []
    for f in folders:
        if planned is not None and f.name not in planned:
            notes.append(f"{f.name}: in runs/ but not part of this sweep's plan (sweep.json); not reported")
            continue
        if not f.is_dir() or not any((f / n).exists() for n in ("config.json", "metrics.jsonl", "summary.json")):
            if f.is_dir() and not (f / "run.json").exists():
                skipped.append((f.name, "no config.json"))
            else:
                skipped.append((f.name, "planned, not started yet"))
            continue
        try:
            runs.append(load_run(f))
        except ValueError as e:
            why = str(e)
            st = (planned or {}).get(f.name, {})
            if st.get("status") == "failed":  # the manifest knows why: point at the log
                why += f"; the run failed (exit code {st.get('returncode')}), see logs/{f.name}.log"
            skipped.append((f.name, why))
    if not runs and not skipped:
        raise AttnbenchError(f"no run folders in {root} (expected {root}/runs/<run>/config.json); "
                             "run `attnbench sweep` or `attnbench train` first")
    return Results(root, runs, skipped, _bench_rows(root), notes, name)


# ------------------------------------------------------------------------------------- numbers


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(mean: float | None, sd: float | None = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _fmt_num(x: float | None) -> str:
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
    out: dict[str, dict[float, list[RunResult]]] = {}
    for r in runs:
        out.setdefault(r.mixer, {}).setdefault(r.lr, []).append(r)
    return {m: out[m] for m in sorted(out, key=_mixer_key)}


def best_lr(lrs: dict[float, list[RunResult]]) -> float:
    return min(lrs, key=lambda lr: (statistics.fmean(r.score for r in lrs[lr]), lr))


def _bench(rows: list[dict], bench: str, metric: str | None = None, mixer: str | None = None) -> list[dict]:
    return [r for r in rows if r.get("bench") == bench and (metric is None or r.get("metric") == metric)
            and (mixer is None or r.get("mixer") == mixer)]


def _throughput_rows(rows: list[dict]) -> list[dict]:
    """Training-throughput measurements (tokens/s) with a context length."""
    out = []
    for r in _bench(rows, "throughput"):
        unit, metric = str(r.get("unit", "")), str(r.get("metric", ""))
        if ("tokens/s" in unit or "tokens_per_s" in metric) and r.get("context") and r.get("value") is not None:
            out.append(r)
    return out


def _decode_at(rows: list[dict], mixer: str, mode: str, ctx: int = DECODE_CONTEXT) -> tuple[float, int, bool] | None:
    """(median ms/token, prompt length, torch.compile'd) at ctx, else at the nearest measured length."""
    rs = [r for r in _bench(rows, "latency", "decode_ms_per_token", mixer)
          if r.get("mode", "eager") == mode and r.get("value") is not None and r.get("context")]
    if not rs:
        return None
    r = min(rs, key=lambda r: (abs(math.log(r["context"] / ctx)), r["context"]))
    return float(r["value"]), int(r["context"]), bool(r.get("compiled"))


def _oom_threshold(rows: list[dict], mixer: str) -> str | None:
    """'OOM at N' (the first context that ran out of memory), or how far it got without one."""
    summ = _bench(rows, "memory", "oom_threshold", mixer)
    if summ:
        s = summ[-1]
        if s.get("first_oom"):
            return f"OOM at {int(s['first_oom']):,}"
        fits = s.get("value") or s.get("fits")
        why = {"time_budget": "time budget", "max_len": "max length"}.get(str(s.get("limited_by")), s.get("limited_by"))
        return f"none up to {int(fits):,}" + (f" ({why})" if why else "") if fits else None
    mem = [r for r in _bench(rows, "memory", "peak_memory_mb", mixer) if r.get("context")]
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
    tp_rows = _throughput_rows(res.bench)
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
            mixer, lr, len(rs), _mean_sd(losses), _mean_sd([r.final_val_loss for r in rs]),
            _mean_sd([math.exp(x) for x in losses]),
            _mean_sd(bpcs) if len(bpcs) == len(rs) else None, tok_per_s, ms_iter, source, note,
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
        cells = [r.mixer, f"{r.lr:g}", str(r.n), _fmt(*r.val_loss), _fmt(*r.final_val_loss),
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


# ------------------------------------------------------------------------------------- FLOPs


def _flops_per_token(cfg: dict) -> tuple[float | None, str]:
    """Training FLOPs per token of a run's model and where the number comes from."""
    from .config import ModelConfig

    m = dict(cfg["model"])
    try:
        mc = ModelConfig(**{k: v for k, v in m.items() if k in ModelConfig.__dataclass_fields__})
    except TypeError:
        return None, "unreadable model config"
    try:
        from .flops import train_flops_per_token

        return float(train_flops_per_token(mc)), "attnbench.flops.train_flops_per_token"
    except Exception:  # flops module missing or mixer not installed: 6 N (the dense-GPT rule)
        pass
    return None, "6 x parameters per token"


def flops_curve(r: RunResult) -> tuple[list[float], list[float], str]:
    """(cumulative training FLOPs, val perplexity) at each evaluation after step 0."""
    rows = [e for e in r.eval_rows if e.get("step", 0) > 0]
    if rows and all("flops" in e for e in rows):
        return [float(e["flops"]) for e in rows], [math.exp(e["val_loss"]) for e in rows], "logged flops"
    fpt, how = _flops_per_token(r.config)
    if fpt is None:
        n = r.summary.get("n_params")
        if not n:
            return [], [], how
        fpt = 6.0 * n
    return [fpt * e.get("tokens", 0) for e in rows if e.get("tokens")], \
           [math.exp(e["val_loss"]) for e in rows if e.get("tokens")], how


# ------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _plain_log_ticks(ax, which: str = "y") -> None:
    """Plain numbers (6, 8, 10 / 64, 256) instead of 6x10^0 / 2^6 on a log axis; minor ticks are
    labelled too when the axis spans less than about a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = (ax.get_ylim() if which == "y" else ax.get_xlim())
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    narrow = lo > 0 and hi / lo < 12
    if narrow and which == "y":  # within about a decade: ticks at 1, 1.25, 1.5, 2, 2.5, 3, 4, ... x 10^k
        axis.set_minor_locator(LogLocator(base=10, subs=(1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
    axis.set_minor_formatter(fmt if narrow else NullFormatter())


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _curve_runs(res: Results) -> dict[str, list[RunResult]]:
    """Every seed of each mixer at its best learning rate."""
    return {m: lrs[best_lr(lrs)] for m, lrs in by_mixer(res.runs).items()}


def _legend(ax, handles: dict[str, Any]) -> None:
    if handles:
        ax.legend(list(handles.values()), list(handles), fontsize=8, frameon=False)


def fig_loss(res: Results, out: Path, x: str) -> Path:
    """Training loss (thin) and validation loss (markers) per mixer, against steps or wall time."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    key = "step" if x == "step" else "train_time_s"
    handles = {}
    for mixer, rs in _curve_runs(res).items():
        c = mixer_color(mixer)
        for r in rs:
            tr = [(row.get(key), row["loss"]) for row in r.train_rows if row.get(key) is not None]
            ev = [(row.get(key), row["val_loss"]) for row in r.eval_rows if row.get(key) is not None]
            if tr:
                (h,) = axes[0].plot(*zip(*tr), color=c, lw=1.0, alpha=0.85)
                handles.setdefault(mixer, h)
            if ev:
                (h,) = axes[1].plot(*zip(*ev), color=c, lw=1.2, marker="o", ms=3)
                handles.setdefault(mixer, h)
    xlabel = "training step" if x == "step" else "training wall time (s)"
    for ax, what in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what} (nats/token)")
        ax.set_title(f"{what} vs {'steps' if x == 'step' else 'wall time'}")
    _legend(axes[1], handles)
    if any(r.shared_device > 1 for rs in _curve_runs(res).values() for r in rs) and x != "step":
        fig.text(0.01, -0.02, "runs shared a device (jobs_per_device > 1): wall times include the neighbours' load",
                 fontsize=7, color="0.4")
    path = out / f"loss_vs_{'step' if x == 'step' else 'time'}.png"
    _save(fig, path)
    return path


def train_loss_at(train_rows: list[dict], step: int, window: int) -> float | None:
    """Mean logged training loss over the steps in (step - window, step]; None if none were logged."""
    xs = [row["loss"] for row in train_rows if step - window < row.get("step", -1) <= step and "loss" in row]
    return sum(xs) / len(xs) if xs else None


def generalisation_points(r: RunResult) -> list[tuple[float, float]]:
    """(training loss, validation loss) at each evaluation after the first, the training loss averaged
    over the eval interval's second half (the logged losses are noisy minibatch values)."""
    interval = int(r.config.get("train", {}).get("eval_interval", 0) or 0)
    pts = []
    for row in r.eval_rows:
        step = row.get("step", 0)
        if step <= 0:
            continue
        tl = train_loss_at(r.train_rows, step, max(1, interval // 2))
        if tl is not None:
            pts.append((tl, row["val_loss"]))
    return pts


def fig_generalisation(res: Results, out: Path) -> Path | None:
    """Validation loss against training loss: at the same fit, a higher curve generalises less."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    handles, lo, hi = {}, math.inf, -math.inf
    for mixer, rs in _curve_runs(res).items():
        for r in rs:
            pts = generalisation_points(r)
            if len(pts) < 2:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, color=mixer_color(mixer), marker="o", ms=3, lw=1.2)
            ax.annotate("", xy=pts[-1], xytext=pts[-2],
                        arrowprops=dict(arrowstyle="->", color=mixer_color(mixer), lw=1.2))
            handles.setdefault(mixer, line)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
    if not handles:
        plt.close(fig)
        return None
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--", label="val = train")
    ax.invert_xaxis()  # training proceeds left to right
    ax.set_xlabel("training loss (nats/token, mean over the last half of each eval interval; dropout on)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("generalisation: validation vs training loss (arrow: last evaluation)")
    _legend(ax, handles)
    path = out / "val_vs_train.png"
    _save(fig, path)
    return path


def fig_flops(res: Results, out: Path) -> tuple[Path | None, set[str]]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    handles, how = {}, set()
    for mixer, rs in _curve_runs(res).items():
        for r in rs:
            xs, ys, h = flops_curve(r)
            how.add(h)
            if xs:
                (line,) = ax.plot(xs, ys, color=mixer_color(mixer), marker="o", ms=3, lw=1.2)
                handles.setdefault(mixer, line)
    if not handles:
        plt.close(fig)
        return None, how
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax, "y")
    ax.set_xlabel("cumulative training FLOPs (log scale)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title("perplexity vs training compute")
    _legend(ax, handles)
    path = out / "ppl_vs_flops.png"
    _save(fig, path)
    return path, how


def fig_lr(res: Results, out: Path) -> Path | None:
    groups = by_mixer(res.runs)
    if not any(len(lrs) > 1 for lrs in groups.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mixer, lrs in groups.items():
        xs = sorted(lrs)
        ms = [_mean_sd([r.score for r in lrs[lr]]) for lr in xs]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s or 0 for _, s in ms], color=mixer_color(mixer), marker="o",
                    ms=4, capsize=3, label=mixer)
        b = best_lr(lrs)
        ax.plot([b], [ms[xs.index(b)][0]], marker="*", ms=12, color=mixer_color(mixer), ls="none")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel("best validation loss (mean ± sd over seeds)")
    ax.set_title("learning-rate sensitivity (★ best)")
    ax.legend(fontsize=8, frameon=False)
    path = out / "lr_sensitivity.png"
    _save(fig, path)
    return path


def _bench_fig(series: dict[str, list[dict]], out: Path, name: str, xlabel: str, ylabel: str, title: str,
               logy: bool = True, styles: dict[str, str] | None = None, oom: dict[str, list[int]] | None = None) -> Path | None:
    """One line per (mixer, style) of bench rows (x = context, y = median, band = min..max)."""
    if not any(series.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, rows in series.items():
        mixer, _, style = key.partition("|")
        rows = sorted((r for r in rows if r.get("value") is not None), key=lambda r: r["context"])
        if not rows:
            continue
        xs = [r["context"] for r in rows]
        ys = [r["value"] for r in rows]
        lo = [y - (r["min"] if r.get("min") is not None else y) for r, y in zip(rows, ys)]
        hi = [(r["max"] if r.get("max") is not None else y) - y for r, y in zip(rows, ys)]
        c = mixer_color(mixer)
        ax.errorbar(xs, ys, yerr=[lo, hi], color=c, ls=(styles or {}).get(style, "-"), marker="o", ms=3, lw=1.3,
                    elinewidth=0.6, capsize=2, label=mixer + (f" ({style})" if style else ""))
    for mixer, xs in (oom or {}).items():
        if xs:
            ax.axvline(min(xs), color=mixer_color(mixer), ls=":", lw=1)
            ax.plot([min(xs)], [ax.get_ylim()[1]], marker="x", color=mixer_color(mixer), ms=8, clip_on=False)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
        _plain_log_ticks(ax, "y")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # more than six series (e.g. three decode modes per mixer): a legend inside would cover the curves
    beside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0)) if len(series) > 6 else {}
    ax.legend(fontsize=8, frameon=False, **beside)
    path = out / name
    _save(fig, path)
    return path


def fig_decode(rows: list[dict], out: Path) -> Path | None:
    series: dict[str, list[dict]] = {}
    modes = {r.get("mode", "eager") for r in _bench(rows, "latency", "decode_ms_per_token")}
    for r in _bench(rows, "latency", "decode_ms_per_token"):
        if r.get("context"):
            mode = r.get("mode", "eager")
            series.setdefault(f"{r['mixer']}|{mode if len(modes) > 1 else ''}", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: _mixer_key(k.split('|')[0]))}
    return _bench_fig(series, out, "decode_latency.png", "prompt length (tokens, log scale)",
                      "decode latency (ms/token, log scale)", "decode latency vs prompt length (batch 1)",
                      styles={"eager": "-", "cuda_graph": "--", "recompute": ":"})


def fig_memory(rows: list[dict], out: Path) -> Path | None:
    series, oom = {}, {}
    for r in _bench(rows, "memory", "peak_memory_mb"):
        if not r.get("context"):
            continue
        if r.get("oom"):
            oom.setdefault(r["mixer"], []).append(r["context"])
        else:
            series.setdefault(f"{r['mixer']}|", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: _mixer_key(k.split('|')[0]))}
    unit = next((r.get("unit") for r in _bench(rows, "memory", "peak_memory_mb")), "MB")
    return _bench_fig(series, out, "memory_vs_context.png", "context length (tokens, log scale)",
                      f"peak memory of a training step ({unit}, log scale)",
                      "peak training memory vs context (× / dotted: out of memory)", oom=oom)


def fig_throughput(rows: list[dict], out: Path) -> Path | None:
    series = {}
    for r in _throughput_rows(rows):
        series.setdefault(f"{r['mixer']}|", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: _mixer_key(k.split('|')[0]))}
    return _bench_fig(series, out, "throughput_vs_context.png", "context length (tokens, log scale)",
                      "training throughput (tokens/s, log scale)", "training throughput vs context length")


# ------------------------------------------------------------------------------------- report.md


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
            ops = merged(r.get("backend_ops") for r in _bench(res.bench, bench, mixer=mixer))
            if ops:
                parts.append(f"{bench}: {text(ops)}")
        if parts:
            lines.append(f"{mixer}: " + "; ".join(parts))
    return lines


def _param_table(res: Results) -> str:
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
        args = ", ".join(f"{k}={v}" for k, v in sorted((m.get("mixer_args") or {}).items())) or "-"
        n = r.summary.get("n_params")
        lines.append(f"| {mixer} | {m['n_layer']} | {m['n_embd']} | {heads} | {hd} | {args} | "
                     f"{n:,} ({n / 1e6:.2f}M) | {dev} |" if n else f"| {mixer} | {m['n_layer']} | {m['n_embd']} | "
                     f"{heads} | {hd} | {args} | - | {dev} |")
    return "\n".join(lines)


def _settings(res: Results) -> list[str]:
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


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md and the figures; returns the path of report.md."""
    res = load_results(root)
    out = Path(out) if out else res.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that may not be redrawn now
        old.unlink()
    md: list[str] = [f"# attnbench report: {res.name}", ""]
    mixers = list(by_mixer(res.runs))
    md.append(f"{len(res.runs)} finished runs of {', '.join(mixers) or 'no mixer'}; built "
              f"{time.strftime('%Y-%m-%d %H:%M')} from `{res.root}` (files on disk only).")
    md.append("")
    md += [f"- {s}" for s in _settings(res)]
    md.append("")
    notes = list(res.notes)
    figs: list[tuple[str, Path | None, str]] = []
    if res.runs:
        md += ["## Parameters", "", _param_table(res), ""]
        rows = bakeoff(res)
        table, foot = bakeoff_markdown(rows)
        md += ["## Bake-off", "", table, ""] + [f"- {n}" for n in foot] + [""]
        kernels = kernel_lines(res)
        if kernels:
            md += ["## Kernels behind the figures", ""] + [f"- {k}" for k in kernels] + [""]
        figs.append(("Loss against steps", fig_loss(res, out, "step"), ""))
        figs.append(("Loss against wall time", fig_loss(res, out, "time"), ""))
        p = fig_generalisation(res, out)
        if p is not None:
            figs.append(("Validation against training loss", p,
                         "Each point is an evaluation; at the same training loss, a higher point generalises less; "
                         "a curve turning up is overfitting."))
        p, how = fig_flops(res, out)
        figs.append(("Perplexity against training compute", p,
                     f"FLOPs per token from {', '.join(sorted(how))}; cumulative FLOPs = tokens seen x FLOPs per token."))
        lr_fig = fig_lr(res, out)
        if lr_fig is None:
            notes.append("learning-rate sensitivity: one learning rate per mixer was swept; no figure.")
        else:
            figs.append(("Learning-rate sensitivity", lr_fig, ""))
    if not res.bench:
        notes.append(f"no benchmark data in {res.root / 'bench'}: decode latency, memory, OOM threshold and "
                     "throughput figures and columns are omitted (run `attnbench bench all --json FILE`).")
    else:
        notes += bench_shape_mismatches(res)
        for title, fn, what in (("Decode latency against prompt length", fig_decode, "latency"),
                                ("Peak training memory against context length", fig_memory, "memory"),
                                ("Training throughput against context length", fig_throughput, "throughput")):
            p = fn(res.bench, out)
            if p is None:
                notes.append(f"no {what} benchmark rows: the '{title.lower()}' figure is omitted.")
            else:
                cap = _bench_caption(res.bench, what)
                if what == "throughput":
                    cap += crossover_text(res.bench)
                figs.append((title, p, cap))
    if figs:
        md += ["## Figures", ""]
        for title, p, cap in figs:
            if p is None:
                continue
            md += [f"### {title}", "", f"![{title}]({p.name})", ""] + ([cap, ""] if cap else [])
    if res.skipped:
        md += ["## Skipped runs", ""] + [f"- skipped: {n} ({why})" for n, why in res.skipped] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["Colours: " + ", ".join(f"{m} {mixer_color(m)}" for m in mixers) + " (the same in every figure).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    _maybe_wandb(res)
    return path


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


def _bench_caption(rows: list[dict], what: str) -> str:
    rs = _bench(rows, what)
    if not rs:
        return ""
    devs = sorted({str(r.get("device_name") or r.get("device")) for r in rs})
    dts = sorted({str(r.get("dtype")) for r in rs if r.get("dtype")})
    cap = f"Measured on {', '.join(devs)}" + (f" ({', '.join(dts)})" if dts else "")
    return cap + "; points are medians, bars min..max of the repeats."


def crossover_text(rows: list[dict], baseline: str = "softmax") -> str:
    """Where each mixer's training throughput overtakes the baseline's, from the rows' medians per context
    (log-log interpolation between the two measured contexts around it; bench.throughput.crossover)."""
    from .bench.throughput import crossover

    curves: dict[str, dict[int, float]] = {}
    for r in _throughput_rows(rows):
        curves.setdefault(r["mixer"], {})[int(r["context"])] = float(r.get("median") or r["value"])
    if baseline not in curves:
        return ""
    parts = []
    for m in sorted(set(curves) - {baseline}):
        T, how = crossover(curves[baseline], curves[m])
        parts.append(f"{m} at ~{T:,.0f} tokens ({how})" if T is not None else f"{m} does not: {how}")
    return f"\n\nOvertakes {baseline}: " + "; ".join(parts) + "." if parts else ""


def _maybe_wandb(res: Results) -> None:
    """With log.wandb_log=true in the runs and wandb installed: the bake-off table to W&B too (optional)."""
    cfgs = [r.config.get("log", {}) for r in res.runs]
    if not any(c.get("wandb_log") for c in cfgs):
        return
    try:
        import wandb
    except ImportError:
        return
    try:
        rows = bakeoff(res)
        table = wandb.Table(columns=["mixer", "lr", "seeds", "val_loss", "val_loss_sd", "final_val_loss", "ppl", "bpc",
                                     "tokens_per_s", "ms_per_iter", "peak_mem_mb"])
        for r in rows:
            table.add_data(r.mixer, r.lr, r.n, r.val_loss[0], r.val_loss[1], r.final_val_loss[0], r.ppl[0],
                           r.bpc[0] if r.bpc else None, r.tokens_per_s, r.ms_per_iter, r.peak_mem_mb)
        run = wandb.init(project=cfgs[0].get("wandb_project", "attnbench"), name=f"{res.name}-report",
                         job_type="report", dir=str(res.root))
        run.log({"bakeoff": table})
        run.finish()
    except Exception as e:  # W&B is a mirror: the report on disk is the result
        print(f"W&B logging of the bake-off table failed ({e}); the report on disk is complete")


def bakeoff_section(report_md: str | Path) -> str:
    """The bake-off table of a written report.md (for printing at the end of a sweep)."""
    text = Path(report_md).read_text()
    if "## Bake-off" not in text:
        return ""
    part = text.split("## Bake-off", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in part.strip().splitlines() if line.startswith("|"))


# ------------------------------------------------------------------------------------- CLI


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="report.md + PNG figures from a results folder",
                              description="Write report.md and PNG figures from a sweep's results folder "
                                          "(runs/ and bench/), from the files on disk alone.")
    p.add_argument("dir", help="results folder (a sweep's --out), a folder of run folders, or one run folder")
    p.add_argument("--out", default=None, help="where to write report.md and the figures (default: DIR/report)")

    def run(a: argparse.Namespace) -> int:
        path = build_report(a.dir, a.out)
        print(bakeoff_section(path))
        print(f"report: {path}")
        return 0

    p.set_defaults(func=run)
