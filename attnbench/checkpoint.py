"""Checkpoints that survive a kill at any instant and verify themselves.

Layout: <run>/ckpt/<step>-<nonce>/{model.safetensors, state.pt, manifest.json}, <run>/ckpt/latest.json and
<run>/ckpt/best.json (the folder of the best validation loss so far; pruning never removes it, so a run
keeps the checkpoint one would evaluate, whatever keep_checkpoints says).
A checkpoint folder is written under a temporary name and renamed once complete; latest.json is
replaced atomically afterwards. A kill at any point leaves latest.json naming a complete folder.
Weights are safetensors; the rest (optimizer, RNG, data position) is a torch file of tensors and
plain values, loaded with weights_only=True.

manifest.json, written last (atomically) inside the folder, records the size and sha256 of every other
file; reading a checkpoint checks them, so a file cut short (a full disk, a partial copy) or with a
flipped bit is found before it is loaded. A damaged folder is never loaded and never deleted (not by
pruning either): it stays for inspection, and resuming or sampling falls back to the newest intact
folder with a warning. A folder without manifest.json (written by an attnbench that did not write
one) is accepted as unverified when safetensors can read its header and state.pt's zip checksums hold.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .errors import AttnbenchError
from .files import atomic_write_json, disk_full_error, fsync_dir, is_disk_full

MODEL_FILE, STATE_FILE, MANIFEST, LATEST = "model.safetensors", "state.pt", "manifest.json", "latest.json"
BEST = "best.json"
PAYLOAD = (MODEL_FILE, STATE_FILE)
log = logging.getLogger(__name__)


class CheckpointError(AttnbenchError):
    """No usable checkpoint: every one is damaged, or the one found does not fit the model."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (the size estimate named when the disk is full)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2,
                    best_val: float | None = None) -> Path:
    """Write a checkpoint, name it in latest.json (and in best.json, with its loss, when `best_val` is
    given: the best validation loss so far), then prune."""
    ckdir = Path(run_dir) / "ckpt"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}-{time.time_ns() % 10**9:09d}"
    tmp = ckdir / f".tmp-{name}"
    try:
        tmp.mkdir()
        save_model(model, str(tmp / MODEL_FILE))
        with open(tmp / STATE_FILE, "wb") as f:  # a Python file: a full disk surfaces as OSError (ENOSPC)
            torch.save({**state, "step": step}, f)
        files = {}
        for f in PAYLOAD:
            _fsync_file(tmp / f)
            files[f] = {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files})
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder only takes space; latest.json never named it
        if is_disk_full(e):
            raise disk_full_error(ckdir / name, _nbytes(model.state_dict()) + _nbytes(state)) from e
        raise
    os.replace(tmp, ckdir / name)
    fsync_dir(ckdir)
    atomic_write_json(ckdir / LATEST, {"step": step, "dir": name})
    if best_val is not None:  # the previous best, no longer named, is pruned like any older folder
        atomic_write_json(ckdir / BEST, {"step": step, "dir": name, "val_loss": best_val})
    _prune(ckdir, keep, current=name)
    return ckdir / name


def _prune(ckdir: Path, keep: int, current: str) -> None:
    """Keep the `keep` newest intact folders (`current` counts as one) and every damaged folder; remove
    the older intact ones and the leftovers of saves that were killed. The folder best.json names stays
    as well, without counting towards `keep`."""
    kept = 0
    best = _best_name(ckdir)
    for p in sorted(_folders(ckdir), reverse=True):
        if p.name == current:
            kept += 1
        elif verify_checkpoint(p) is not None or p.name == best:
            continue  # damaged (kept for inspection) or the best one
        elif kept < keep:
            kept += 1
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)


