"""Crash-safe file writes: write a temporary file in the same folder, fsync, then rename over the target.

A write that fails for lack of space (ENOSPC, or a quota: EDQUOT) leaves the target as it was (its
temporary file removed, a half-appended line cut off again) and raises DiskFullError naming the path,
the bytes it was writing and the space free there.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import DiskFullError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from, is a full disk. Libraries that write in native code
    wrap it: safetensors raises SafetensorError("... No space left on device (os error 28)"), torch.save
    into a Python file a RuntimeError raised while handling the OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError) or isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(os.strerror(code) in str(e) for code in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def disk_full_error(path: str | Path, needed: int | None) -> DiskFullError:
    """The error for a write of about `needed` bytes to `path` that found the disk full."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"about {format_bytes(needed)}" if needed else "more space"
    have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    return DiskFullError(f"no space left on the device writing {path}: it needs {need} ({have} in {folder}). "
                         "The files written before are intact; free some space and run the command again")


def atomic_write(path: str | Path, write: Callable[[str], None], size: int | None = None) -> None:
    """Call `write(tmp_path)` to produce the file, then move it into place atomically. `size`: about how
    many bytes `write` writes (named in the error when the disk is full)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path, size) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, size=len(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line. Closing the file hands it to the OS, so a killed process keeps every row
    written before; no fsync per row (it costs milliseconds per step): checkpoints fsync. A write that
    fails part-way (a full disk) is cut off again, so the rows before it stay whole."""
    data = (json.dumps(row) + "\n").encode("utf-8")
    with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write raises here, not at close
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
        except OSError as e:
            try:
                f.truncate(start)
            except OSError:
                pass
            if is_disk_full(e):
                raise disk_full_error(path, len(data)) from e
            raise


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (killed mid-write) is skipped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
