"""The results: one JSON row per measurement (the fields every row carries, the measured value and its
spread), written as soon as it exists, and the text tables the benchmarks print."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .shapes import BenchShape, shape_dict
from .timing import Precision, device_name, summarize


def backend_summary(seen: dict[str, str]) -> str:
    """'torch', 'fla', 'fla+torch', ... from what attnbench.ops.backend.record_backends recorded."""
    kinds = set()
    for v in seen.values():
        kinds.update(v.split("+"))
    if not kinds:
        return "torch"
    return "+".join(sorted(kinds))


def base_row(bench: str, shape: BenchShape, cfg: ModelConfig, n_params: int, device: str, prec: Precision) -> dict:
    """Fields every row carries; the benchmark adds metric, value, median/min/max, unit, ..."""
    return {
        "bench": bench,
        "mixer": shape.mixer,
        "n_params": n_params,
        "n_params_matched": shape.n_params_matched,
        "shape": shape_dict(cfg),
        "shape_source": shape.source,
        "pos_emb_note": (f"the trained config's pos_emb={shape.cfg.pos_emb!r} replaced by {cfg.pos_emb!r} for "
                         "benchmarking (see attnbench/bench/shapes.py)") if shape.cfg.pos_emb != cfg.pos_emb else None,
        "device": device,
        "device_name": device_name(device),
        "dtype": prec.name,
        "config_backend": cfg.backend,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def measured(row: dict, metric: str, unit: str, samples: list[float] | None, **extra) -> dict:
    """Fill a row with the measured value (the median) and its spread."""
    s = summarize(samples or [])
    row = dict(row)
    row.update(metric=metric, unit=unit, value=s["median"], median=s["median"], min=s["min"], max=s["max"],
               repeats=s["n"], oom=False, error=None)
    row.update(extra)
    return row


class RowWriter:
    """Collects rows and appends each as one JSON line to `path` (when given) as soon as it exists, so a
    benchmark killed half-way keeps what it measured."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=_json_default) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1 - int(math.log10(abs(v))), 0)}f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def print_table(title: str, headers: list[str], rows: list[list[Any]], file=None) -> None:
    file = file or sys.stdout
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}", file=file)
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
    file.flush()
