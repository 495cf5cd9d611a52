"""torchrun / DDP plumbing: the same training command works for 1 process or N (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); otherwise single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def teardown(d: Dist, clean: bool = True) -> None:
    """Leave the group. After a clean finish wait for every rank first (rank 0 may still be writing,
    and gloo aborts a process whose peer left); after an error, leave at once (a barrier could hang)."""
    if d.enabled and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, d: Dist, device) -> bool:
    """Rank 0's decision, for every rank (e.g. 'stop now')."""
    if not d.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
