"""Multi-query associative recall (MQAR), constructed as Zoology constructs it, with its metrics.

Zoology (HazyResearch/zoology, `zoology/data/multiquery_ar.py`) builds one example of length L from
K key-value pairs:

    positions 0 .. 2K-1      k1 v1 k2 v2 ... kK vK     keys from 1 .. V//2-1, values from V//2 .. V-1,
                                                         no key and no value repeated inside an example
    positions 2K .. L-1      each key once more, as a query, at position 2K + 2*g; the K gaps g are
                             distinct, drawn from 0 .. (L-2K)//2 - 1 with weights (g+1)**(power_a-1)
                             (power_a = 0.01: short gaps are far more likely), key j takes the j-th draw
    every other position     token 0 (`random_non_queries=False`), or a uniform token from 0 .. V-1

Labels are -100 (ignored) everywhere except at each query's own position, where the label is the value
paired with that key: the model reads the query and predicts the value as the next token (Zoology builds
L+1 tokens and shifts inputs/labels by one; the result is this layout). Token 0 is never a key or a value
because it marks the filler positions. The value never follows its query in the input.

Sampling. Each split draws from its own PCG64 stream (seeded by `SeedSequence(seed, spawn_key=(split,))`)
and uses only the stream's raw 64-bit words, whose sequence numpy keeps fixed across versions and
machines; example i of a split consumes words [i*w, (i+1)*w) for a fixed width w, so the examples do not
depend on how many are generated at once (the first n examples of a larger set are the n-example set).
Keys and values: Floyd's algorithm (a uniform K-subset) then a uniform order, which together are
Zoology's `np.random.choice(..., replace=False)`. Gaps: an exponential race (gap g finishes at E_g / w_g,
E_g ~ Exp(1); the first K finishers in order), which has the same distribution as Zoology's sequential
weighted draws without replacement. Bit-identical output on two machines needs only that libm's log and
pow agree, or differ where two race times tie to the last bit (probability about 1e-16 per pair).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attnbench.errors import ConfigError
from attnbench.files import atomic_write, atomic_write_json

IGNORE_INDEX = -100
TOKEN_DTYPES = ("int16", "int32", "int64")  # signed: labels hold IGNORE_INDEX
FORMAT = 1  # bump when the construction changes, so prepared folders from another construction are not reused
_SPLITS = {"train": 0, "test": 1}
_CHUNK_ROWS = 4096  # memory bound only: the examples do not depend on it
_FLOYD_BITMAP_CELLS = 1 << 26  # above this a chunk's seen-token bitmap is replaced by comparisons
_MAX_TEST_ROUNDS = 1000
_FILES = ("train_inputs", "train_labels", "test_inputs", "test_labels")


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR dataset. Defaults follow Zoology's figure-2 grid: vocabulary 8192, power_a 0.01, 100k train
    and 3k test examples, and its smallest (seq_len, num_kv_pairs) point (64, 4).

    random_non_queries: Zoology's generator defaults to True (uniform random fillers), but the published
    figure-2 grid (`zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`) passes False
    (fillers are token 0); the default here follows the published numbers.
    Zoology also asserts vocab_size > seq_len; the construction does not need it, so it is not enforced.
    """

    seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01
    num_train: int = 100_000  # 0: no stored training split; `train_examples` streams them (TaskConfig.num_train)
    num_test: int = 3_000
    seed: int = 0
    random_non_queries: bool = False
    dtype: str = "int32"

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_kv_pairs", "vocab_size", "num_train", "num_test", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"mqar {name} must be an integer, got {v!r}")
        for name in ("seq_len", "num_kv_pairs", "num_test"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mqar {name} must be positive, got {getattr(self, name)}; set it to 1 or more")
        if self.num_train < 0:
            raise ConfigError(f"mqar num_train must be 0 (training examples streamed, none stored) or positive, "
                              f"got {self.num_train}")
        if self.seed < 0:
            raise ConfigError(f"mqar seed must be non-negative, got {self.seed}")
        if not isinstance(self.random_non_queries, bool):
            raise ConfigError(f"mqar random_non_queries must be true or false, got {self.random_non_queries!r}")
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) \
                or not math.isfinite(self.power_a) or self.power_a <= 0:
            raise ConfigError(f"mqar power_a must be a positive number (Zoology uses 0.01; 1.0 is uniform gaps), "
                              f"got {self.power_a!r}")
        if self.dtype not in TOKEN_DTYPES:
            raise ConfigError(f"mqar dtype {self.dtype!r} is not a token dtype; use one of {', '.join(TOKEN_DTYPES)}")
        top = int(np.iinfo(self.dtype).max)
        if self.vocab_size - 1 > top:
            raise ConfigError(f"mqar vocab_size {self.vocab_size} does not fit dtype {self.dtype} (token ids up to "
                              f"{top}); use dtype int32 or int64, or vocab_size at most {top + 1}")
        k, max_k = self.num_kv_pairs, self.vocab_size // 2 - 1
        if k > max_k:
            raise ConfigError(
                f"mqar num_kv_pairs {k} is too large for vocab_size {self.vocab_size}: keys are distinct tokens "
                f"from 1 .. vocab_size//2 - 1 (token 0 marks fillers), so num_kv_pairs can be at most "
                f"vocab_size // 2 - 1 = {max_k}; lower num_kv_pairs or set vocab_size to at least {2 * (k + 1)}")
        if self.seq_len % 2:
            raise ConfigError(f"mqar seq_len must be even (queries sit on every other position after the pairs, "
                              f"as in Zoology), got {self.seq_len}; use {self.seq_len + 1}")
        if self.seq_len < 4 * k:
            raise ConfigError(
                f"mqar seq_len {self.seq_len} is too short for num_kv_pairs {k}: the pairs take 2*K tokens and the "
                f"K queries need K distinct even offsets in the remaining seq_len - 2*K, so seq_len >= 4 * "
                f"num_kv_pairs = {4 * k}; raise seq_len or lower num_kv_pairs to {self.seq_len // 4}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "power_a": float(self.power_a)}

    def short_hash(self) -> str:
        """12 hex digits naming this dataset: same settings (and construction format) -> same name."""
        blob = json.dumps({"task": "mqar", "format": FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class MQARData:
    """Both splits: inputs and labels are [N, seq_len] arrays of the config's dtype."""

    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray


# ---------------------------------------------------------------------------------------------------
# Generation


def split_stream(seed: int, split: str) -> np.random.PCG64:
    """The bit generator of one split; train and test streams are independent children of `seed`."""
    return np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SPLITS[split],)))


