"""Training on a task's prepared examples: the task's settings from a run config, batches of whole
examples in a seeded order, and the evaluation over the whole test split (loss and accuracy).

The trainer uses these when `task.kind` is not "lm"; language modelling keeps its own windows and sampler
(attnbench/data). Batches hold whole examples: one epoch is a permutation of the train split drawn from
(seed, epoch), and a step that crosses the end of an epoch continues into the next permutation, so the
order depends only on the seed and the number of examples drawn (resumable from a step count).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TaskConfig
from ..errors import AttnbenchError, ConfigError
from ..model import labelled_positions
from .mqar import IGNORE_INDEX, MQARConfig, RowSet, load_mqar, prepare_mqar, train_examples


def task_config(task: TaskConfig) -> MQARConfig:
    """The MQAR dataset a run's [task] section names; ConfigError naming the task key when a setting is
    impossible (L too short for K pairs and their queries, K too large for half the vocabulary, ...)."""
    # the narrowest token dtype that holds the vocabulary: one-pass training sets are hundreds of thousands
    # of examples, read by every run of a sweep
    dtype = "int16" if 0 < task.vocab_size <= np.iinfo(np.int16).max + 1 else "int32"
    try:
        return MQARConfig(seq_len=task.seq_len, num_kv_pairs=task.num_kv_pairs, vocab_size=task.vocab_size,
                          power_a=task.power_a, num_train=task.num_train, num_test=task.num_test,
                          seed=task.data_seed, random_non_queries=task.random_non_queries, dtype=dtype)
    except ConfigError as e:
        msg = str(e).replace("mqar seed", "mqar data_seed")
        raise ConfigError(f"task (kind 'mqar'): {msg} [keys task.seq_len, task.num_kv_pairs, task.vocab_size, "
                          "task.power_a, task.num_train, task.num_test, task.data_seed]") from None


def prepare_task(task: TaskConfig, data_dir: str | Path) -> Path:
    """Generate the task's examples into data_dir once (idempotent) and return their folder."""
    return prepare_mqar(data_dir, task_config(task))


class ExampleSampler:
    """Batches of whole examples (inputs, labels) from a split, DDP-aware like data.BatchSampler: each step
    takes the next `num_micro * world_size * batch_size` examples of the seeded order, and each rank its
    own slice, so one process with accumulation sees what several ranks see together."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> None:
        self.inputs, self.labels = inputs, labels
        self.n = len(inputs)
        self.batch_size, self.seed = int(batch_size), int(seed)
        if self.n < 1:
            raise AttnbenchError("the task's train split is empty; raise task.num_train")
        self.drawn = 0  # examples taken so far (over all ranks)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).numpy()
        return self._perm

    def _take(self, count: int) -> np.ndarray:
        out = []
        while count:
            epoch, pos = divmod(self.drawn, self.n)
            k = min(count, self.n - pos)
            out.append(self._order(epoch)[pos:pos + k])
            self.drawn += k
            count -= k
        return np.concatenate(out)

    def next_step(self, num_micro: int, world_size: int = 1, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `num_micro` (x, y) micro-batches of the next optimizer step; int64 CPU [B, L]."""
        B = self.batch_size
        idx = np.sort(self._take(num_micro * world_size * B).reshape(num_micro * world_size, B), axis=1)
        out = []
        for m in range(rank * num_micro, (rank + 1) * num_micro):
            x = torch.from_numpy(np.asarray(self.inputs[idx[m]], dtype=np.int64))
            y = torch.from_numpy(np.asarray(self.labels[idx[m]], dtype=np.int64))
            out.append((x, y))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "seed": self.seed, "batch_size": self.batch_size, "n": self.n}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("batch_size", "n"):
            if k in d and int(d[k]) != getattr(self, k):
                raise AttnbenchError(f"cannot resume the data order: the checkpoint was drawn with {k}={d[k]}, this "
                                     f"run has {getattr(self, k)}; resume with the same settings or start a new run")
        self.drawn = int(d["drawn"])


