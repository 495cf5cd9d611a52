"""Peak memory of one training step (forward, backward, AdamW step) per context length.

Contexts double from --start (256) until a step runs out of memory or reaches --max_len; the threshold
between the last length that fit and the first that did not is then bisected until they are within
--tol (10%). Out of memory is a measured result (a row with oom=true), never a crash:

  CUDA  in-process: peak = torch.cuda.max_memory_allocated() after reset_peak_memory_stats(); a
        torch.OutOfMemoryError is caught, everything the step held is released (its frame, the
        exception's traceback, the allocator cache) and the next length runs in the same process.
  CPU   one child process per length (`python -m attnbench.bench.memory --child SPEC`): peak resident
        memory is the child's own peak RSS (VmHWM; see _rss_mb for why not ru_maxrss), also reported:
        its peak before it built the model. A child killed by the system (e.g. the OOM killer) is an oom
        row too.

`--simulate_oom_above N` raises torch.OutOfMemoryError from inside the forward pass (a hook on the
model's last layer, activations alive) for contexts above N: the tests use it to exercise the
recovery and the bisection without exhausting real memory. `--time_budget_s` stops the doubling of a
mixer once the steady step time spent plus the next step's predicted time would overrun it (softmax's
steps grow quadratically); a step far slower than the trend (a first call that compiled and autotuned
Triton kernels) is timed again, and only the second time counts.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..ops.backend import record_backends
from .rows import RowWriter, backend_summary, base_row, measured, print_table
from .shapes import BenchShape, bench_config, build_model
from .timing import Precision, is_oom, precision
from .training_step import make_optimizer, random_batch, train_step

log = logging.getLogger("attnbench.bench")

# For tests: a weak reference to the model of the latest in-process step (dead once the step's memory
# has been released, also after an out-of-memory error).
LAST_MODEL: weakref.ref | None = None


@dataclass
class MemoryOptions:
    batch: int = 4
    start: int = 256
    max_len: int = 2048
    tol: float = 0.1
    time_budget_s: float = 60.0  # per mixer
    simulate_oom_above: int | None = None
    isolate: bool = True  # CPU: one child process per point (CUDA always runs in-process)
    dtype: str = "auto"
    child_timeout_s: float = 1800.0

    @classmethod
    def defaults(cls, device: str) -> "MemoryOptions":
        if device == "cuda":
            # steps at 64k-256k tokens take seconds each on an H200, hence a minute per mixer (with 10 s,
            # softmax and NSA stop at the time budget: results/bakeoff-h200-2026-12-03/README.md)
            return cls(max_len=2**20, time_budget_s=60.0, isolate=False)
        return cls(max_len=2048, time_budget_s=300.0, isolate=True)


# ------------------------------------------------------------------ one point


def _rss_mb() -> float:
    """Peak resident memory of this process, MiB: VmHWM of /proc/self/status where there is one.

    Not ru_maxrss: on Linux, exec keeps the pre-exec peak (the parent's size at fork) in ru_maxrss, so a
    child of a big parent would report the parent. VmHWM belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux KiB (macOS bytes: not supported)


def _simulated_oom_hook(limit: int):
    def hook(module, args):
        T = args[0].shape[1]
        if T > limit:
            raise torch.OutOfMemoryError(f"simulated out of memory: context {T} > --simulate_oom_above {limit}")
    return hook


def _step(cfg: ModelConfig, T: int, batch: int, device: str, prec: Precision, oom_above: int | None) -> dict:
    global LAST_MODEL
    model = prec.prepare(build_model(cfg, device)).train()
    LAST_MODEL = weakref.ref(model)
    opt = make_optimizer(model, device)
    x, y = random_batch(cfg.vocab_size, batch, T, device)
    if oom_above is not None:
        model.blocks[-1].register_forward_pre_hook(_simulated_oom_hook(oom_above))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with record_backends() as ops:
        train_step(model, opt, x, y, prec, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"step_s": time.perf_counter() - t0, "backend_ops": dict(ops), "n_params": model.num_params()}


def measure_in_process(cfg: ModelConfig, T: int, batch: int, device: str, prec: Precision,
                       oom_above: int | None = None) -> dict:
    """One training step at context T in this process: {'oom', 'peak_mb', 'step_s', 'backend_ops', 'error'}.

    On an out-of-memory error everything the step allocated is released before returning: the
    step's locals die with its frame once the exception (and its traceback) is cleared here.
    """
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    res: dict[str, Any] = {"oom": False, "error": None}
    try:
        res.update(_step(cfg, T, batch, device, prec, oom_above))
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        res.update(oom=True, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    # the traceback of a caught OOM is gone here; drop the cycles it may have left, then the cached blocks
    gc.collect()
    if device == "cuda":
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        torch.cuda.empty_cache()
        res["allocated_after_mb"] = torch.cuda.memory_allocated() / 2**20
    else:
        res["peak_mb"] = _rss_mb()
    return res


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the attnbench package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def measure_in_child(cfg: ModelConfig, T: int, batch: int, prec: Precision, oom_above: int | None,
                     timeout_s: float) -> dict:
    """One CPU training step in a fresh process; its peak RSS is the measurement."""
    spec = {"cfg": dataclasses.asdict(cfg), "T": T, "batch": batch, "dtype": prec.name, "oom_above": oom_above,
            "threads": torch.get_num_threads()}
    cmd = [sys.executable, "-m", "attnbench.bench.memory", "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"oom": False, "error": f"child timed out after {timeout_s:.0f} s", "peak_mb": None}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if p.returncode < 0 and -p.returncode == 9:  # SIGKILL: the kernel's OOM killer (or a user)
        return {"oom": True, "error": "child killed by SIGKILL (out of memory?)", "peak_mb": None}
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"oom": False, "error": f"child exited with {p.returncode}: {tail[:300]}", "peak_mb": None}


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    baseline = _rss_mb()
    cfg = ModelConfig(**spec["cfg"])
    prec = precision(spec["dtype"], "cpu", inference=False)
    res = measure_in_process(cfg, spec["T"], spec["batch"], "cpu", prec, spec["oom_above"])
    res["baseline_rss_mb"] = baseline
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------ the threshold search


def find_threshold(measure: Callable[[int], dict], start: int, max_len: int, tol: float = 0.1,
                   time_budget_s: float = math.inf, align: int = 64) -> tuple[list[tuple[int, dict]], dict]:
    """Double from `start` until a point is out of memory or `max_len` is passed, then bisect between
    the largest length that fit and the smallest that did not until hi/lo <= 1 + tol.

    `measure(T)` returns a dict with 'oom' (bool) and optionally 'step_s'. Bisection midpoints are
    rounded down to multiples of `align` (kernel-friendly lengths) when that keeps them strictly
    inside the interval. Returns the points in measured order and a summary
    {'fits': largest T that fit or None, 'first_oom': smallest T that did not or None,
     'limited_by': 'oom' | 'max_len' | 'time_budget' | 'error', 'ratio': first_oom / fits}.
    """
    spent = 0.0  # steady step time so far (JIT compilation and autotuning spikes left out)
    points: list[tuple[int, dict]] = []
    lo: int | None = None
    hi: int | None = None
    limited_by = "max_len"

    def predicted(T_next: int) -> float:
        ok = [(T, r["step_s"]) for T, r in points if not r.get("oom") and r.get("step_s")]
        if not ok:
            return 0.0
        T1, t1 = ok[-1]
        p = 2.0
        if len(ok) >= 2:  # observed growth exponent, kept in [1, 2]
            T0, t0 = ok[-2]
            if T1 > T0 and t0 > 0 and t1 > 0:
                p = min(2.0, max(1.0, math.log(t1 / t0) / math.log(T1 / T0)))
        return t1 * (T_next / T1) ** p

    def run(T: int) -> dict | None:
        nonlocal limited_by, spent
        expected = predicted(T)
        if spent + expected > time_budget_s:
            limited_by = "time_budget"
            return None
        r = measure(T)
        slow = (r.get("step_s") or 0) > (2 * expected + 0.25 if expected else 0.5)
        if not r.get("oom") and slow:
            # slower than the trend (or, at the first point, than any step of these models should be): a
            # first step at a new shape that paid Triton compilation and autotuning (FLA's kernels, whose
            # keys include a token-count bucket, so it recurs at every new length). Time a second step so
            # the spike neither counts towards the time budget nor stops growth.
            again = measure(T)
            if not again.get("oom") and again.get("step_s"):
                r = {**again, "first_step_s": r["step_s"]}
        if not r.get("oom"):
            spent += r.get("step_s") or 0.0
        points.append((T, r))
        return r

    T = start
    while T <= max_len:
        r = run(T)
        if r is None:
            break
        if r.get("oom"):
            hi, limited_by = T, "oom"
            break
        if r.get("error"):
            limited_by = "error"
            break
        lo = T
        T *= 2
    if hi is not None and lo is not None:
        while hi / lo > 1 + tol:
            mid = (lo + hi) // 2
            if align and (mid // align) * align > lo:
                mid = (mid // align) * align
            if not lo < mid < hi:
                break
            r = run(mid)
            if r is None:
                break
            if r.get("error") and not r.get("oom"):
                limited_by = "error"
                break
            if r.get("oom"):
                hi = mid
            else:
                lo = mid
    return points, {"fits": lo, "first_oom": hi, "limited_by": limited_by,
                    "ratio": (hi / lo) if (hi and lo) else None}


# ------------------------------------------------------------------ the benchmark


def run(shapes: list[BenchShape], device: str, opts: MemoryOptions, writer: RowWriter) -> list[dict]:
    """Memory rows (one per measured context, one threshold summary per mixer); prints a table."""
    out: list[dict] = []
    prec = precision(opts.dtype, device, inference=False)
    in_process = device == "cuda" or not opts.isolate
    for shape in shapes:
        cfg = bench_config(shape.cfg, 0)
        n_params = build_model(cfg, "cpu").num_params()  # the table grows with nothing: pos_emb is not 'learned'
        base = base_row("memory", shape, cfg, n_params, device, prec)
        unit = "MiB" if device == "cuda" else "MiB (peak RSS)"

        def measure(T: int) -> dict:
            try:
                if in_process:
                    r = measure_in_process(cfg, T, opts.batch, device, prec, opts.simulate_oom_above)
                else:
                    r = measure_in_child(cfg, T, opts.batch, prec, opts.simulate_oom_above, opts.child_timeout_s)
            except Exception as e:  # noqa: BLE001 - a failing mixer ends its own search, not the benchmark
                log.error("memory %s T=%d: %s", shape.mixer, T, e, exc_info=True)
                r = {"oom": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            row = measured(base, "peak_memory_mb", unit, [r["peak_mb"]] if r.get("peak_mb") is not None else None,
                           context=T, batch=opts.batch, tokens=T * opts.batch, step_s=r.get("step_s"),
                           backend=backend_summary(r.get("backend_ops") or {}), backend_ops=r.get("backend_ops"),
                           isolated=not in_process, simulated_oom_above=opts.simulate_oom_above)
            row.update(oom=bool(r.get("oom")), error=r.get("error"))
            for k in ("baseline_rss_mb", "peak_reserved_mb", "allocated_after_mb"):
                if k in r:
                    row[k] = r[k]
            if row["oom"]:
                row["note"] = "out of memory; peak is what was allocated before the failure"
            writer.emit(row)
            out.append(row)
            val = "-" if row["value"] is None else f"{row['value']:.1f} {unit}"
            step = f" step {r['step_s']:.2f} s" if r.get("step_s") else ""
            err = f" ERROR {r['error']}" if r.get("error") and not r.get("oom") else ""
            print(f"memory  {shape.mixer:>20} T={T:<8} {'OOM ' if row['oom'] else ''}{val}{step}{err}", flush=True)
            return r

        if device == "cuda":
            # One small untimed step first: Triton kernels compile and autotune on their first call, which
            # would make the first point look slow and stop the search early on the time budget.
            try:
                measure_in_process(cfg, opts.start, 1, device, prec)
            except Exception as e:  # noqa: BLE001 - the real points will report it
                log.warning("memory %s: warm-up step failed: %s", shape.mixer, e)
        points, summary = find_threshold(measure, opts.start, opts.max_len, opts.tol, opts.time_budget_s)
        srow = measured(base, "oom_threshold", "tokens of context", [summary["fits"]] if summary["fits"] else None,
                        batch=opts.batch, context=summary["fits"], first_oom=summary["first_oom"],
                        limited_by=summary["limited_by"], bisect_ratio=summary["ratio"], tol=opts.tol,
                        points=len(points), max_len=opts.max_len, simulated_oom_above=opts.simulate_oom_above)
        srow["backend"] = next((r["backend"] for r in reversed(out) if r["mixer"] == shape.mixer
                                and r["metric"] == "peak_memory_mb" and not r["oom"]), None)
        writer.emit(srow)
        out.append(srow)
    print_memory(out)
    return out


def print_memory(rows: list[dict]) -> None:
    pts = [r for r in rows if r["metric"] == "peak_memory_mb"]
    body = [[r["mixer"], r["context"], r["value"], "OOM" if r["oom"] else ("error" if r["error"] else ""),
             r.get("step_s"), r.get("backend")] for r in pts]
    print_table(f"memory: one training step, batch {pts[0]['batch'] if pts else '-'} ({pts[0]['unit'] if pts else ''})",
                ["mixer", "context", "peak", "oom", "step s", "backend"], body)
    summ = [[r["mixer"], r["context"], r["first_oom"], r["limited_by"]] for r in rows if r["metric"] == "oom_threshold"]
    print_table("memory: largest context that trains", ["mixer", "fits", "first OOM", "limited by"], summ)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2]))
    sys.exit("usage: python -m attnbench.bench.memory --child SPEC_JSON (used by `attnbench bench memory`)")
