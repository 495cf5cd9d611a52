"""Compile FLA's Triton kernels in parallel threads before a run's first step (opt-in, to be measured).

On an H200 each FLA-backed mixer spent 2-2.7 minutes before its first training step, mostly Triton
compiling FLA's kernels one after another as the step first calls them (results/h200-2026-11-28-s4).
Triton compiles in parallel across threads (on a 2-core CPU two sm_90 compiles took 1.9 s in sequence,
0.9 s in two threads), and it can compile a kernel ahead of its first call from the "specialization
data" it hands to its JIT hooks (`JITFunction.preload`). So:

- `recording(mixer)`: while a mixer's steps run (scripts/fla_tune.py's first check: saved autotuner
  choices installed, so one configuration per kernel compiles), every FLA kernel compilation's
  specialization data is kept under that mixer's name; `save` writes them to
  `attnbench/fla_configs/<GPU>.preload.json` (same Triton and FLA versions only, as the autotuner file).
  A specialization an earlier mixer of the same process compiled is kept under that mixer only; the
  other compiles it at its first call, as without a preload.
- `preload(mixer)`: compiles that mixer's saved kernels in a thread pool. The first step then finds them
  compiled: in this process, or in Triton's disk cache.

Off unless ATTNBENCH_FLA_PRELOAD=1: not yet measured on a GPU. A spec that fails to compile is counted
and skipped (the kernel then compiles at its first call, as without this).

File: {"triton": version, "fla": version, "gpu": name, "mixers": {"<mixer>": ["<specialization json>", ...]}}
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from ..io import atomic_write_text
from .fla_configs import CONFIG_ROOT, versions

log = logging.getLogger("attnbench.ops")

_recorded: dict[str, list[str]] = {}  # mixer -> specialization data of the FLA kernels it compiled
_recording_for: str | None = None  # the mixer whose steps run inside recording()


def file_for(device_name: str, root: Path = CONFIG_ROOT) -> Path:
    from .fla_configs import gpu_file_name

    return root / gpu_file_name(device_name).replace(".json", ".preload.json")


def enabled() -> bool:
    return os.environ.get("ATTNBENCH_FLA_PRELOAD", "0").lower() in ("1", "on", "true")


def _hook(*, key: Any, repr: str, fn: Any, compile: dict, is_manual_warmup: bool, already_compiled: bool) -> None:
    """triton.knobs.runtime.jit_post_compile_hook: keep FLA kernels' specialization data."""
    if _recording_for is not None and str(getattr(fn, "module", "")).startswith("fla."):
        specs = _recorded.setdefault(_recording_for, [])
        if compile["specialization_data"] not in specs:
            specs.append(compile["specialization_data"])


@contextlib.contextmanager
def recording(mixer: str) -> Iterator[list[str]]:
    """Within the block, FLA kernel compilations are recorded under `mixer` (yields its list)."""
    global _recording_for
    import triton

    knobs = triton.knobs.runtime
    previous = knobs.jit_post_compile_hook
    knobs.jit_post_compile_hook = _hook
    _recording_for = mixer
    try:
        yield _recorded.setdefault(mixer, [])
    finally:
        _recording_for = None
        knobs.jit_post_compile_hook = previous


def save(path: Path, device_name: str, vers: dict[str, str | None] | None = None,
         recorded: dict[str, list[str]] | None = None) -> int:
    """Merge the recorded specs into `path` (same versions; otherwise it starts over). Returns how many."""
    vers = vers or versions()
    recorded = _recorded if recorded is None else recorded
    mixers: dict[str, list[str]] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if (old.get("triton"), old.get("fla")) == (vers["triton"], vers["fla"]):
            mixers = old.get("mixers", {})
    n = 0
    for mixer, specs in recorded.items():
        have = mixers.setdefault(mixer, [])
        for s in specs:
            if s not in have:
                have.append(s)
                n += 1
    data = {**vers, "gpu": device_name, "mixers": dict(sorted(mixers.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return n


def _jit_function(full_name: str) -> Any:
    """The JITFunction behind `module.qualname` (unwrapping autotune/heuristics wrappers)."""
    module, _, name = full_name.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    while not hasattr(obj, "preload") and hasattr(obj, "fn"):
        obj = obj.fn
    if not hasattr(obj, "preload"):
        raise TypeError(f"{full_name} is not a Triton JIT function")
    return obj


def preload(mixer: str, path: Path, threads: int | None = None,
            vers: dict[str, str | None] | None = None) -> tuple[int, int, float]:
    """Compile `mixer`'s saved FLA kernels in a thread pool: (compiled, failed, seconds)."""
    if not path.is_file():
        return 0, 0, 0.0
    data = json.loads(path.read_text())
    vers = vers or versions()
    if (data.get("triton"), data.get("fla")) != (vers["triton"], vers["fla"]):
        log.info("FLA preload file %s is for other versions; not used", path)
        return 0, 0, 0.0
    specs = data.get("mixers", {}).get(mixer, [])
    t = time.perf_counter()

    def one(spec: str) -> bool:
        try:
            _jit_function(json.loads(spec)["name"]).preload(spec)
            return True
        except Exception as e:  # noqa: BLE001 - that kernel compiles at its first call instead
            log.info("FLA preload of a kernel failed (%s: %s)", type(e).__name__, str(e)[:200])
            return False

    with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
        ok = list(pool.map(one, specs))
    secs = time.perf_counter() - t
    if specs:
        log.warning("FLA preload for %s: %d kernels compiled in %.1f s (%d failed)", mixer, sum(ok), secs,
                    len(ok) - sum(ok))
    return sum(ok), len(ok) - sum(ok), secs


def preload_for_run(mixer: str) -> dict[str, Any] | None:
    """The trainer's call (CUDA): with ATTNBENCH_FLA_PRELOAD=1 and a saved file for this GPU, preload the
    mixer's FLA kernels; returns {"kernels", "failed", "seconds"} for the run summary, else None."""
    import torch

    from .backend import fla_available

    if not enabled() or not torch.cuda.is_available() or not fla_available():
        return None
    n, failed, secs = preload(mixer, file_for(torch.cuda.get_device_name(0)))
    return {"kernels": n, "failed": failed, "seconds": round(secs, 2)} if n or failed else None
