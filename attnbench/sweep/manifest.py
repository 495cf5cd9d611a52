"""A sweep's records on disk: the manifest, the folder lock, and each run's state.

`<out>/runs/<run-id>/` holds what `attnbench train` writes (config.json, metrics.jsonl, ckpt/,
summary.json last) plus run.json (the resolved config the sweep launched it with, its parameter match
and its launches: device and how many runs shared it, which matters for speed numbers). A run with a
valid summary.json is done and skipped, one with a checkpoint is resumed from it (`train.resume`), one
with neither is started (files of an attempt killed before its first checkpoint are discarded first).
`<out>/sweep.json` (written atomically) is the manifest: the plan, every run's status and launches. A
lock file keeps two sweeps out of one folder.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..checkpoint import latest_checkpoint
from ..errors import AttnbenchError
from ..files import atomic_write_json
from .plan import PlannedRun
from .spec import Sweep

RUN_FILE, MANIFEST, LOCK = "run.json", "sweep.json", ".sweep.lock"


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


class _Manifest:
    """<out>/sweep.json: the plan and every run's status, rewritten atomically on each change."""

    def __init__(self, out: Path, sweep: Sweep, runs: list[PlannedRun]):
        self.path = out / MANIFEST
        old = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(self.path.read_text())
        prev = old.get("runs", {}) if isinstance(old, dict) else {}
        self.data = {
            "name": sweep.name, "sweep_file": str(sweep.path), "sweep_text": sweep.text,
            "created": old.get("created", _now()) if isinstance(old, dict) else _now(), "updated": _now(),
            "mixers": sweep.mixers, "param_budget": sweep.param_budget,
            # what an earlier sweep recorded about a run (status, attempts, last pid) is kept
            "runs": {r.run_id: {"status": "pending", "attempts": 0, **prev.get(r.run_id, {}), "mixer": r.mixer,
                                "label": r.label,
                                "learning_rate": r.learning_rate, "seed": r.seed, "dir": f"runs/{r.run_id}",
                                "match": r.match} for r in runs},
            "bench": old.get("bench", {}) if isinstance(old, dict) else {},
        }

    def set(self, run_id: str, **kw: Any) -> None:
        self.data["runs"][run_id].update(kw)
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """One sweep per folder at a time (released by the OS when the process dies, even by SIGKILL)."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AttnbenchError(f"another sweep is running in {out} (lock {out / LOCK}); wait for it or stop it") from None
    try:
        yield
    finally:
        f.close()


def _tail_metrics(path: Path) -> dict[str, Any]:
    """Latest training row of a metrics file, reading only its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if "loss" in row:
                return row
    return {}


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary when it is complete and readable, else None."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and isinstance(s.get("final_val_loss"), (int, float)) else None


def run_state(run_dir: Path) -> tuple[str, int | None]:
    """('done' | 'resume' | 'new' | 'stale', checkpoint step). 'stale': files of an attempt that died
    before its first checkpoint (nothing to resume from)."""
    if read_summary(run_dir) is not None:
        return "done", None
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        try:
            step = int(json.loads((run_dir / "ckpt" / "latest.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            step = int(ck.name.split("_")[1].split("-")[0]) if ck.name.startswith("step_") else None
        return "resume", step
    if any((run_dir / f).exists() for f in ("metrics.jsonl", "config.json", "summary.json", "ckpt")):
        return "stale", None
    return "new", None


def _clear_stale(run_dir: Path) -> None:
    for name in ("metrics.jsonl", "config.json", "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)


def _write_run_file(run_dir: Path, r: PlannedRun, sweep: Sweep, launches: list[dict] | None = None) -> None:
    """RUN_DIR/run.json: what the child trains (the resolved config) and every launch of it so far."""
    old = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((run_dir / RUN_FILE).read_text())
    atomic_write_json(run_dir / RUN_FILE, {
        "run_id": r.run_id, "sweep": sweep.name, "mixer": r.mixer, "label": r.label, "learning_rate": r.learning_rate, "seed": r.seed,
        "match": r.match, "config": r.config,
        "launches": launches if launches is not None else old.get("launches", []),
    })