def _best_name(ckdir: Path) -> str | None:
    try:
        name = json.loads((ckdir / BEST).read_text())["dir"]
        return name if isinstance(name, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_val_loss(run_dir: str | Path) -> float | None:
    """The validation loss best.json records, or None."""
    try:
        return float(json.loads((Path(run_dir) / "ckpt" / BEST).read_text())["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the best validation loss (best.json's folder), verified; None when the run has
    no best.json or its folder is gone. CheckpointError when the folder is damaged."""
    ckdir = Path(run_dir) / "ckpt"
    name = _best_name(ckdir)
    if name is None or not (ckdir / name).is_dir():
        return None
    problem = verify_checkpoint(ckdir / name)
    if problem is not None:
        raise CheckpointError(f"the best checkpoint {ckdir / name} is damaged: {problem}")
    return ckdir / name


def _folders(ckdir: Path) -> list[Path]:
    return [p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step_")] if ckdir.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder latest.json names, or (if that file is lost) the newest complete-looking folder. Not
    verified: resume_checkpoint and load_checkpoint check the files."""
    ckdir = Path(run_dir) / "ckpt"
    if not ckdir.is_dir():
        return None
    try:
        name = json.loads((ckdir / LATEST).read_text())["dir"]
        if (ckdir / name / MODEL_FILE).is_file() and (ckdir / name / STATE_FILE).is_file():
            return ckdir / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = sorted(p for p in _folders(ckdir) if (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the folder is intact, else what is wrong with it (a file missing, cut short, changed)."""
    path = Path(path)
    try:
        man = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return _verify_unmanifested(path)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(files, dict) or set(PAYLOAD) - set(files):
        return f"{MANIFEST} does not list {', '.join(PAYLOAD)}"
    for name, want in files.items():
        if not isinstance(want, dict):
            return f"{MANIFEST} is malformed at {name!r}"
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written"
        if _sha256(f) != want.get("sha256"):
            return f"{name}'s sha256 differs from the one recorded when it was written"
    return None


def _verify_unmanifested(path: Path) -> str | None:
    """A folder without manifest.json: readable safetensors header and intact zip members in state.pt."""
    for name in PAYLOAD:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        return f"{MODEL_FILE} is unreadable ({e})"
    try:
        with zipfile.ZipFile(path / STATE_FILE) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    return f"{STATE_FILE}'s member {bad} fails its checksum" if bad else None


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run (latest.json's folder first), or None when it has none.
    Each damaged folder passed over is named in a warning and left in place; CheckpointError when there
    are checkpoints but none is intact."""
    ckdir = Path(run_dir) / "ckpt"
    first = latest_checkpoint(run_dir)
    order = ([first] if first is not None else []) + sorted((p for p in _folders(ckdir) if p != first), reverse=True)
    damaged = []
    for p in order:
        problem = verify_checkpoint(p)
        if problem is None:
            if damaged:
                log.warning("using the checkpoint %s instead (step %s)", p, _step_of(p))
            return p
        damaged.append(f"{p}: {problem}")
        log.warning("checkpoint %s is damaged (%s); it is kept for inspection and not used", p, problem)
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {ckdir}: " + "; ".join(damaged) + ". The damaged folders are "
                              "kept. Restore the files from a copy, or start the run again in a new --out_dir "
                              "(without --resume)")
    return None


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.split("_")[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Check the folder, load the weights into `model` (strict) and return the rest of the saved state.
    CheckpointError when the folder is damaged or its weights do not fit `model`."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    _check_fits(path / MODEL_FILE, model)
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(map_location))
    return torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)


def _check_fits(file: Path, model: nn.Module) -> None:
    """The saved tensors' names and shapes against the model's: another mixer has other names, another
    vocabulary another embedding shape."""
    with safe_open(str(file), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in saved]
    extra = [k for k in saved if k not in want]
    shapes = [f"{k} {list(saved[k])} (the model's {list(want[k])})" for k in want if k in saved and saved[k] != want[k]]
    if not shapes and not extra and _only_tied(model, missing, saved):
        return
    what = []
    if shapes:
        what.append("shapes differ: " + ", ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if extra:
        what.append(f"{len(extra)} weights the model lacks (e.g. {extra[0]})")
    if missing:
        what.append(f"{len(missing)} of the model's weights are absent (e.g. {missing[0]})")
    raise CheckpointError(f"{file} does not fit this model: {'; '.join(what)}. It was written by another model "
                          "(another mixer, shape or vocabulary); use the run folder it came from")


def _only_tied(model: nn.Module, missing: list[str], saved: dict) -> bool:
    """Every missing name shares its storage with a stored one (save_model keeps one name per tie)."""
    sd = model.state_dict()
    names: dict[int, set[str]] = {}
    for k, v in sd.items():
        names.setdefault(v.data_ptr(), set()).add(k)
    return all(names[sd[k].data_ptr()] & saved.keys() for k in missing)
