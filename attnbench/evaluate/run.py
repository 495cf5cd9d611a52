"""Evaluating trained runs at many lengths: which runs a folder holds, the checks made before any work,
one run's evaluation (windows batched to a token budget, halved on CUDA out-of-memory) and its output,
`<run>/eval/lengthgen.jsonl` (one row per length) and `<run>/eval/lengthgen.png`. A recall (MQAR) run is
evaluated on MQAR test sets of each length instead (recall_lengths.py): accuracy against length.

Each model runs its own full forward over a whole window (model(x), no state): softmax's causal
attention, the delta family's chunked forward, NSA's sparse path. A model with learned position
embeddings has no embedding for positions past block_size: such a length gets a "not_defined" row with
the reason, never a truncated window.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import Corpus
from ..errors import AttnbenchError, did_you_mean
from ..files import atomic_write_text, read_jsonl
from ..report.lengthgen import fig_run_lengthgen
from ..report.recall import fig_run_recall_lengths
from ..resolve import load_config
from ..sample import CHECKPOINTS, load_run_checkpoint
from ..trainer import resolve_dtype
from .positions import BucketSums
from .recall_lengths import evaluate_recall_length, scaled_task
from .windows import check_length, eval_windows

ROWS, FIGURE = Path("eval") / "lengthgen.jsonl", Path("eval") / "lengthgen.png"
DEFAULT_BATCH_TOKENS = 1 << 16


@dataclass
class RunToEval:
    path: Path
    cfg: RunConfig
    label: str
    val_tokens: int


def run_label(run_dir: Path, mixer: str) -> str:
    """The run's label in a sweep (run.json's `label`: a variant such as softmax_nope), else its mixer."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        label = json.loads((run_dir / "run.json").read_text()).get("label")
        if isinstance(label, str) and label:
            return label
    return mixer


def find_runs(path: str | Path) -> tuple[list[Path], list[str]]:
    """The finished run folders of a run or sweep folder, and notes on the unfinished ones skipped.
    AttnbenchError when the folder is neither."""
    root = Path(path)
    if not root.is_dir():
        raise AttnbenchError(f"{root} is not a folder: pass a run folder (its config.json) or a sweep's --out folder")
    if (root / "config.json").is_file():
        if not (root / "summary.json").is_file():
            raise AttnbenchError(f"{root} is an unfinished run (no summary.json); finish training it first")
        return [root], []
    base = root / "runs"
    if not base.is_dir():
        raise AttnbenchError(f"{root} is neither a run folder (no config.json) nor a sweep folder (no runs/); pass "
                             "the --out_dir of `attnbench train` or the --out of `attnbench sweep`")
    runs, notes = [], []
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        if (d / "config.json").is_file() and (d / "summary.json").is_file():
            runs.append(d)
        else:
            notes.append(f"{d.name}: not finished (no summary.json); not evaluated")
    if not runs:
        raise AttnbenchError(f"{root} holds no finished run in runs/; train the sweep first")
    return runs, notes


def check_runs(runs: list[Path], lengths: list[int], checkpoint: str, data_dir: str | None) -> list[RunToEval]:
    """Every check before any work: the checkpoint name, each run's config, data and checkpoint, and every
    length against each run's validation split."""
    if checkpoint not in CHECKPOINTS:
        raise AttnbenchError(f"unknown checkpoint {checkpoint!r}: use one of {', '.join(CHECKPOINTS)}"
                             f"{did_you_mean(checkpoint, CHECKPOINTS)}")
    out = []
    for run in runs:
        cfg = load_config(json.loads((run / "config.json").read_text()))
        if data_dir is not None:
            cfg.data.data_dir = data_dir
        if checkpoint == "best" and not (run / "ckpt" / "best.json").is_file():
            raise AttnbenchError(f"{run} has no best checkpoint (no ckpt/best.json): it was trained by an attnbench "
                                 "that did not keep one; use --checkpoint latest")
        if cfg.task.kind == "mqar":  # a recall run: MQAR test sets at each length, not the text's windows
            for n in lengths:
                scaled_task(cfg.task, n)
            out.append(RunToEval(run, cfg, run_label(run, cfg.model.mixer), 0))
            continue
        corpus = Corpus.load(cfg.data.data_dir, cfg.data.dataset, auto_prepare=False)
        for n in lengths:
            check_length(len(corpus.val), n, f"{corpus.folder} (run {run})")
        out.append(RunToEval(run, cfg, run_label(run, cfg.model.mixer), len(corpus.val)))
    return out


def not_defined_reason(cfg: RunConfig, length: int) -> str | None:
    """Why the model cannot represent a window of `length` tokens, or None."""
    m = cfg.model
    if m.pos_emb == "learned" and length > m.block_size:
        return f"learned position embeddings stop at block_size {m.block_size}"
    return None