class StreamSampler:
    """Training examples generated as training goes (`task.num_train = 0`): each step takes the next
    `num_micro * world_size * batch_size` examples of the seeded train stream (mqar.train_examples), so no
    example is seen twice and none is stored; each rank generates its own slice. An example identical to a
    test example keeps its inputs and loses its labels (it trains nothing), so train and test stay disjoint.
    The run's seed does not change the examples, as with a stored split it does not change the split."""

    def __init__(self, cfg: MQARConfig, test_inputs: np.ndarray, batch_size: int) -> None:
        self.cfg, self.batch_size = cfg, int(batch_size)
        self.test = RowSet(np.asarray(test_inputs))
        self.drawn = 0  # examples taken so far (over all ranks)

    def next_step(self, num_micro: int, world_size: int = 1, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `num_micro` (x, y) micro-batches of the next optimizer step; int64 CPU [B, L]."""
        B = self.batch_size
        start = self.drawn + rank * num_micro * B
        x, y = train_examples(self.cfg, start, num_micro * B)
        y[self.test.mask(x)] = IGNORE_INDEX
        self.drawn += num_micro * world_size * B
        x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        return [(x[m * B:(m + 1) * B], y[m * B:(m + 1) * B]) for m in range(num_micro)]

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "batch_size": self.batch_size, "stream": True}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not d.get("stream") or int(d["batch_size"]) != self.batch_size:
            raise AttnbenchError("cannot resume the data order: the checkpoint was drawn "
                                 + ("with another batch_size" if d.get("stream") else "from a stored train split")
                                 + "; resume with the same settings or start a new run")
        self.drawn = int(d["drawn"])


class TaskData:
    """A prepared task for one run: its train sampler and its whole test split."""

    def __init__(self, task: TaskConfig, data_dir: str | Path, batch_size: int, seed: int) -> None:
        self.task = task
        cfg = task_config(task)
        data = load_mqar(prepare_mqar(data_dir, cfg))
        self.sampler = (StreamSampler(cfg, data.test_inputs, batch_size) if cfg.num_train == 0 else
                        ExampleSampler(data.train_inputs, data.train_labels, batch_size, seed))
        self.test_x = torch.from_numpy(np.asarray(data.test_inputs, dtype=np.int64))
        self.test_y = torch.from_numpy(np.asarray(data.test_labels, dtype=np.int64))
        self.labels_per_row = task.num_kv_pairs  # every example labels its K queries (GPT.forward's labels_per_row)


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch: int, device: str,
                  autocast, rank: int = 0, world_size: int = 1, reduce=None,
                  labels_per_row: int | None = None) -> tuple[float, float]:
    """(loss, accuracy) over every test example: the loss is the mean cross-entropy over labelled positions,
    the accuracy Zoology's (per example, the fraction of its queries answered right; then the mean over
    examples). Examples are sharded over `world_size` ranks and `reduce` sums the totals over them in place;
    the last batch is padded to the same shape (no recompilation). labels_per_row (every example labels
    exactly that many positions, as MQAR's K queries): the head runs at those positions only, the same
    numbers for a fraction of the work (GPT.forward)."""
    was_training = model.training
    model.eval()
    # [loss sum, labelled positions, accuracy sum, examples]
    total = torch.zeros(4, dtype=torch.float64, device=device)
    idx = torch.arange(rank, len(x_all), world_size)
    with torch.compiler.set_stance("force_eager"):
        for i in range(0, len(idx), batch):
            sel = idx[i:i + batch]
            n = len(sel)
            if n < batch:
                sel = torch.cat([sel, sel[:1].expand(batch - n)])
            x, y = x_all[sel].to(device, non_blocking=True), y_all[sel].to(device, non_blocking=True)
            with autocast:
                if labels_per_row is None:
                    logits, _ = model(x)
                else:
                    logits, _ = model(x, y, labels_per_row=labels_per_row)
                    y = y.gather(1, labelled_positions(y, labels_per_row))
            logits, y = logits[:n].float(), y[:n]
            mask = y != IGNORE_INDEX
            total[0] += F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="sum").double()
            total[1] += mask.sum()
            correct = ((logits.argmax(-1) == y) & mask).sum(1).double()
            per = mask.sum(1).double()
            has = per > 0  # examples without labels are skipped, as Zoology's pandas mean skips NaN
            total[2] += (correct[has] / per[has]).sum()
            total[3] += has.sum()
    if reduce is not None:
        reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item(), (total[2] / total[3]).item()
