"""A prepared corpus on disk, and the two ways models see it: random training batches and fixed val windows.

Fairness: every mixer trained with the same seed sees the same training batches in the same order
(BatchSampler draws from its own torch.Generator, independent of model init and dropout RNG), and is
evaluated on the same tokens (val_windows covers the whole val split in fixed windows).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnbench.errors import AttnbenchError

from . import prepare as _prepare

ArrayLike = np.ndarray | torch.Tensor


def _prepare_hint(name: str) -> str:
    if name == "shakespeare_char":
        return (
            "run `attnbench prepare shakespeare_char` (add --input PATH, or set "
            f"{_prepare.ENV_VAR}=/path/to/input.txt, when there is no network)"
        )
    return f"run `attnbench prepare text --input FILE --name {name} --tokenizer char|byte`"


def ensure_prepared(data_dir: str | Path, name: str) -> Path:
    """Return the dataset folder; prepare shakespeare_char on the fly when it is missing.

    Other names are never prepared implicitly: we would not know their source file.
    """
    folder = Path(data_dir) / name
    if (folder / "meta.json").is_file():
        return folder
    if name == "shakespeare_char":
        # Uses $ATTNBENCH_DATA, an earlier download or the network; otherwise it raises an error
        # that names both --input and ATTNBENCH_DATA.
        return _prepare.prepare_shakespeare_char(data_dir)
    raise AttnbenchError(f"dataset {name!r} not found in {folder} (no meta.json); {_prepare_hint(name)}")


def _to_numpy(tokens: ArrayLike) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens


class Corpus:
    """train/val token arrays (read-only uint16 memmaps), the vocabulary and its codec."""

    def __init__(self, folder: Path, meta: dict[str, Any], train: np.memmap, val: np.memmap) -> None:
        self.folder = folder
        self.meta = meta
        self.train = train
        self.val = val
        self.name: str = meta["name"]
        self.tokenizer: str = meta["tokenizer"]
        self.vocab_size: int = int(meta["vocab_size"])
        self.itos: list[str] = list(meta["itos"])
        self._stoi = {s: i for i, s in enumerate(self.itos)} if self.tokenizer == "char" else {}

    @classmethod
    def load(cls, data_dir: str | Path, name: str, auto_prepare: bool = True) -> "Corpus":
        """Open `<data_dir>/<name>/`; with auto_prepare, a missing shakespeare_char is prepared first."""
        folder = ensure_prepared(data_dir, name) if auto_prepare else Path(data_dir) / name
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise AttnbenchError(f"dataset {name!r} not found in {folder} (no meta.json); {_prepare_hint(name)}")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise AttnbenchError(f"{meta_path} is not valid JSON ({e}); {_prepare_hint(name)} with --force") from None
        required = ("name", "tokenizer", "vocab_size", "itos", "train_tokens", "val_tokens")
        missing = [k for k in required if k not in meta]
        if missing:
            raise AttnbenchError(f"{meta_path} lacks {', '.join(missing)}; {_prepare_hint(name)} with --force")
        splits = {}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            want = int(meta[f"{split}_tokens"])
            have = path.stat().st_size // 2 if path.is_file() else None
            if have != want:
                raise AttnbenchError(
                    f"{path} holds {have} tokens but meta.json says {want}; the folder is damaged: "
                    f"{_prepare_hint(name)} with --force"
                )
            splits[split] = np.memmap(path, dtype=np.uint16, mode="r")
        return cls(folder, meta, splits["train"], splits["val"])

    def encode(self, text: str) -> list[int]:
        if self.tokenizer == "byte":
            return list(text.encode("utf-8"))
        out = []
        for pos, ch in enumerate(text):
            i = self._stoi.get(ch)
            if i is None:
                raise AttnbenchError(
                    f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the {self.name} vocabulary "
                    f"({self.vocab_size} characters)"
                )
            out.append(i)
        return out

    def decode(self, ids: list[int] | np.ndarray | torch.Tensor) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise AttnbenchError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if self.tokenizer == "byte":
            # A model may emit invalid byte sequences; show them rather than fail.
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.itos[i] for i in ids)

    @property
    def tokens_per_char(self) -> float:
        return float(self.meta.get("tokens_per_char", 1.0))

    def bits_per_char(self, mean_loss_nats: float) -> float:
        """Mean loss per token (nats) -> bits per character: loss * tokens / (ln 2 * chars).

        For the char tokenizer that is loss / ln 2; for bytes it is scaled by bytes per character,
        which makes char- and byte-level models comparable.
        """
        return float(mean_loss_nats) * self.tokens_per_char / math.log(2)

    def __repr__(self) -> str:
        return (
            f"Corpus({self.name!r}, tokenizer={self.tokenizer}, vocab_size={self.vocab_size}, "
            f"train={len(self.train):,}, val={len(self.val):,})"
        )


class BatchSampler:
    """Random training windows as nanoGPT's get_batch, but reproducible, resumable and DDP-aware.

    One optimizer step draws the offsets of all `num_micro * world_size` micro-batches at once from
    one generator, so every rank draws the same numbers and takes its own slice. Hence one process
    with gradient accumulation sees exactly the batches that several DDP ranks see together.
    """

    def __init__(self, tokens: ArrayLike, block_size: int, batch_size: int, seed: int) -> None:
        self.tokens = _to_numpy(tokens)
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        if self.block_size < 1 or self.batch_size < 1:
            raise AttnbenchError(f"block_size and batch_size must be >= 1 (got {block_size}, {batch_size})")
        if len(self.tokens) <= self.block_size:
            raise AttnbenchError(
                f"the split has {len(self.tokens)} tokens, too few for block_size {self.block_size} "
                f"(needs at least block_size + 1); lower block_size"
            )
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.steps = 0
        self._ar = np.arange(self.block_size + 1)

    def next_step(self, num_micro: int, world_size: int = 1, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `num_micro` (x, y) micro-batches of the next optimizer step; int64 CPU [B, T]."""
        if num_micro < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise AttnbenchError(f"bad sampler call: num_micro={num_micro}, world_size={world_size}, rank={rank}")
        T = self.block_size
        # i uniform in [0, len - T - 1], so y = tokens[i+1 : i+1+T] stays inside the split.
        offsets = torch.randint(
            len(self.tokens) - T, (num_micro * world_size, self.batch_size), generator=self.generator
        ).numpy()
        self.steps += 1
        out = []
        for m in range(rank * num_micro, (rank + 1) * num_micro):
            w = torch.from_numpy(self.tokens[offsets[m][:, None] + self._ar].astype(np.int64))
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),  # uint8 tensor
            "steps": self.steps,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("block_size", "batch_size"):
            if k in d and int(d[k]) != getattr(self, k):
                raise AttnbenchError(
                    f"cannot resume the data order: the checkpoint was drawn with {k}={d[k]}, this run uses "
                    f"{getattr(self, k)}; resume with the same {k} or start a new run"
                )
        state = d["generator"]
        if not isinstance(state, torch.Tensor):
            state = torch.tensor(state, dtype=torch.uint8)
        self.generator.set_state(state.to(dtype=torch.uint8, device="cpu"))
        self.steps = int(d.get("steps", 0))


def val_windows(tokens: ArrayLike, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows of the split: x[i] = tokens[iT : iT+T], y shifted by one; int64 [N, T].

    N = (len - 1) // T; the tail that does not fill a whole window is dropped.
    """
    arr = _to_numpy(tokens)
    T = int(block_size)
    if T < 1:
        raise AttnbenchError(f"block_size must be >= 1 (got {block_size})")
    n = (len(arr) - 1) // T
    if n < 1:
        raise AttnbenchError(
            f"the validation split has {len(arr)} tokens, fewer than one window of block_size {T} + 1; "
            "lower block_size or use a longer text"
        )
    x = torch.from_numpy(np.asarray(arr[: n * T], dtype=np.int64).reshape(n, T))
    y = torch.from_numpy(np.asarray(arr[1 : n * T + 1], dtype=np.int64).reshape(n, T))
    return x, y


__all__ = ["Corpus", "BatchSampler", "val_windows", "ensure_prepared"]
