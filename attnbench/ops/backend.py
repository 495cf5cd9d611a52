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
    from .fla_configs import install

    try:  # saved autotuner choices for this GPU; must precede FLA's import, which defines its kernels
        install()
    except Exception as e:  # noqa: BLE001 - an unreadable file means autotuning, as without one
        log.warning("FLA kernel configurations not used: %s: %s", type(e).__name__, e)
    try:
        import fla  # noqa: F401
        import fla.ops  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return True


_GATED_BROKEN: bool | None = None  # decided once, eagerly (hopper_gated_backward_broken)


def hopper_gated_backward_broken() -> bool:
    """FLA 0.6.0 refuses the gated chunk backward on Hopper with 3.4 <= triton < 3.7.1 unless its
    TileLang backend (package `tilelang` + nvcc) can take the call (FLA_NOTES.md section 0).

    Where TileLang is installed, a small gated forward + backward is run once to make sure it takes the
    call. The answer is kept in a module global, which a torch.compile trace reads (and guards on)
    rather than re-running the check; a trace that comes first answers from the versions alone and
    counts an unprobed TileLang as not taking the call (the trainer decides eagerly before compiling).
    """
    global _GATED_BROKEN
    if _GATED_BROKEN is not None:
        return _GATED_BROKEN
    static = _gated_backward_static_check()
    if static != "tilelang":
        broken = static == "broken"
    elif torch.compiler.is_compiling():
        return True
    else:
        try:
            with torch.enable_grad():
                _probe_gated_backward()
            broken = False
        except Exception as e:  # noqa: BLE001
            log.warning("FLA's TileLang backend did not take the gated chunk backward (%s: %s); the gated "
                        "mixers use the PyTorch op", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            broken = True
    _GATED_BROKEN = broken
    return broken


def _gated_backward_static_check() -> str:
    """'fine' (not Hopper, or a Triton without the bug), 'broken' (the bug, no usable TileLang), or
    'tilelang' (the bug, and TileLang with nvcc installed: it may take the call)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return "fine"
    try:
        import triton
        from packaging.version import Version
    except ImportError:
        return "fine"
    v = Version(triton.__version__.split("+")[0])
    if not (Version("3.4.0") <= v < Version("3.7.1")):
        return "fine"
    try:
        import tilelang  # noqa: F401
        from fla.utils.env import has_usable_nvcc  # type: ignore

        return "tilelang" if has_usable_nvcc() else "broken"
    except Exception:
        return "broken"


def _probe_gated_backward() -> None:
    """One small gated chunk forward + backward through FLA on the GPU (raises if it cannot run)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, K = 1, 128, 1, 64
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    o, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    o.float().sum().backward()
    torch.cuda.synchronize()


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
