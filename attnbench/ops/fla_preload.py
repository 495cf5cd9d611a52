"""Compile FLA's Triton kernels in parallel threads before a run's first call of them.

Triton compiles a kernel at its first call, one after another; a benchmark process that steps through
many context lengths compiles a new specialization at each, serially. Triton can compile a kernel ahead
of that call from the "specialization data" it hands to its JIT hooks (`JITFunction.preload`), and
compiles in parallel across threads. On a fresh H200 the bakeoff preset finishes 18 s sooner with this
(NSA's benchmark alone 26 s; results/preload-ab-h200/README.md), so it stays on by default.

- `recording(key)`: while a mixer's steps run, every FLA kernel compilation's specialization data is
  kept under `key` ("<mixer>:train" for a training run, "<mixer>:bench" for its benchmarks); `save`
  writes them to `attnbench/fla_configs/<GPU>.preload.json` (same Triton and FLA versions only, as the
  autotuner file). `chosen_only` drops the candidates an autotuner compiled only to time them.
- `capturing(mixer, phase)`: the same inside a real run or benchmark process when
  ATTNBENCH_FLA_CAPTURE=DIR; on leaving (also on Ctrl-C) it writes that process's autotuner choices and
  chosen specializations under DIR, for `scripts/fla_tune.py --merge DIR`.
- `preload(key)`: compiles the saved kernels in a thread pool. The first step then finds them
  compiled: in this process, or in Triton's disk cache.

On by default where a file for this GPU and these versions exists (ATTNBENCH_FLA_PRELOAD=0 turns it
off). The file holds the kernels of the presets' runs only. A spec that fails to compile is counted and
skipped (the kernel then compiles at its first call, as without this).

File: {"triton": version, "fla": version, "gpu": name, "mixers": {"<mixer>:<phase>": ["<spec json>", ...]}}
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

import torch

from ..files import atomic_write_text
from . import fla_configs
from . import backend
from .fla_configs import CONFIG_ROOT, gpu_file_name, kernel_id, read_if_versions, read_mergeable, versions

log = logging.getLogger("attnbench.ops")

_recorded: dict[str, list[str]] = {}  # mixer -> specialization data of the FLA kernels it compiled
_recording_for: str | None = None  # the mixer whose steps run inside recording()


def file_for(device_name: str, root: Path = CONFIG_ROOT) -> Path:
    return root / gpu_file_name(device_name).replace(".json", ".preload.json")


def enabled() -> bool:
    return os.environ.get("ATTNBENCH_FLA_PRELOAD", "1").lower() not in ("0", "off", "false", "no")


def _hook(*, key: Any, repr: str, fn: Any, compile: dict, is_manual_warmup: bool, already_compiled: bool) -> None:
    """triton.knobs.runtime.jit_post_compile_hook: keep FLA kernels' specialization data."""
    if _recording_for is not None and str(getattr(fn, "module", "")).startswith("fla."):
        specs = _recorded.setdefault(_recording_for, [])
        if compile["specialization_data"] not in specs:
            specs.append(compile["specialization_data"])


@contextlib.contextmanager
def recording(mixer: str) -> Iterator[list[str]]:
    """Within the block, FLA kernel compilations are recorded under `mixer` ("<mixer>:<phase>"; yields
    its list)."""
    global _recording_for
    import triton  # optional dependency: recording runs only where FLA (and so Triton) is installed

    knobs = triton.knobs.runtime
    previous, previous_for = knobs.jit_post_compile_hook, _recording_for  # nested: the outer key resumes after
    knobs.jit_post_compile_hook = _hook
    _recording_for = mixer
    try:
        yield _recorded.setdefault(mixer, [])
    finally:
        _recording_for = previous_for
        knobs.jit_post_compile_hook = previous


def save(path: Path, device_name: str, vers: dict[str, str | None] | None = None,
         recorded: dict[str, list[str]] | None = None) -> int:
    """Merge the recorded specs into `path` (same versions; otherwise it starts over). Returns how many."""
    vers = vers or versions()
    recorded = _recorded if recorded is None else recorded
    mixers: dict[str, list[str]] = (read_if_versions(path, vers) or {}).get("mixers", {})
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


