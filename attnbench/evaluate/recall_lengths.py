"""Recall-trained (MQAR) runs at other sequence lengths: Zoology's protocol of testing a model trained at
L on longer sequences with proportionally more key-value pairs (its train-at-256 models are tested at 512
and 1024). At a length L' the test set has K' = round(K * L' / L) pairs (at least one), the run's
vocabulary, gap distribution, fillers and data seed, and the run's number of test examples; at L' = L it
is the run's own test set (exactly so for a streamed training split, `task.num_train = 0`; with a stored
split the run's set also drops the rare test example that equals a training one).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from ..config import TaskConfig
from ..errors import AttnbenchError, ConfigError
from ..tasks import evaluate_task, task_config
from ..tasks.mqar import MQARConfig, make_mqar


def scaled_task(task: TaskConfig, length: int) -> MQARConfig:
    """The MQAR test set at `length` tokens; AttnbenchError naming the length when it cannot be built."""
    pairs = max(1, round(task.num_kv_pairs * length / task.seq_len))
    try:
        return dataclasses.replace(task_config(task), seq_len=length, num_kv_pairs=pairs, num_train=0)
    except ConfigError as e:
        raise AttnbenchError(f"--lengths {length}: an MQAR test of {length} tokens with {pairs} pairs (the run's "
                             f"{task.num_kv_pairs} per {task.seq_len} tokens) cannot be built: {e}") from None


def evaluate_recall_length(model: torch.nn.Module, task: TaskConfig, length: int, device: str,
                           dtype: torch.dtype, batch_tokens: int) -> dict | None:
    """Loss (over the answers) and accuracy (Zoology's) at one length; None when one example alone does not
    fit in GPU memory. Starts at batch_tokens // length examples per batch and halves on out-of-memory."""
    cfg = scaled_task(task, length)
    data = make_mqar(cfg)
    x = torch.from_numpy(np.asarray(data.test_inputs, dtype=np.int64))
    y = torch.from_numpy(np.asarray(data.test_labels, dtype=np.int64))
    autocast = (torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") and dtype != torch.float32
                else contextlib.nullcontext())
    batch = max(1, min(len(x), batch_tokens // length))
    while True:
        oom = False
        try:
            loss, acc = evaluate_task(model, x, y, batch, device, autocast, labels_per_row=cfg.num_kv_pairs)
        except torch.OutOfMemoryError:
            oom = True  # handled outside the except block, so the error does not pin the batch's tensors
        if not oom:
            return {"task": "mqar", "num_kv_pairs": cfg.num_kv_pairs, "examples": len(x), "loss": loss,
                    "accuracy": acc, "batch_examples": batch}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if batch == 1:
            return None
        batch //= 2
