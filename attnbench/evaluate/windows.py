"""The windows a length is evaluated on: every non-overlapping window of that length in the validation
split, from its start (the trainer's own validation windows at the training length), the same for
every model."""
from __future__ import annotations

import numpy as np
import torch

from ..data import val_windows
from ..errors import AttnbenchError


def parse_lengths(text: str | list[int]) -> list[int]:
    """'256,1024' (or a list) -> sorted distinct positive ints; AttnbenchError naming a bad entry."""
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    out = []
    for t in items:
        try:
            n = int(t)
        except (TypeError, ValueError):
            raise AttnbenchError(f"--lengths: {t!r} is not a whole number of tokens (write e.g. 256,1024,4096)") from None
        if isinstance(t, bool) or n < 1:
            raise AttnbenchError(f"--lengths: {t!r} must be a positive number of tokens")
        out.append(n)
    if not out:
        raise AttnbenchError("--lengths is empty; give at least one length, e.g. --lengths 256,1024")
    return sorted(set(out))


def check_length(n_val_tokens: int, length: int, where: str) -> None:
    """A window of `length` tokens needs length + 1 tokens of the split (inputs and shifted targets)."""
    if length + 1 > n_val_tokens:
        raise AttnbenchError(f"length {length} is longer than the validation split of {where} ({n_val_tokens} tokens "
                             f"hold at most windows of {n_val_tokens - 1}); ask for lengths <= {n_val_tokens - 1}")


def eval_windows(tokens: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [N, length] int64: the (len - 1) // length windows of the split (data.val_windows)."""
    return val_windows(tokens, length)
