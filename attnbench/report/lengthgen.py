"""The "Length generalisation" section: loss against position, one curve per model (its label: the mixer,
or a sweep variant such as softmax_nope), and the loss at 1x, 4x, 16x and 64x the training length, from
the rows `attnbench eval` writes to each run's eval/lengthgen.jsonl (attnbench/evaluate/)."""
from __future__ import annotations

import math
from pathlib import Path

from ..files import read_jsonl
from .colors import mixer_color, mixer_key
from .figures import _plain_log_ticks, _plt, _save
from .load import Results, RunResult
from .tables import best_lr, by_mixer

ROWS = Path("eval") / "lengthgen.jsonl"
MULTIPLES = (1, 4, 16, 64)
FIGURE = "loss_vs_position.png"


def _x(bucket: dict) -> float:
    """Where a bucket [lo, hi) of positions sits on the plot: the geometric middle of its context sizes
    (position t has seen t + 1 tokens)."""
    return math.sqrt((bucket["lo"] + 1) * bucket["hi"])


def run_rows(run_dir: Path) -> list[dict]:
    """A run's evaluation rows of one checkpoint: best when it has any, else latest."""
    p = run_dir / ROWS
    rows = [r for r in read_jsonl(p) if isinstance(r, dict) and "length" in r] if p.is_file() else []
    for ck in ("best", "latest"):
        sel = [r for r in rows if r.get("checkpoint") == ck]
        if sel:
            return sorted(sel, key=lambda r: r["length"])
    return []


def longest_ok(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("buckets")]
    return max(ok, key=lambda r: r["length"]) if ok else None


def position_curve(rows: list[dict]) -> list[dict]:
    """Loss per position bucket up to the longest evaluated window, each bucket [lo, hi) taken from the
    shortest evaluated length L >= hi: the models are causal, so the loss at position t of a window depends
    on its first t + 1 tokens only and is the same quantity in a window of any length >= t + 1; the shortest
    such windows are the most numerous (tiny Shakespeare: 435 windows of 256, six of 16384, so the early
    buckets of the longest windows alone hold six tokens each). Each bucket carries the `length` it came from."""
    ok = sorted((r for r in rows if r.get("status") == "ok" and r.get("buckets")), key=lambda r: r["length"])
    if not ok:
        return []
    out = []
    for b in ok[-1]["buckets"]:
        # the longest row holds b itself, so a source is always found
        length, got = next((r["length"], x) for r in ok for x in r["buckets"]
                           if (x["lo"], x["hi"]) == (b["lo"], b["hi"]))
        out.append({**got, "length": length})
    return out


def lowest_position(rows: list[dict]) -> str:
    """The position bucket of the lowest loss on position_curve, e.g. '2048-4095 of 16384' (0-based
    positions, out of the longest evaluated window)."""
    curve = position_curve(rows)
    if not curve:
        return "-"
    b = min(curve, key=lambda b: b["loss"])
    span = str(b["lo"]) if b["hi"] - b["lo"] == 1 else f"{b['lo']}-{b['hi'] - 1}"
    return f"{span} of {longest_ok(rows)['length']}"


def cell(rows: list[dict], target: int) -> tuple[str, int | None]:
    """The loss at the evaluated length nearest `target` (log scale), or why there is none."""
    if not rows:
        return "-", None
    r = min(rows, key=lambda r: (abs(math.log(r["length"] / target)), r["length"]))
    at = "" if r["length"] == target else f" (@{r['length']})"
    if r.get("status") == "ok":
        se = f" ± {r['se']:.4f}" if r.get("se") is not None else ""
        return f"{r['loss']:.4f}{se}{at}", r["length"]
    what = "not defined" if r.get("status") == "not_defined" else str(r.get("status", "?")).replace("_", " ")
    return f"{what}{at} ({r.get('reason') or 'no reason recorded'})", r["length"]


def curves(res: Results) -> dict[str, tuple[RunResult, list[dict]]]:
    """label -> (its run at the best learning rate, first seed, with evaluation rows; that run's rows)."""
    out = {}
    for label, lrs in by_mixer(res.runs).items():
        for r in sorted(lrs[best_lr(lrs)], key=lambda r: r.seed):
            rows = run_rows(r.path)
            if rows:
                out[label] = (r, rows)
                break
    return out