def merge(dst: Path, src: Path) -> int:
    """Add the specializations saved in `src` (a capture's file) to `dst`, for the same versions."""
    data, vers = read_mergeable(dst, src)
    return save(dst, data.get("gpu"), vers, data.get("mixers", {}))


def _constexpr_value(v: Any) -> Any:
    return v["constexpr"] if isinstance(v, dict) and "constexpr" in v else v


def chosen_only(recorded: dict[str, list[str]], tuners: list[Any]) -> dict[str, list[str]]:
    """The recorded specs less those an autotuner compiled only to time them: a spec of an autotuned
    kernel is kept when its constants and options match one of the configurations that autotuner chose
    (its cache: timed here or installed from the saved file). Specs of other kernels are all kept."""
    chosen: dict[str, tuple[list[str], list[Any]]] = {}
    for t in tuners:
        jit = t.fn
        while not hasattr(jit, "arg_names") and hasattr(jit, "fn"):
            jit = jit.fn
        names, configs = chosen.setdefault(kernel_id(t.fn), (list(getattr(jit, "arg_names", [])), []))
        configs.extend(dict(t.cache).values())

    def keep(spec: str) -> bool:
        d = json.loads(spec)
        if d["name"] not in chosen:
            return True
        names, configs = chosen[d["name"]]
        consts = {names[k[0]]: _constexpr_value(v) for k, v in zip(d["constant_keys"], d["constant_vals"])
                  if len(k) == 1 and k[0] < len(names)}
        opts = d.get("options", {})
        return any(all(consts.get(n) == v for n, v in c.kwargs.items())
                   and opts.get("num_warps") == c.num_warps and opts.get("num_stages") == c.num_stages
                   for c in configs)

    return {key: [s for s in specs if keep(s)] for key, specs in recorded.items()}


CAPTURE_ENV = "ATTNBENCH_FLA_CAPTURE"


@contextlib.contextmanager
def capturing(mixer: str, phase: str) -> Iterator[None]:
    """With ATTNBENCH_FLA_CAPTURE=DIR on a CUDA GPU with FLA: record the FLA kernels compiled in the block
    under "<mixer>:<phase>" and, on leaving it (also on Ctrl-C), write DIR/<mixer>-<phase>-<pid>/<GPU>.json
    (this process's autotuner choices) and <GPU>.preload.json (the chosen specializations), for
    `scripts/fla_tune.py attnbench/fla_configs --merge DIR`. Otherwise a no-op."""
    root = os.environ.get(CAPTURE_ENV)
    if not root or not torch.cuda.is_available() or not backend.fla_available():
        yield
        return
    key = f"{mixer}:{phase}"
    with recording(key):
        try:
            yield
        finally:
            gpu = torch.cuda.get_device_name(0)
            out = Path(root) / f"{mixer}-{phase}-{os.getpid()}"
            tuners = fla_configs.live_fla_tuners()
            n_cfg = fla_configs.save(out / fla_configs.gpu_file_name(gpu), tuners, gpu, fla_configs.versions())
            kept = chosen_only({key: _recorded.get(key, [])}, tuners)
            n_spec = save(file_for(gpu, out), gpu, recorded=kept)
            log.warning("FLA capture for %s: %d autotuner choices, %d of %d kernel specializations -> %s",
                        key, n_cfg, n_spec, len(_recorded.get(key, [])), out)


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
    """Compile the FLA kernels saved under `mixer` ("<mixer>:<phase>") in a thread pool: (compiled,
    failed, seconds)."""
    data = read_if_versions(path, vers or versions())
    if data is None:
        if path.is_file():
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


def preload_for_run(mixer: str, phase: str) -> dict[str, Any] | None:
    """A run's call on CUDA (phase "train": the trainer, "bench": a benchmark process): unless
    ATTNBENCH_FLA_PRELOAD=0, preload the kernels saved for "<mixer>:<phase>" in this GPU's file; returns
    {"kernels", "failed", "seconds"} for the run summary, else None."""
    if not enabled() or not torch.cuda.is_available() or not backend.fla_available():
        return None
    n, failed, secs = preload(f"{mixer}:{phase}", file_for(torch.cuda.get_device_name(0)))
    return {"kernels": n, "failed": failed, "seconds": round(secs, 2)} if n or failed else None
