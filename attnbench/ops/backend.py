"""Backend choice for op families: the PyTorch version everywhere, FLA's Triton kernels on CUDA.

`auto` takes FLA for CUDA tensors when `fla` imports and the call is one FLA supports; anything
else runs the PyTorch version, with a one-time logged notice when a CUDA call falls back.
`fla` asked for explicitly and impossible is an AttnbenchError that says why.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterator

import torch

from ..errors import AttnbenchError

log = logging.getLogger("attnbench.ops")

BACKENDS = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True when the `fla` package imports (it needs Triton; it imports on CPU-only hosts too)."""
    if os.environ.get("ATTNBENCH_NO_FLA") == "1":
        return False
    try:
        import fla  # noqa: F401
        import fla.ops  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return True


@functools.lru_cache(maxsize=None)
def hopper_gated_backward_broken() -> bool:
    """FLA 0.6.0 refuses the gated chunk backward on Hopper with 3.4 <= triton < 3.7.1 unless its
    TileLang backend (package `tilelang` + nvcc) can take the call (FLA_NOTES.md section 0)."""
    if not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability() != (9, 0):
        return False
    try:
        import triton
        from packaging.version import Version
    except ImportError:
        return False
    v = Version(triton.__version__.split("+")[0])
    if not (Version("3.4.0") <= v < Version("3.7.1")):
        return False
    try:
        import tilelang  # noqa: F401
        from fla.utils.env import has_usable_nvcc  # type: ignore

        return not has_usable_nvcc()
    except Exception:
        return True


_noticed: set[str] = set()


def notice_once(key: str, msg: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        log.warning(msg)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise AttnbenchError(f"backend={backend!r} is not one of {BACKENDS}; set backend to 'auto', 'torch' or 'fla'")


_recorders: list[dict[str, str]] = []


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, str]]:
    """Collect {op: 'fla' | 'torch' | 'fla+torch'} for every op call resolved inside the block, so a
    benchmark row can say which backend produced its figure."""
    seen: dict[str, str] = {}
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def resolve(backend: str, x: torch.Tensor, op: str, unsupported: str | None = None) -> str:
    """Return 'fla' or 'torch' for this call.

    `unsupported` is None when FLA can run this call, otherwise the reason it cannot
    (e.g. "float32 inputs"); the caller works that out from the op's constraints.
    """
    choice = _resolve(backend, x, op, unsupported)
    for seen in _recorders:
        seen[op] = choice if seen.get(op, choice) == choice else "fla+torch"
    return choice


def _resolve(backend: str, x: torch.Tensor, op: str, unsupported: str | None) -> str:
    check_backend(backend)
    if backend == "torch":
        return "torch"
    reasons = []
    if not x.is_cuda:
        reasons.append("tensors are not on a CUDA device")
    elif not fla_available():
        reasons.append("the `fla` package (pip install 'attnbench[cuda]') does not import")
    if unsupported:
        reasons.append(unsupported)
    if not reasons:
        return "fla"
    if backend == "fla":
        raise AttnbenchError(f"{op}: backend='fla' cannot run this call: {'; '.join(reasons)}. "
                             f"Use backend='auto' (falls back to PyTorch) or backend='torch'.")
    if x.is_cuda:
        notice_once(f"{op}:{';'.join(reasons)}", f"{op}: using the PyTorch backend on CUDA because {'; '.join(reasons)}")
    return "torch"
