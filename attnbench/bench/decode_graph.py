"""The decode step in a CUDA graph: the checks that it is graph-safe, its capture, the verification of
replays against eager steps, and their timing (bench latency --cuda_graph).

CUDA graphs replay the kernels of the captured step on the same memory, so a step is graph-safe only
when it (1) updates its state tensors in place, (2) takes positions from device tensors rather than
Python ints, and (3) never syncs with the host. Nothing is assumed about a mixer. Before capturing,
`host_frozen_check` runs eager steps on a copy of the cache with every Python int of the states held
at its old value (what a replay sees) and compares them with ordinary steps: that catches (1) (the
state tensors' storage must not change) and (2). Then the step is captured (a failure there, e.g. a
host sync, is (3)), and a few teacher-forced replays are compared with eager steps on a copy of the
cache before any replay is timed. A mixer that fails a check gets a row with cuda_graph=false and the
reason. After capture the host-side counters of the cache are stale (replays advance only the device
state): the cache belongs to the graph from then on.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .timing import Precision, time_calls

log = logging.getLogger("attnbench.bench")

GRAPH_WARMUP = 3  # eager steps on a side stream before capture (cuBLAS handles, Triton autotuning)
VERIFY_STEPS = 3  # teacher-forced replays compared with eager steps on a copy of the cache
VERIFY_TOL = 1e-3  # relative error of the logits, graph replay vs eager (same kernels on the same data: ~0)
VERIFY_TOL_COMPILED = 5e-2  # torch.compile fuses bf16 elementwise chains: different rounding, same maths
HOST_CHECK_TOL = 1e-5  # host_frozen_check in float32 (same ops on the same data: bitwise equal when safe)


# ------------------------------------------------------------------ CUDA-graph safety


def state_tensors(obj: Any, path: str = "states") -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from a decoding state (dataclasses, lists, tuples, dicts, attributes)."""
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += state_tensors(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += state_tensors(v, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            out += state_tensors(v, f"{path}.{k}")
    return out


def inplace_violation(before: list[tuple[str, torch.Tensor]], after: list[tuple[str, torch.Tensor]]) -> str | None:
    """Why a decode step is not graph-safe on account of its state storage, or None."""
    b = {p: (t.data_ptr(), tuple(t.shape), t.dtype) for p, t in before}
    a = {p: (t.data_ptr(), tuple(t.shape), t.dtype) for p, t in after}
    for p in sorted(set(a) | set(b)):
        if p not in b:
            return f"the decode step adds state tensor {p} (a graph replays on fixed storage)"
        if p not in a:
            return f"the decode step drops state tensor {p}"
        if a[p] != b[p]:
            return (f"the decode step replaces {p} instead of updating it in place (copy_/index_copy_); "
                    "a graph replay would keep reading the old tensor")
    return None


def _host_scalars(obj: Any, out: list | None = None, depth: int = 0) -> list[tuple[Any, str, Any]]:
    """(owner, attribute, value) of every Python int/float/bool attribute of the state objects."""
    out = [] if out is None else out
    if depth > 6:
        return out
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _host_scalars(v, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _host_scalars(v, out, depth + 1)
    elif not isinstance(obj, torch.Tensor) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if isinstance(v, (bool, int, float)):
                out.append((obj, k, v))
            else:
                _host_scalars(v, out, depth + 1)
    return out


def _restore(snapshot: list[tuple[Any, str, Any]]) -> None:
    for owner, k, v in snapshot:
        setattr(owner, k, v)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.no_grad()
def host_frozen_check(model: torch.nn.Module, cache: Any, tokens: torch.Tensor, tol: float = HOST_CHECK_TOL) -> str | None:
    """The graph checks without a GPU: the reason a decode step is not graph-safe, or None.

    Runs decode steps for `tokens` [n, B, 1] the way graph replays see the host: every Python int of
    the states frozen at its value before the first step (a replay re-runs kernels, not Python), and
    compares the logits with ordinary eager steps on a copy of the cache. Also checks that the state
    tensors keep their storage. Advances `cache` (pass a copy to keep yours).
    """
    ref = copy.deepcopy(cache)
    host = _host_scalars(cache)
    before = state_tensors(cache.states)
    for i, t in enumerate(tokens):
        _restore(host)
        got = model(t, cache=cache)[0]
        want = model(t, cache=ref)[0]
        reason = inplace_violation(before, state_tensors(cache.states))
        if reason:
            return reason
        err = _rel_err(got, want)
        if not err <= tol:
            return (f"with host counters frozen (as in a graph replay) step {i} differs from eager decode "
                    f"(logits rel err {err:.2e}): the step reads a host-side position")
    _restore(host)
    return None


def frozen_host(fn: Callable[[], torch.Tensor], cache: Any) -> Callable[[], torch.Tensor]:
    """`fn` run with the cache's host counters restored to their current values before every call."""
    host = _host_scalars(cache)

    def run() -> torch.Tensor:
        _restore(host)
        return fn()

    return run


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module, backend: Any = "inductor") -> Iterator[None]:
    """Regional compilation of the decode step: every transformer block is compiled, and since they all
    run Block.forward they share one compiled graph (a whole-model compile per mixer and prompt length
    costs several times as long). The blocks run eagerly again afterwards."""
    torch._dynamo.reset()
    blocks = list(model.blocks)
    for b in blocks:
        b.compile(backend=backend, dynamic=False)
    try:
        yield
    finally:
        for b in blocks:
            b._compiled_call_impl = None  # the slot nn.Module.compile fills: back to the eager forward


@dataclass
class GraphResult:
    samples: list[float] | None
    reason: str | None = None
    verify_err: float | None = None
    compiled: bool = False
    compile_error: str | None = None


def graph_decode(model: torch.nn.Module, cache: Any, tok: torch.Tensor, step: Callable[[], torch.Tensor],
                 prec: Precision, warmup: int, steps: int, compile: bool = False) -> GraphResult:
    """Check, capture and time the decode step in a CUDA graph (module doc: the three conditions).
    With `compile`, the captured step is the torch.compile'd one (fused kernels; frozen_host_compiled)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    forced = torch.randint(0, vocab, (VERIFY_STEPS, *tok.shape), generator=g).to(tok.device)
    with torch.no_grad(), prec.context("cuda", cache_enabled=False):  # autocast's cast cache must be off
        # Screen first, without capturing: an unsafe step is never captured (its capture could fail
        # part-way, or worse, succeed and replay wrong numbers).
        reason = host_frozen_check(model, copy.deepcopy(cache), forced[:2], tol=VERIFY_TOL)
        if reason:
            return GraphResult(None, reason)
        fn, compile_error = step, None
        regional = contextlib.ExitStack()
        if compile:
            try:
                regional.enter_context(compiled_blocks(model))
                fn = frozen_host(step, cache)
                fn()  # compiles here, outside any capture
            except Exception as e:  # noqa: BLE001 - fall back to capturing the eager step
                regional.close()
                log.warning("%s: torch.compile of the decode step failed (%s); capturing it uncompiled",
                            type(model.blocks[0].mixer).__name__, e)
                fn, compile_error = step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        with regional:
            return _capture_verify_time(model, cache, tok, fn, step, forced, warmup, steps, compile_error)


def _capture_verify_time(model: torch.nn.Module, cache: Any, tok: torch.Tensor, fn: Callable[[], torch.Tensor],
                         step: Callable[[], torch.Tensor], forced: torch.Tensor, warmup: int, steps: int,
                         compile_error: str | None) -> GraphResult:
    """Capture `fn` (the step, or its compiled form), verify replays against eager steps, time them."""
    compiled = fn is not step
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            fn()
    cur.wait_stream(side)
    torch.cuda.synchronize()
    host = _host_scalars(cache)  # capture runs the Python once but no kernel: host counters must not move
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as e:  # e.g. a host sync or a CPU tensor inside the step
        _restore(host)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return GraphResult(None, f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                           compiled=compiled, compile_error=compile_error)
    _restore(host)

    # Replays must match eager steps on a copy of the cache, token for token (teacher-forced, so a
    # near-tie in the argmax cannot make the two runs diverge).
    ref_cache, ref_tok = copy.deepcopy(cache), tok.clone()
    got = []
    for i in range(VERIFY_STEPS):
        tok.copy_(forced[i])
        graph.replay()
        got.append(out[:, -1].float().clone())
    errs = []
    # the reference is the eager step even while the blocks are compiled
    with torch.compiler.set_stance("force_eager"):
        for i in range(VERIFY_STEPS):
            ref_tok.copy_(forced[i])
            ref = model(ref_tok, cache=ref_cache)[0][:, -1].float()
            errs.append(_rel_err(got[i], ref))
    del ref_cache
    err = max(errs)
    tol = VERIFY_TOL_COMPILED if compiled else VERIFY_TOL
    if not err <= tol:
        return GraphResult(None, f"graph replay differs from eager decode (logits rel err {err:.2e} > "
                                 f"{tol:g}): the step reads a host-side position or shape "
                                 "(Python int) that replays cannot advance", err, compiled, compile_error)
    for _ in range(warmup):
        graph.replay()
    samples = time_calls(graph.replay, steps, "cuda")
    del graph
    return GraphResult(samples, None, err, compiled, compile_error)
