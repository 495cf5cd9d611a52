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
import re
from typing import Iterator

import torch

from ..errors import AttnbenchError
from . import fla_configs, fla_gated_bwd

log = logging.getLogger("attnbench.ops")

BACKENDS = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """True when the `fla` package imports (it needs Triton; it imports on CPU-only hosts too)."""
    if os.environ.get("ATTNBENCH_NO_FLA") == "1":
        return False
    try:  # saved autotuner choices for this GPU; must precede FLA's import, which defines its kernels
        fla_configs.install()
    except Exception as e:  # noqa: BLE001 - an unreadable file means autotuning, as without one
        log.warning("FLA kernel configurations not used: %s: %s", type(e).__name__, e)
    try:
        import fla  # noqa: F401  (optional dependency: attnbench[cuda])
        import fla.ops  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return True


_GATED_ROUTE: str | None = None  # decided once, eagerly (gated_backward_route)
TORCH_DQKWG = "fla+torch-dqkwg"  # FLA's gated backward with its chunk_bwd_dqkwg step in PyTorch


def gated_backward_route() -> str:
    """How FLA's gated chunk backward (Gated DeltaNet, Gated DeltaProduct) runs on this machine:

    'fla'        its Triton kernels (not Hopper, or a Triton without the bug);
    'tilelang'   FLA's TileLang backend takes the refused step;
    'fla+torch-dqkwg'  FLA's kernels, except the one step FLA 0.6.0 refuses on Hopper with
                 3.4 <= triton < 3.7.1 (chunk_bwd_dqkwg, FLA #640), which attnbench computes in PyTorch
                 (ops/fla_gated_bwd.py);
    'torch'      none of these: the gated ops' backward runs attnbench's PyTorch op.

    Where TileLang is installed, a small gated forward + backward is run once to make sure it takes the
    call. The answer is kept in a module global, which a torch.compile trace reads (and guards on) rather
    than deciding again; a trace that comes first gets 'torch' and keeps nothing (the trainer decides
    eagerly before compiling).
    """
    global _GATED_ROUTE
    if _GATED_ROUTE is not None:
        return _GATED_ROUTE
    static = _gated_backward_static_check()
    if static == "fine":
        route = "fla"
    elif torch.compiler.is_compiling():
        return "torch"
    else:
        route = "torch"
        if static == "tilelang":
            try:
                with torch.enable_grad():
                    _probe_gated_backward()
                route = "tilelang"
            except Exception as e:  # noqa: BLE001
                log.warning("FLA's TileLang backend did not take the gated chunk backward (%s: %s)",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        if route == "torch" and fla_available():
            if fla_gated_bwd.install():
                route = TORCH_DQKWG
                log.warning("FLA's gated chunk backward: this Triton miscompiles its chunk_bwd_dqkwg step on "
                            "Hopper (FLA #640), so attnbench computes that step in PyTorch; the rest runs on "
                            "FLA's kernels (backend label %s)", TORCH_DQKWG)
        if route == "torch":
            log.warning("FLA's gated chunk backward is unavailable here; the gated mixers train on the PyTorch op")
    _GATED_ROUTE = route
    return route


def hopper_gated_backward_broken() -> bool:
    """True when no route runs FLA's gated chunk backward here (gated_backward_route() == 'torch')."""
    return gated_backward_route() == "torch"


def _gated_backward_static_check() -> str:
    """'fine' (not Hopper, or a Triton without the bug), 'broken' (the bug, no usable TileLang), or
    'tilelang' (the bug, and TileLang with nvcc installed: it may take the call)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return "fine"
    try:
        import triton  # optional dependency (the CUDA stack)
    except ImportError:
        return "fine"
    if not ((3, 4, 0, 0) <= release_tuple(triton.__version__) < (3, 7, 1, 0)):
        return "fine"
    try:
        import tilelang  # noqa: F401  (optional dependencies)
        from fla.utils.env import has_usable_nvcc  # type: ignore

        return "tilelang" if has_usable_nvcc() else "broken"
    except Exception:
        return "broken"


def release_tuple(version: str) -> tuple[int, int, int, int]:
    """'3.6.0+git1234' -> (3, 6, 0, 0): the release numbers, then 0 for a final release or -1 for a
    pre-release ('3.7.1rc1' -> (3, 7, 1, -1), which sorts below 3.7.1 as in PEP 440)."""
    nums, pre = [], 0
    for part in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d*", part).group()
        nums.append(int(digits) if digits else 0)
        pre = -1 if part != digits else pre
    nums += [0] * (3 - len(nums))
    return nums[0], nums[1], nums[2], pre


def _probe_gated_backward() -> None:
    """One small gated chunk forward + backward through FLA on the GPU (raises if it cannot run)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # optional dependency (CUDA only)

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
    """Collect {op: label} for every op call resolved inside the block ('fla', 'torch', 'triton' (attnbench's
    own kernel), '+'-joined when calls differed), so a benchmark row can say which backend produced it."""
    seen: dict[str, str] = {}
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Op calls inside the block are not recorded (e.g. a check that runs a reference implementation)."""
    saved = _recorders[:]
    _recorders.clear()
    try:
        yield
    finally:
        _recorders[:] = saved


def resolve(backend: str, x: torch.Tensor, op: str, unsupported: str | None = None,
            fla_label: str = "fla") -> str:
    """Return 'fla' or 'torch' for this call.

    `unsupported` is None when FLA can run this call, otherwise the reason it cannot
    (e.g. "float32 inputs"); the caller works that out from the op's constraints. `fla_label` is what
    record_backends keeps when FLA is chosen (TORCH_DQKWG: FLA with attnbench's PyTorch dqkwg step).
    """
    choice = _resolve(backend, x, op, unsupported)
    record(op, fla_label if choice == "fla" else choice)
    return choice


def record(op: str, label: str) -> None:
    """Add `label` ('fla', 'torch', or '+'-joined kinds) to what the open record_backends blocks saw of op."""
    for seen in _recorders:
        if seen.get(op) == label:  # the usual case, once per op call in eager steps: nothing to join
            continue
        kinds = set(seen[op].split("+")) if op in seen else set()
        seen[op] = "+".join(sorted(kinds | set(label.split("+"))))


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
