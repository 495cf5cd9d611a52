"""Per-position losses averaged in position buckets.

Position t (0-based) is the t-th prediction of a window: the model has seen t + 1 tokens of it. Buckets
are powers of two, [0, 1), [1, 2), [2, 4), [4, 8), ..., the last one cut at the window length, so the
bucket [L/2, L) of a window of L tokens holds its second half. Sums are accumulated in float64 so that a
bucket's mean is the mean of its token losses, whatever the batching. Each bucket also carries the standard
error of its mean over windows (the spread of the windows' own bucket means / sqrt(windows)): how far the
value could move on other text of the same kind, which a comparison between models or positions needs.
"""
from __future__ import annotations

import torch


def bucket_edges(length: int) -> list[tuple[int, int]]:
    """[(0, 1), (1, 2), (2, 4), ..., (2^k, length)]: half-open ranges of positions covering [0, length)."""
    edges = [(0, 1)] if length >= 1 else []
    lo = 1
    while lo < length:
        edges.append((lo, min(2 * lo, length)))
        lo *= 2
    return edges


def bucket_of_positions(length: int) -> torch.Tensor:
    """The bucket index of every position 0..length-1, int64 [length]."""
    idx = torch.empty(length, dtype=torch.long)
    for i, (lo, hi) in enumerate(bucket_edges(length)):
        idx[lo:hi] = i
    return idx


class BucketSums:
    """Loss sums and token counts per bucket, for windows of one length."""

    def __init__(self, length: int):
        self.length = length
        self.edges = bucket_edges(length)
        self.index = bucket_of_positions(length)
        self.sizes = torch.tensor([hi - lo for lo, hi in self.edges], dtype=torch.float64)
        self.sums = torch.zeros(len(self.edges), dtype=torch.float64)
        self.counts = torch.zeros(len(self.edges), dtype=torch.long)
        self.window_sq = torch.zeros(len(self.edges), dtype=torch.float64)  # sum over windows of (bucket mean)^2
        self.whole_sq = torch.zeros((), dtype=torch.float64)  # sum over windows of (window mean)^2
        self.windows = 0

    def add(self, losses: torch.Tensor) -> None:
        """losses [B, length]: the token losses of B windows."""
        per_window = torch.zeros(losses.shape[0], len(self.edges), dtype=torch.float64)
        per_window.index_add_(1, self.index, losses.detach().double().cpu())
        self.sums += per_window.sum(0)
        self.window_sq += ((per_window / self.sizes) ** 2).sum(0)
        self.whole_sq += ((per_window.sum(1) / self.length) ** 2).sum()
        self.counts.index_add_(0, self.index, torch.full((self.length,), losses.shape[0], dtype=torch.long))
        self.windows += losses.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    def standard_errors(self) -> list[float | None]:
        """Per bucket: sample standard deviation of the windows' bucket means / sqrt(windows); None with
        fewer than two windows."""
        n = self.windows
        if n < 2:
            return [None] * len(self.edges)
        return [float(v) for v in _standard_error(self.window_sq, self.sums / (n * self.sizes), n)]

    def mean_se(self) -> float | None:
        """The standard error of mean() over windows (every window has `length` tokens); None with fewer
        than two windows."""
        n = self.windows
        if n < 2:
            return None
        return float(_standard_error(self.whole_sq, self.sums.sum() / self.counts.sum(), n))

    def rows(self) -> list[dict]:
        return [{"lo": lo, "hi": hi, "loss": float(s / c), "tokens": int(c), "se": se}
                for (lo, hi), s, c, se in zip(self.edges, self.sums, self.counts, self.standard_errors()) if c > 0]


def _standard_error(sum_sq: torch.Tensor, mean: torch.Tensor, n: int) -> torch.Tensor:
    """sqrt(sample variance / n) of n values from their sum of squares and mean."""
    var = (sum_sq / n - mean ** 2).clamp_min(0) * n / (n - 1)
    return (var / n).sqrt()
