"""Reading a results folder: the finished runs (RunResult), the skipped ones with the reason, and the
benchmark rows (bench/*.jsonl), with helpers that select benchmark rows by bench, metric and mixer."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnbenchError
from ..files import read_jsonl


@dataclass
class RunResult:
    """One finished run folder: config.json, summary.json, metrics.jsonl and (sweep runs) run.json."""

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
    def label(self) -> str:
        """What the report calls the run: its sweep variant's label (run.json), else its mixer."""
        label = self.run_meta.get("label")
        return label if isinstance(label, str) and label else self.mixer

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
    """Everything a report is built from."""

    root: Path
    runs: list[RunResult]
    skipped: list[tuple[str, str]]
    bench: list[dict[str, Any]]  # benchmark rows
    notes: list[str]
    name: str  # the sweep's name, else the folder's


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


def read_bench_rows(root: Path) -> list[dict]:
    """Every row of root/bench/*.jsonl that names its benchmark and mixer."""
    rows = []
    for p in sorted((root / "bench").glob("*.jsonl")) if (root / "bench").is_dir() else []:
        rows += [r for r in read_jsonl(p) if isinstance(r, dict) and "bench" in r and "mixer" in r]
    return rows


def load_results(root: str | Path) -> Results:
    """The runs, skipped runs, benchmark rows and notes of a results folder (see attnbench.report)."""
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
    return Results(root, runs, skipped, read_bench_rows(root), notes, name)


def select_rows(rows: list[dict], bench: str, metric: str | None = None, mixer: str | None = None) -> list[dict]:
    """The rows of one benchmark (latency, memory, throughput), of one metric and mixer when given."""
    return [r for r in rows if r.get("bench") == bench and (metric is None or r.get("metric") == metric)
            and (mixer is None or r.get("mixer") == mixer)]


def throughput_rows(rows: list[dict]) -> list[dict]:
    """Training-throughput measurements (tokens/s) with a context length."""
    out = []
    for r in select_rows(rows, "throughput"):
        unit, metric = str(r.get("unit", "")), str(r.get("metric", ""))
        if ("tokens/s" in unit or "tokens_per_s" in metric) and r.get("context") and r.get("value") is not None:
            out.append(r)
    return out

