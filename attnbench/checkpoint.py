"""Checkpoints that survive a kill at any instant.

Layout: <run>/ckpt/<step>-<nonce>/{model.safetensors, state.pt} and <run>/ckpt/latest.json.
A checkpoint folder is written under a temporary name and renamed once complete; latest.json is
replaced atomically afterwards. A kill at any point leaves latest.json naming a complete folder.
Weights are safetensors; the rest (optimizer, RNG, data position) is a torch file of tensors and
plain values, loaded with weights_only=True.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from .files import fsync_dir, atomic_write_json

MODEL_FILE, STATE_FILE, LATEST = "model.safetensors", "state.pt", "latest.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    ckdir = Path(run_dir) / "ckpt"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}-{time.time_ns() % 10**9:09d}"
    tmp = ckdir / f".tmp-{name}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save({**state, "step": step}, tmp / STATE_FILE)
    for f in (MODEL_FILE, STATE_FILE):
        _fsync_file(tmp / f)
    os.replace(tmp, ckdir / name)
    fsync_dir(ckdir)
    atomic_write_json(ckdir / LATEST, {"step": step, "dir": name})
    _prune(ckdir, keep, current=name)
    return ckdir / name


def _prune(ckdir: Path, keep: int, current: str) -> None:
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in done[:-keep] if keep > 0 else done:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.iterdir():  # leftovers of a save that was killed
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder latest.json names, or (if that file is lost) the newest complete folder."""
    ckdir = Path(run_dir) / "ckpt"
    if not ckdir.is_dir():
        return None
    try:
        name = json.loads((ckdir / LATEST).read_text())["dir"]
        if (ckdir / name / MODEL_FILE).is_file() and (ckdir / name / STATE_FILE).is_file():
            return ckdir / name
    except (OSError, ValueError, KeyError):
        pass
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights into `model` (strict) and return the rest of the saved state."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=True, device=str(map_location))
    return torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
