"""The report's PNG figures, and the curves behind them (FLOPs, generalisation points).

matplotlib is heavy to import and only drawing needs it (a heavy optional dependency in the sense of the
import rules): it is imported inside the functions that draw, so loading results and building tables do
not load it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..flops import train_flops_per_token
from .colors import mixer_color, mixer_key
from .load import Results, RunResult, select_rows, throughput_rows
from .tables import best_lr, by_mixer, mean_sd


def _flops_per_token(cfg: dict) -> tuple[float | None, str]:
    """Training FLOPs per token of a run's model and where the number comes from."""
    m = dict(cfg["model"])
    try:
        mc = ModelConfig(**{k: v for k, v in m.items() if k in ModelConfig.__dataclass_fields__})
    except TypeError:
        return None, "unreadable model config"
    try:
        return float(train_flops_per_token(mc)), "attnbench.flops.train_flops_per_token"
    except Exception:  # a mixer unknown here or its optional dependency missing: 6 N (the dense-GPT rule)
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


def _plt():
    """pyplot with the report's style, drawing to files (Agg)."""
    import matplotlib  # heavy, only drawing needs it: imported here (module docstring)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _plain_log_ticks(ax, which: str = "y") -> None:
    """Plain numbers (6, 8, 10 / 64, 256) instead of 6x10^0 / 2^6 on a log axis; minor ticks are
    labelled too when the axis spans less than about a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # heavy: imported where drawn (see _plt)

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
    import matplotlib.pyplot as plt  # heavy: imported where drawn (see _plt)

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
        ms = [mean_sd([r.score for r in lrs[lr]]) for lr in xs]
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
    modes = {r.get("mode", "eager") for r in select_rows(rows, "latency", "decode_ms_per_token")}
    for r in select_rows(rows, "latency", "decode_ms_per_token"):
        if r.get("context"):
            mode = r.get("mode", "eager")
            series.setdefault(f"{r['mixer']}|{mode if len(modes) > 1 else ''}", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: mixer_key(k.split('|')[0]))}
    return _bench_fig(series, out, "decode_latency.png", "prompt length (tokens, log scale)",
                      "decode latency (ms/token, log scale)", "decode latency vs prompt length (batch 1)",
                      styles={"eager": "-", "cuda_graph": "--", "recompute": ":"})


def fig_memory(rows: list[dict], out: Path) -> Path | None:
    series, oom = {}, {}
    for r in select_rows(rows, "memory", "peak_memory_mb"):
        if not r.get("context"):
            continue
        if r.get("oom"):
            oom.setdefault(r["mixer"], []).append(r["context"])
        else:
            series.setdefault(f"{r['mixer']}|", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: mixer_key(k.split('|')[0]))}
    unit = next((r.get("unit") for r in select_rows(rows, "memory", "peak_memory_mb")), "MB")
    return _bench_fig(series, out, "memory_vs_context.png", "context length (tokens, log scale)",
                      f"peak memory of a training step ({unit}, log scale)",
                      "peak training memory vs context (× / dotted: out of memory)", oom=oom)


def fig_throughput(rows: list[dict], out: Path) -> Path | None:
    series = {}
    for r in throughput_rows(rows):
        series.setdefault(f"{r['mixer']}|", []).append(r)
    series = {k: series[k] for k in sorted(series, key=lambda k: mixer_key(k.split('|')[0]))}
    return _bench_fig(series, out, "throughput_vs_context.png", "context length (tokens, log scale)",
                      "training throughput (tokens/s, log scale)", "training throughput vs context length")