def gap_weights(seq_len: int, num_kv_pairs: int, power_a: float) -> np.ndarray:
    """Zoology's query-gap distribution over gaps 0 .. (L-2K)//2 - 1, normalised: p_g ∝ (g+1)**(power_a-1)."""
    space = (seq_len - 2 * num_kv_pairs) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct(draws: np.ndarray, order_draws: np.ndarray, m: int) -> np.ndarray:
    """Per row, K distinct integers of 0 .. m-1 in uniform random order, from 2K raw words per row.

    Floyd's algorithm: for j = m-K .. m-1 take t uniform in 0 .. j, or j itself when t is already taken.
    """
    n, k = draws.shape
    out = np.empty((n, k), dtype=np.int64)
    rows = np.arange(n)
    seen = np.zeros((n, m), dtype=bool) if n * m <= _FLOYD_BITMAP_CELLS else None
    for i in range(k):
        j = m - k + i
        t = (draws[:, i] % np.uint64(j + 1)).astype(np.int64)
        taken = seen[rows, t] if seen is not None else (out[:, :i] == t[:, None]).any(axis=1)
        c = np.where(taken, j, t)
        if seen is not None:
            seen[rows, c] = True
        out[:, i] = c
    return np.take_along_axis(out, np.argsort(order_draws, axis=1, kind="stable"), axis=1)


def _width(cfg: MQARConfig) -> int:
    k, space = cfg.num_kv_pairs, (cfg.seq_len - 2 * cfg.num_kv_pairs) // 2
    return 4 * k + space + (cfg.seq_len if cfg.random_non_queries else 0)


