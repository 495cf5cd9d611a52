"""The "Recall (MQAR)" section of a report: accuracy against width per (L, K) (Zoology's figure 2 layout),
accuracy against the decode state in bytes (the Based paper's recall/state plot), and the table behind both.

A point is (mixer, L, K, width); of its runs (one per learning rate and seed) the one with the best test
accuracy is kept, as Zoology keeps the best of its learning-rate grid. State size: the mixer's
`decode_state_elements(cfg, L)` (one layer, one sequence, after L tokens) x n_layer x 4 bytes, Zoology's
convention (float32 numbers; softmax's state is its KV cache at L, 2 x width x L per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import mixers as registry
from ..config import ModelConfig
from .colors import mixer_color, mixer_key
from .figures import _plt, _save
from .lengthgen import run_rows
from .load import RunResult

BYTES_PER_ELEMENT = 4  # Zoology's state-size convention (float32)


def is_recall(r: RunResult) -> bool:
    return r.config.get("task", {}).get("kind") == "mqar"


def state_bytes(cfg: dict, T: int) -> int | None:
    """Decode-state bytes of one sequence after T tokens, summed over layers; None if the mixer is unknown."""
    m = {k: v for k, v in cfg["model"].items() if k in ModelConfig.__dataclass_fields__}
    try:
        mc = ModelConfig(**m)
        return int(registry.get(mc.mixer).decode_state_elements(mc, T)) * mc.n_layer * BYTES_PER_ELEMENT
    except Exception:  # a mixer not registered here (results from elsewhere): the column stays empty
        return None


@dataclass
class RecallPoint:
    mixer: str
    seq_len: int
    num_kv_pairs: int
    width: int
    accuracy: float  # best test accuracy of the best run
    lr: float  # that run's learning rate
    lrs: int  # learning rates tried
    n_params: int | None
    state_bytes: int | None
    steps: int
    early_stopped_at: int | None


def _acc(r: RunResult) -> float:
    a = r.summary.get("best_val_accuracy")
    if isinstance(a, (int, float)):
        return float(a)
    return max((float(e["val_accuracy"]) for e in r.eval_rows if "val_accuracy" in e), default=0.0)


def _groups(runs: list[RunResult]) -> dict[tuple[str, int, int, int], list[RunResult]]:
    """The runs of each recall point (mixer, L, K, width): its learning rates."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        t = r.config["task"]
        groups.setdefault((r.mixer, int(t["seq_len"]), int(t["num_kv_pairs"]), int(r.config["model"]["n_embd"])),
                          []).append(r)
    return groups


def _best(rs: list[RunResult]) -> RunResult:
    """The run with the best accuracy (ties: the lower learning rate), Zoology's rule over its grid."""
    return max(rs, key=lambda r: (_acc(r), -r.lr))


def recall_points(runs: list[RunResult]) -> list[RecallPoint]:
    """One point per (mixer, L, K, width): its best run."""
    out = []
    for (mixer, L, K, d), rs in _groups(runs).items():
        best = _best(rs)
        out.append(RecallPoint(mixer, L, K, d, _acc(best), best.lr, len({r.lr for r in rs}),
                               best.summary.get("n_params"), state_bytes(best.config, L),
                               int(best.summary.get("steps", 0)), best.summary.get("early_stopped_at")))
    return sorted(out, key=lambda p: (p.seq_len, p.num_kv_pairs, mixer_key(p.mixer), p.width))


