"""report.md: the settings, tables, figures, skipped runs and notes of a results folder, in one file."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..files import atomic_write_text
from .colors import mixer_color, mixer_label
from .figures import fig_decode, fig_flops, fig_generalisation, fig_loss, fig_lr, fig_memory, fig_throughput
from .lengthgen import lengthgen_section
from .load import load_results
from .recall import is_recall, recall_section
from .tables import (bakeoff, bakeoff_markdown, bench_caption, bench_shape_mismatches, by_mixer, crossover_text,
                     kernel_lines, param_table, settings_lines)
from .wandb_table import log_bakeoff_to_wandb


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md and the figures; returns the path of report.md."""
    res = load_results(root)
    recall_runs = [r for r in res.runs if is_recall(r)]
    res = dataclasses.replace(res, runs=[r for r in res.runs if not is_recall(r)])  # the LM sections' runs
    out = Path(out) if out else res.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that may not be redrawn now
        old.unlink()
    md: list[str] = [f"# attnbench report: {res.name}", ""]
    mixers = list(by_mixer(res.runs + recall_runs))
    labels = [mixer_label(m) for m in mixers]
    md.append(f"{len(res.runs) + len(recall_runs)} finished runs of {', '.join(labels) or 'no mixer'}; built "
              f"{time.strftime('%Y-%m-%d %H:%M')} from `{res.root}` (files on disk only).")
    md.append("")
    md += [f"- {s}" for s in settings_lines(res)]
    md.append("")
    notes = list(res.notes)
    figs: list[tuple[str, Path | None, str]] = []
    if recall_runs:  # MQAR runs: accuracy against width and state; loss curves of a recall task say little
        md += recall_section(recall_runs, out)
    if res.runs:
        md += ["## Parameters", "", param_table(res), ""]
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
    if not res.bench and res.runs:
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
                cap = bench_caption(res.bench, what)
                if what == "throughput":
                    cap += crossover_text(res.bench)
                figs.append((title, p, cap))
    if figs:
        md += ["## Figures", ""]
        for title, p, cap in figs:
            if p is None:
                continue
            md += [f"### {title}", "", f"![{title}]({p.name})", ""] + ([cap, ""] if cap else [])
    md += lengthgen_section(res, out)
    if res.skipped:
        md += ["## Skipped runs", ""] + [f"- skipped: {n} ({why})" for n, why in res.skipped] + [""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["Colours: " + ", ".join(f"{mixer_label(m)} {mixer_color(m)}" for m in mixers) + " (the same in every figure).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    log_bakeoff_to_wandb(res)
    return path


def bakeoff_section(report_md: str | Path) -> str:
    """The bake-off table of a written report.md (for printing at the end of a sweep)."""
    return _section_table(report_md, "## Bake-off")


def lengthgen_table(report_md: str | Path) -> str:
    """The length-generalisation table of a written report.md, or '' when it has none."""
    return _section_table(report_md, "## Length generalisation")


def _section_table(report_md: str | Path, heading: str) -> str:
    text = Path(report_md).read_text()
    if heading not in text:
        return ""
    part = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in part.strip().splitlines() if line.startswith("|"))