def sample_examples(cfg: MQARConfig, n: int, stream: np.random.PCG64) -> tuple[np.ndarray, np.ndarray]:
    """n examples (inputs, labels), each [n, seq_len] of cfg.dtype, drawn from `stream` (advances it)."""
    inputs = np.empty((n, cfg.seq_len), dtype=cfg.dtype)
    labels = np.empty((n, cfg.seq_len), dtype=cfg.dtype)
    for start in range(0, n, _CHUNK_ROWS):
        rows = min(_CHUNK_ROWS, n - start)
        x, y = _chunk(cfg, stream.random_raw(rows * _width(cfg)).reshape(rows, -1))
        inputs[start:start + rows], labels[start:start + rows] = x, y
    return inputs, labels


def train_examples(cfg: MQARConfig, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Training examples start .. start+n-1 of the train stream, without the ones before: example i takes
    the stream's words [i*w, (i+1)*w), so the stream is advanced to start*w. They are the stored train
    split's first examples, in order, however far the split would reach."""
    stream = split_stream(cfg.seed, "train")
    stream.advance(start * _width(cfg))
    return sample_examples(cfg, n, stream)


def _chunk(cfg: MQARConfig, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k, L, V = raw.shape[0], cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    space = (L - 2 * k) // 2
    keys = 1 + _distinct(raw[:, 0:k], raw[:, k:2 * k], half - 1)
    values = half + _distinct(raw[:, 2 * k:3 * k], raw[:, 3 * k:4 * k], V - half)
    # exponential race: uniform in (0, 1) from the top 53 bits, E = -log(u), finish time E / p_g
    u = ((raw[:, 4 * k:4 * k + space] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    finish = -np.log(u) / gap_weights(L, k, cfg.power_a)
    first = np.argpartition(finish, k - 1, axis=1)[:, :k] if k < space else np.tile(np.arange(space), (n, 1))
    gaps = np.take_along_axis(first, np.argsort(np.take_along_axis(finish, first, axis=1), axis=1), axis=1)
    if cfg.random_non_queries:
        inputs = (raw[:, 4 * k + space:] % np.uint64(V)).astype(np.int64)
    else:
        inputs = np.zeros((n, L), dtype=np.int64)
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values
    queries = 2 * k + 2 * gaps
    np.put_along_axis(inputs, queries, keys, axis=1)
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, queries, values, axis=1)
    return inputs, labels


def _row_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row (uint64 arithmetic wraps); equal rows hash equal, matches are confirmed exactly."""
    mult = np.random.PCG64(np.random.SeedSequence(0x6d716172)).random_raw(x.shape[1]) | np.uint64(1)
    out = np.empty(x.shape[0], dtype=np.uint64)
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        out[s:s + _CHUNK_ROWS] = ((x[s:s + _CHUNK_ROWS].astype(np.uint64) + np.uint64(1)) * mult).sum(axis=1)
    return out


class RowSet:
    """The rows of a reference array, hashed once, for membership tests of many candidate batches."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference
        h = _row_hashes(reference)
        self.order = np.argsort(h, kind="stable")
        self.sorted_h = h[self.order]

    def mask(self, candidates: np.ndarray) -> np.ndarray:
        """Boolean mask over `candidates` rows: True where the identical row occurs in the reference."""
        cand_h = _row_hashes(candidates)
        found = np.zeros(len(candidates), dtype=bool)
        for i in np.flatnonzero(np.isin(cand_h, self.sorted_h)):
            lo = np.searchsorted(self.sorted_h, cand_h[i], "left")
            hi = np.searchsorted(self.sorted_h, cand_h[i], "right")
            found[i] = bool((self.reference[self.order[lo:hi]] == candidates[i]).all(axis=1).any())
        return found


def rows_in(candidates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Boolean mask over `candidates` rows: True where the identical row occurs in `reference`."""
    return RowSet(reference).mask(candidates)


def make_mqar(cfg: MQARConfig) -> MQARData:
    """Both splits. Test examples whose inputs occur in train are dropped and replaced from the test stream
    (Zoology draws test from a different seed and, in its older generator, only warned about overlap)."""
    train_x, train_y = sample_examples(cfg, cfg.num_train, split_stream(cfg.seed, "train"))
    stream = split_stream(cfg.seed, "test")
    xs, ys, have = [], [], 0
    for _ in range(_MAX_TEST_ROUNDS):
        if have == cfg.num_test:
            break
        x, y = sample_examples(cfg, cfg.num_test - have, stream)
        keep = ~rows_in(x, train_x)
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
    if have < cfg.num_test:
        raise ConfigError(
            f"mqar settings (seq_len {cfg.seq_len}, num_kv_pairs {cfg.num_kv_pairs}, vocab_size {cfg.vocab_size}) "
            f"allow too few distinct examples for {cfg.num_test} test examples that are not in the "
            f"{cfg.num_train} train examples; raise vocab_size or seq_len, or lower num_train or num_test")
    return MQARData(train_x, train_y, np.concatenate(xs), np.concatenate(ys))


# ---------------------------------------------------------------------------------------------------
# Metrics


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def example_accuracies(logits_or_preds, labels) -> torch.Tensor:
    """Per example, the fraction of its labelled positions predicted right (float64, one entry per example
    with at least one label). `logits_or_preds` is [N, L, V] logits (argmax taken) or [N, L] predictions."""
    labels = _as_tensor(labels)
    preds = _as_tensor(logits_or_preds)
    if preds.dim() == labels.dim() + 1:
        preds = preds.argmax(dim=-1)
    if preds.shape != labels.shape or labels.dim() != 2:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} must both be [N, L] "
                         "(or logits [N, L, V])")
    mask = labels != IGNORE_INDEX
    count = mask.sum(dim=1)
    correct = ((preds.to(labels.device) == labels) & mask).sum(dim=1)
    keep = count > 0
    return correct[keep].double() / count[keep].double()


def accuracy(logits_or_preds, labels) -> float:
    """Zoology's MQAR accuracy: per example over its labelled (query) positions, then the mean over examples.

    Zoology (`compute_metrics` in zoology/train.py) takes `(pred == target)[target != -100].mean()` per
    example and averages the examples of the whole test set with pandas, which skips examples without
    labels; so does this. Every MQAR example has exactly K labels, so the per-token mean is the same number
    here. Over several batches, average `example_accuracies` of all of them rather than batch means.
    """
    acc = example_accuracies(logits_or_preds, labels)
    if acc.numel() == 0:
        raise ValueError("accuracy: no labelled positions (every label is -100)")
    return float(acc.mean())


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over labelled positions only (ignore_index -100), as Zoology's
    nn.CrossEntropyLoss. No boolean indexing, so no host sync and CUDA graphs can capture it."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------
# Prepared form: <data_dir>/mqar-<hash>/{train_inputs,train_labels,test_inputs,test_labels}.npy + meta.json


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save given a name would append ".npy" to the temp name
            np.save(f, arr, allow_pickle=False)

    atomic_write(path, write)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _folder_ok(folder: Path, cfg: MQARConfig, verify: bool) -> bool:
    """True when meta.json names this config and every array has the recorded size, shape and dtype."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("config") != cfg.to_dict():
            return False
        for name in _FILES:
            info, path = meta["files"][name], folder / f"{name}.npy"
            if path.stat().st_size != info["bytes"]:
                return False
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if list(arr.shape) != info["shape"] or str(arr.dtype) != cfg.dtype:
                return False
            if verify and _sha256_file(path) != info["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_mqar(data_dir: str | Path, cfg: MQARConfig, verify: bool = False) -> Path:
    """Generate the dataset into `<data_dir>/mqar-<cfg.short_hash()>/` once and return the folder.

    A folder whose meta.json matches the config and whose files have the recorded sizes is reused
    (`verify=True` also checks their sha256); anything else is regenerated. Every file is written
    atomically and meta.json last, so a killed run leaves a folder that is rebuilt next time.
    """
    folder = Path(data_dir) / f"mqar-{cfg.short_hash()}"
    if _folder_ok(folder, cfg, verify):
        return folder
    data = make_mqar(cfg)
    files = {}
    for name in _FILES:
        path = folder / f"{name}.npy"
        arr = getattr(data, name)
        _save_npy(path, arr)
        files[name] = {"shape": list(arr.shape), "bytes": path.stat().st_size, "sha256": _sha256_file(path)}
    atomic_write_json(folder / "meta.json", {
        "task": "mqar", "format": FORMAT, "config": cfg.to_dict(),
        "queries_per_example": cfg.num_kv_pairs, "files": files})
    return folder


def load_mqar(folder: str | Path, mmap: bool = True) -> MQARData:
    """The arrays of a prepared folder (memory-mapped, read-only, by default)."""
    folder = Path(folder)
    mode = "r" if mmap else None
    return MQARData(*(np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False) for name in _FILES))
