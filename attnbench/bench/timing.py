"""Where and how a benchmark runs, and how it times: device, precision, timed calls, out-of-memory errors."""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AttnbenchError, ConfigError
from .options import DTYPES


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AttnbenchError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise AttnbenchError(f"--device must be cpu or cuda, got {device!r}")
    return device


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


@dataclass
class Precision:
    """How a benchmark runs its model: weights' dtype and whether bf16 autocast is on."""

    name: str  # 'float32' | 'bfloat16' (weights cast) | 'autocast-bfloat16' (fp32 weights, bf16 autocast)
    weights: torch.dtype
    autocast: bool

    def context(self, device: str, cache_enabled: bool = True):
        if self.autocast:
            return torch.autocast(device_type=device, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.weights)


def precision(name: str, device: str, inference: bool) -> Precision:
    """'auto': float32 on the CPU; on CUDA bf16 weights for inference, bf16 autocast for training
    (the trainer's setting: fp32 master weights)."""
    if name == "auto":
        name = "float32" if device == "cpu" else ("bfloat16" if inference else "autocast")
    if name == "float32":
        return Precision("float32", torch.float32, False)
    if name == "bfloat16":
        return Precision("bfloat16", torch.bfloat16, False)
    if name == "autocast":
        if device != "cuda":
            raise ConfigError("--dtype autocast needs --device cuda (the CPU runs float32)")
        return Precision("autocast-bfloat16", torch.float32, True)
    raise ConfigError(f"--dtype must be one of {DTYPES}, got {name!r}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], n: int, device: str, setup: Callable[[], Any] | None = None) -> list[float]:
    """Milliseconds of each of `n` calls of fn. CUDA: device-side, with an event pair around every call
    (one synchronisation at the end, so the host never stalls the queue); CPU: perf_counter.
    `setup` runs before each call, outside the timed span (e.g. a fresh cache for a prefill)."""
    if n <= 0:
        return []
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            if setup is not None:
                setup()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in ev]
    out = []
    for _ in range(n):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(samples: list[float]) -> dict[str, Any]:
    """median/min/max/n of a list of measurements (None when empty)."""
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or another allocation failure: the CPU allocator ("can't allocate
    memory"), a raw CUDA call ("out of memory"), cuBLAS/cuDNN workspaces ("..._STATUS_ALLOC_FAILED")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower()
                                            or "STATUS_ALLOC_FAILED" in msg)
