"""One training step as the trainer takes it, on random tokens: what the memory and throughput
benchmarks measure."""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..trainer import make_optimizer as trainer_optimizer
from .timing import Precision


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """The trainer's AdamW (decay on matrices, none on parameters marked _no_weight_decay; fused on CUDA)."""
    return trainer_optimizer(model, RunConfig(), device)


def random_batch(vocab: int, batch: int, T: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, vocab, (batch, T + 1), generator=g)
    return x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               prec: Precision, device: str, zero_grad: bool = True, autocast_cache: bool = True) -> None:
    """One full training step as the trainer takes it: forward + loss, backward, gradient clipping at 1.0,
    AdamW step (no loss scaling: bf16 needs none). A CUDA-graph step (graphed_step.GraphedStep) passes
    zero_grad=False (it resets gradients itself) and autocast_cache=False."""
    with prec.context(device, cache_enabled=autocast_cache):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if zero_grad:
        opt.zero_grad(set_to_none=True)
