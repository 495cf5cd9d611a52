"""A whole training step (forward, backward, gradient clipping, optimizer step) captured once in a CUDA
graph and replayed: one launch per step instead of hundreds to thousands.

At ~10M parameters and 64 x 256 tokens a step of these models is launch-bound: the GPU waits on the
host issuing small kernels (FLA's chunked ops and the PyTorch delta op are dozens of kernels per layer).
A replay issues the recorded kernels back to back on the same memory, so the step costs what its
kernels cost. The pattern is PyTorch's "whole network capture":

* the first `warmup_steps` calls run eagerly on a side stream (real training steps: they also trigger
  lazy initialisation, torch.compile and Triton autotuning, none of which may happen inside a capture);
* then the gradients are reset to None and the next call records the step; the backward of the capture
  allocates the gradients in the graph's memory, so every replay overwrites them (never accumulates);
* inputs are copied into static tensors before each replay; everything the step writes (parameters,
  optimizer state, the running loss) lives in tensors the caller keeps.

What the step needs from the caller: no host synchronisation (no .item(), no data-dependent shapes),
an optimizer built graph-safe (`make_graph_safe`: capturable, learning rate as a device tensor), autocast
without its weight cache. If the capture fails anyway (an op that syncs or allocates on the host), the
reason is kept and logged and the step runs eagerly from then on: same maths, more launches.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("attnbench.graphed_step")


def make_graph_safe(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Prepare an optimizer (after any load_state_dict, which restores the saved group settings) for a
    captured step: `capturable` keeps its step counters on the GPU, and the learning rate becomes a device
    tensor the caller updates in place (`set_lr`) so the recorded kernels read each step's value."""
    for g in optimizer.param_groups:
        g["capturable"] = True
        lr = g["lr"]
        g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; in place where it is a tensor (a graph-safe optimizer)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def _capture(step: Callable[..., None], inputs: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*inputs)
    return graph


class GraphedStep:
    """Calls `step(*inputs)` (which returns nothing and writes its results into tensors the caller holds),
    captured in a CUDA graph after `warmup_steps` eager calls. `reset_grads` sets the gradients to None
    (optimizer.zero_grad(set_to_none=True)); it runs after every eager call and before the capture.
    `enabled=False` (or a failed capture) runs every call eagerly, followed by `reset_grads`."""

    def __init__(self, step: Callable[..., None], reset_grads: Callable[[], None], *, enabled: bool = True,
                 warmup_steps: int = 2, label: str = "step"):
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1: the capture needs one eager step before it")
        self.step, self.reset_grads, self.label = step, reset_grads, label
        self.enabled, self.warmup_steps = enabled, warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] | None = None
        self.calls = 0
        self.reason: str | None = None if enabled else "disabled"

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> None:
        self.calls += 1
        if not self.enabled or self.reason is not None:
            self.step(*inputs)
            self.reset_grads()
            return
        if self.static is None:
            self.static = [t.clone() for t in inputs]
        else:
            for s, t in zip(self.static, inputs):
                s.copy_(t, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return
        if self.calls <= self.warmup_steps:
            self._side_stream(lambda: self.step(*self.static))
            self.reset_grads()
            return
        self.reset_grads()
        try:
            self.graph = _capture(self.step, self.static)
        except Exception as e:  # noqa: BLE001 - fall back to eager steps, with the reason on record
            self.graph = None
            self.reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("%s: CUDA graph capture failed (%s); running eagerly from here", self.label, self.reason)
            print(f"{self.label}: CUDA graph capture failed ({self.reason}); running eagerly from here", flush=True)
            self.reset_grads()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.step(*self.static)
            self.reset_grads()
            return
        self.graph.replay()

    @staticmethod
    def _side_stream(fn: Callable[[], None]) -> None:
        """Warm-up off the default stream, as PyTorch asks before a capture (lazy state created on the
        side stream does not tie the capture stream to earlier work)."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