def _losses(model, x: torch.Tensor, y: torch.Tensor, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ctx = (torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") and dtype != torch.float32
           else contextlib.nullcontext())
    with torch.no_grad(), ctx:
        logits, _ = model(x.to(device))
        return F.cross_entropy(logits.float().transpose(1, 2), y.to(device), reduction="none")


def evaluate_length(model, x: torch.Tensor, y: torch.Tensor, device: str, batch_tokens: int,
                    dtype: torch.dtype = torch.float32) -> tuple[BucketSums | None, int]:
    """Bucket sums over every window (None: one window alone ran out of GPU memory) and the batch it ran
    at. Starts at batch_tokens // length windows per batch and halves on CUDA out-of-memory."""
    n, length = x.shape
    sums = BucketSums(length)
    batch = max(1, min(n, batch_tokens // length))
    i = 0
    while i < n:
        oom = False
        try:
            sums.add(_losses(model, x[i:i + batch], y[i:i + batch], device, dtype))
        except torch.OutOfMemoryError:
            oom = True  # handled outside the except block, so the error does not pin the batch's tensors
        if oom:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            if batch == 1:
                return None, 1
            batch //= 2
            continue
        i += batch
    return sums, batch


def evaluate_run(run: RunToEval, lengths: list[int], checkpoint: str = "best", device: str = "cpu",
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, plot: bool = True) -> list[dict]:
    """Evaluate one checked run at every length; writes its rows (replacing earlier rows of the same
    checkpoint and length) and its figure. Returns this evaluation's rows."""
    model, cfg, ckpt = load_run_checkpoint(run.path, checkpoint, device)
    recall = cfg.task.kind == "mqar"
    corpus = None if recall else Corpus.load(run.cfg.data.data_dir, run.cfg.data.dataset, auto_prepare=False)
    step = _step_of(ckpt)
    dtype = resolve_dtype(cfg, "cuda" if device.startswith("cuda") else "cpu")  # as the run was trained
    base = {"run": run.path.name, "label": run.label, "mixer": cfg.model.mixer, "pos_emb": cfg.model.pos_emb,
            "block_size": cfg.model.block_size, "checkpoint": checkpoint, "checkpoint_dir": ckpt.name, "step": step,
            "device": device, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for length in lengths:
        row = {**base, "length": length, "ratio": length / cfg.model.block_size}
        reason = not_defined_reason(cfg, length)
        if reason is not None:
            rows.append({**row, "status": "not_defined", "reason": reason})
            continue
        t0 = time.perf_counter()
        if recall:
            got = evaluate_recall_length(model, cfg.task, length, device, dtype, batch_tokens)
            rows.append({**row, "status": "ok", "reason": None, **got, "seconds": round(time.perf_counter() - t0, 3)}
                        if got is not None else
                        {**row, "status": "out_of_memory", "reason": f"one example of {length} tokens does not fit "
                                                                     "in GPU memory"})
            continue
        x, y = eval_windows(corpus.val, length)
        sums, batch = evaluate_length(model, x, y, device, batch_tokens, dtype)
        if sums is None:
            rows.append({**row, "status": "out_of_memory", "windows": len(x),
                         "reason": f"one window of {length} tokens does not fit in GPU memory"})
            continue
        rows.append({**row, "status": "ok", "reason": None, "windows": sums.windows, "tokens": sums.tokens,
                     "loss": sums.mean(), "se": sums.mean_se(), "bpc": corpus.bits_per_char(sums.mean()),
                     "batch_windows": batch,
                     "seconds": round(time.perf_counter() - t0, 3), "buckets": sums.rows()})
    _write_rows(run.path, rows)
    if plot:
        (fig_run_recall_lengths if recall else fig_run_lengthgen)(read_rows(run.path, checkpoint), run.path / FIGURE)
    del model
    return rows


def _step_of(ckpt: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((ckpt / "manifest.json").read_text())["step"])
    with contextlib.suppress(IndexError, ValueError):
        return int(ckpt.name.split("_")[1].split("-")[0])
    return None


def read_rows(run_dir: Path, checkpoint: str | None = None) -> list[dict]:
    p = run_dir / ROWS
    rows = [r for r in read_jsonl(p) if isinstance(r, dict)] if p.is_file() else []
    return [r for r in rows if checkpoint is None or r.get("checkpoint") == checkpoint]


def _write_rows(run_dir: Path, new: list[dict]) -> None:
    keys = {(r["checkpoint"], r["length"]) for r in new}
    kept = [r for r in read_rows(run_dir) if (r.get("checkpoint"), r.get("length")) not in keys]
    rows = sorted(kept + new, key=lambda r: (str(r.get("checkpoint")), int(r.get("length", 0))))
    (run_dir / ROWS).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / ROWS, "".join(json.dumps(r) + "\n" for r in rows))


def is_evaluated(run_dir: Path, lengths: list[int], checkpoint: str) -> bool:
    """Whether the run already has rows of this checkpoint for every length (a finished run's checkpoints
    do not change, so a sweep run again does not evaluate it again)."""
    rows = read_rows(run_dir, checkpoint)
    have = {r.get("length") for r in rows}
    return set(lengths) <= have


def eval_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnbenchError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    return device


def evaluate_path(path: str | Path, lengths: list[int], checkpoint: str = "best", device: str = "auto",
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, data_dir: str | None = None, skip_done: bool = False,
                  say=print) -> dict[str, list[dict]]:
    """Evaluate a run folder, or every finished run of a sweep folder; every check runs first."""
    if batch_tokens < 1:
        raise AttnbenchError(f"--batch_tokens must be >= 1, got {batch_tokens}")
    device = eval_device(device)
    runs, notes = find_runs(path)
    checked = check_runs(runs, lengths, checkpoint, data_dir)
    for n in notes:
        say(f"eval: {n}")
    out = {}
    for run in checked:
        if skip_done and is_evaluated(run.path, lengths, checkpoint):
            say(f"eval: {run.path.name}: evaluated already")
            continue
        t0 = time.perf_counter()
        rows = evaluate_run(run, lengths, checkpoint, device, batch_tokens)
        out[run.path.name] = rows
        say(f"eval: {run.label} ({run.path.name}, {checkpoint} checkpoint, step {rows[0]['step'] if rows else '?'}): "
            + ", ".join(f"{r['length']}: {_cell(r)}" for r in rows) + f" [{time.perf_counter() - t0:.1f} s]")
    return out


def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"].replace("_", " ")
    return f"accuracy {r['accuracy']:.3f}" if "accuracy" in r else f"{r['loss']:.4f}"