def _settings(points: list[RecallPoint]) -> list[tuple[int, int]]:
    return sorted({(p.seq_len, p.num_kv_pairs) for p in points})


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def recall_table(points: list[RecallPoint]) -> str:
    lines = ["| L | K | mixer | width | parameters | state / sequence | accuracy | best lr | steps |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        steps = f"{p.steps} (stopped)" if p.early_stopped_at is not None else str(p.steps)
        n = f"{p.n_params:,}" if isinstance(p.n_params, int) else "-"
        lines.append(f"| {p.seq_len} | {p.num_kv_pairs} | {p.mixer} | {p.width} | {n} | {_bytes(p.state_bytes)} | {p.accuracy:.3f} | "
                     f"{p.lr:g} (of {p.lrs}) | {steps} |")
    return "\n".join(lines)


def _panels(points: list[RecallPoint], out: Path, name: str, x: str, xlabel: str) -> Path | None:
    settings = _settings(points)
    if not settings:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings) + 0.8, 3.2), squeeze=False, sharey=True)
    for ax, (L, K) in zip(axes[0], settings):
        here = [p for p in points if (p.seq_len, p.num_kv_pairs) == (L, K)]
        for mixer in sorted({p.mixer for p in here}, key=mixer_key):
            pts = sorted((getattr(p, x), p.accuracy) for p in here if p.mixer == mixer and getattr(p, x) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, color=mixer_color(mixer), label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"L = {L}, K = {K}")
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel("MQAR accuracy (test)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / name
    _save(fig, path)
    return path


def fig_accuracy_vs_width(points: list[RecallPoint], out: Path) -> Path | None:
    return _panels(points, out, "recall_vs_width.png", "width", "model width (n_embd)")


def fig_accuracy_vs_state(points: list[RecallPoint], out: Path) -> Path | None:
    return _panels(points, out, "recall_vs_state.png", "state_bytes", "decode state per sequence (bytes, all layers)")


# ---------------------------------------------------------------- other lengths (`attnbench eval`)

def fig_run_recall_lengths(rows: list[dict], path: Path) -> Path | None:
    """One run: test accuracy against test length (pairs growing with it), the training length marked."""
    ok = [r for r in rows if r.get("status") == "ok" and "accuracy" in r]
    if not ok:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot([r["length"] for r in ok], [r["accuracy"] for r in ok], marker="o", color=mixer_color(ok[0]["mixer"]))
    ax.axvline(ok[0]["block_size"], color="0.4", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test length L' (K' = K L' / L pairs)")
    ax.set_ylabel("MQAR accuracy (test)")
    ax.set_title(f"{ok[0].get('label', ok[0]['mixer'])}: accuracy against length (trained at {ok[0]['block_size']})")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path


def _length_points(runs: list[RunResult]) -> dict[tuple, dict[int, dict]]:
    """(L, K, width, mixer) of each recall point -> {length: its best run's `attnbench eval` row}."""
    out = {}
    for (mixer, L, K, d), rs in _groups(runs).items():
        rows = {row["length"]: row for row in run_rows(_best(rs).path) if row.get("task") == "mqar"}
        if rows:
            out[(L, K, d, mixer)] = rows
    return out


def fig_accuracy_vs_length(points: dict[tuple, dict[int, dict]], out: Path) -> Path | None:
    panels = sorted({k[:3] for k in points})
    if not panels:
        return None
    plt = _plt()
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows_n), squeeze=False, sharey=True)
    for ax, (L, K, d) in zip(axes.flat, panels):
        for key in sorted((k for k in points if k[:3] == (L, K, d)), key=lambda k: mixer_key(k[3])):
            ok = sorted((n, row["accuracy"]) for n, row in points[key].items() if row.get("status") == "ok")
            if ok:
                ax.plot(*zip(*ok), marker="o", ms=4, color=mixer_color(key[3]), label=key[3])
        ax.axvline(L, color="0.4", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"trained at L = {L}, K = {K}; width {d}", fontsize=9)
        ax.set_xlabel("test length L'")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("MQAR accuracy (test)")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = out / "recall_vs_length.png"
    _save(fig, path)
    return path


def length_table(points: dict[tuple, dict[int, dict]]) -> str:
    lengths = sorted({n for rows in points.values() for n in rows})
    lines = ["| L | K | width | mixer | " + " | ".join(f"L' = {n}" for n in lengths) + " |",
             "|---:|---:|---:|---|" + "---:|" * len(lengths)]
    for key in sorted(points, key=lambda k: (k[0], k[1], k[2], mixer_key(k[3]))):
        cells = []
        for n in lengths:
            row = points[key].get(n)
            cells.append("-" if row is None else f"{row['accuracy']:.3f} (K' {row['num_kv_pairs']})"
                         if row.get("status") == "ok" else row["status"].replace("_", " "))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_section(runs: list[RunResult], out: Path) -> list[str]:
    """The section's markdown lines (figures written into `out`)."""
    points = recall_points(runs)
    md = ["## Recall (MQAR)", "",
          f"{len(runs)} MQAR runs; per mixer, (L, K) and width the run with the best test accuracy over its "
          "learning rates is kept (Zoology's rule). Accuracy: per example, the fraction of its K queries answered "
          "right, averaged over the test examples. State: decode state of one sequence after L tokens, summed "
          f"over layers, {BYTES_PER_ELEMENT} bytes per number (softmax: its KV cache). docs/recall.md explains the "
          "task and how it compares with Zoology.", "", recall_table(points), ""]
    for title, p, cap in (
            ("Accuracy against model width", fig_accuracy_vs_width(points, out),
             "One panel per (L, K), one line per mixer (Zoology's figure 2 layout)."),
            ("Accuracy against state size", fig_accuracy_vs_state(points, out),
             "One point per (mixer, width); further right is a larger state. Softmax's state grows with L."),):
        if p is not None:
            md += [f"### {title}", "", f"![{title}]({p.name})", "", cap, ""]
    lengths = _length_points(runs)
    fig = fig_accuracy_vs_length(lengths, out)
    if fig is not None:
        md += ["### Accuracy at other lengths", "",
               "`attnbench eval` on these runs: each point's best run tested on MQAR sequences of other lengths L' "
               "with K' = K L' / L pairs (Zoology tests its train-at-256 models at 512 and 1024); the dashed line "
               "is the training length.", "", f"![Accuracy at other lengths]({fig.name})", "",
               length_table(lengths), ""]
    return md