def lengthgen_section(res: Results, out: Path) -> list[str]:
    """Markdown lines of the section (with its figure written to `out`), or [] when no run was evaluated."""
    data = curves(res)
    if not data:
        return []
    series = {label: (curve, r.config["model"]["block_size"]) for label, (r, rows) in data.items()
              if (curve := position_curve(rows))}
    fig = fig_lengthgen(series, out / FIGURE)
    has_se = any(b.get("se") is not None for curve, _ in series.values() for b in curve)
    trained = sorted({r.config["model"]["block_size"] for r, _ in data.values()})
    base = trained[0]
    head = ["model", "model.pos_emb", "trained at"] + [f"{m}x ({m * base})" for m in MULTIPLES] + \
        ["lowest loss at positions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in sorted(data, key=mixer_key):
        r, rows = data[label]
        T = r.config["model"]["block_size"]
        cells = [label, str(r.config["model"].get("pos_emb", "-")), str(T)]
        cells += [cell(rows, m * T)[0] for m in MULTIPLES]
        cells.append(lowest_position(rows))
        lines.append("| " + " | ".join(cells) + " |")
    ck = {rows[0].get("checkpoint") for _, rows in data.values()}
    md = ["## Length generalisation", "",
          f"Each model evaluated ({', '.join(sorted(map(str, ck)))} checkpoint) on the validation split in "
          "non-overlapping windows of each length (the same windows for every model), one full forward per window. "
          "Cells: mean loss over every token of the windows of that length (the nearest evaluated length when "
          "not exactly the multiple, marked @), ± its standard error over windows where recorded; 'not defined': "
          "the model cannot represent that length. "
          "Loss against position and lowest loss at positions: each position bucket [lo, hi) from the shortest "
          "evaluated windows that hold it (length >= hi; the models are causal, so a position's loss does not depend "
          "on how far the window goes on, and shorter windows are more numerous). "
          "model.pos_emb is the model's embedding; NSA applies its own RoPE in every case. "
          "docs/length-generalisation.md says what to expect of each mixer.", "", *lines, ""]
    if fig is not None:
        md += [f"![Loss against position]({fig.name})", "",
               "Loss per position bucket (powers of two) up to the longest window each model could run, each bucket "
               "from the shortest windows that hold it" + ("; shaded: +- 2 standard errors of the bucket's mean "
                                                           "over windows" if has_se else "") +
               ". The dashed line is the training length; right of it the model sees more context than in "
               "training.", ""]
    return md


def _band(ax, buckets: list[dict], color) -> None:
    """Shade loss +- 2 standard errors over windows where the rows carry them."""
    b = [x for x in buckets if x.get("se") is not None]
    if b:
        ax.fill_between([_x(x) for x in b], [x["loss"] - 2 * x["se"] for x in b],
                        [x["loss"] + 2 * x["se"] for x in b], color=color, alpha=0.15, lw=0)


def fig_lengthgen(series: dict[str, tuple[list[dict], int]], path: Path) -> Path | None:
    """Loss against position (log x), one curve per model (label -> (its position_curve, training length)),
    the training length(s) marked."""
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label in sorted(series, key=mixer_key):
        b, _ = series[label]
        ax.plot([_x(x) for x in b], [x["loss"] for x in b], marker="o", ms=3, color=mixer_color(label),
                label=f"{label} (to {b[-1]['hi']})")
        _band(ax, b, mixer_color(label))
    for T in sorted({T for _, T in series.values()}):
        ax.axvline(T, color="0.4", ls="--", lw=1)
        ax.annotate(f"training length {T}", (T, 1), xycoords=("data", "axes fraction"), fontsize=7,
                    ha="right", va="top", rotation=90, color="0.3")
    ax.set_xscale("log")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel("position (tokens of context seen)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Length generalisation: loss against position")
    ax.legend(fontsize=8, frameon=False)
    _save(fig, path)
    return path


def fig_run_lengthgen(rows: list[dict], path: Path) -> Path | None:
    """One run: loss against position, one curve per evaluated length, the training length marked."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("buckets")]
    if not ok:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in sorted(ok, key=lambda r: r["length"]):
        b = r["buckets"]
        line, = ax.plot([_x(x) for x in b], [x["loss"] for x in b], marker="o", ms=3, label=f"windows of {r['length']}")
        _band(ax, b, line.get_color())
    T = ok[0]["block_size"]
    ax.axvline(T, color="0.4", ls="--", lw=1)
    ax.set_xscale("log")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel("position (tokens of context seen)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{ok[0].get('label', ok[0].get('mixer'))}: loss against position (trained at {T})")
    ax.legend(fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path
