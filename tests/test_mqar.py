"""MQAR generation (attnbench.tasks.mqar): Zoology's construction, determinism, metrics, prepared folders."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnbench.errors import ConfigError
from attnbench.tasks import (IGNORE_INDEX, MQARConfig, accuracy, example_accuracies, gap_weights, load_mqar,
                             make_mqar, masked_loss, prepare_mqar)
from attnbench.tasks.mqar import rows_in

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=64, num_kv_pairs=4, vocab_size=8192, num_train=2000, num_test=300)


def _digest(data) -> str:
    h = hashlib.sha256()
    for a in (data.train_inputs, data.train_labels, data.test_inputs, data.test_labels):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=[False, True], ids=["zero-fill", "random-fill"])
def data(request):
    cfg = MQARConfig(**SMALL, seed=3, random_non_queries=request.param)
    return cfg, make_mqar(cfg)


def test_shapes_dtype_and_token_ranges(data):
    cfg, d = data
    k, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    assert d.train_inputs.shape == d.train_labels.shape == (cfg.num_train, cfg.seq_len)
    assert d.test_inputs.shape == d.test_labels.shape == (cfg.num_test, cfg.seq_len)
    assert d.train_inputs.dtype == np.int32 and d.train_labels.dtype == np.int32
    x = np.concatenate([d.train_inputs, d.test_inputs])
    keys, values = x[:, 0:2 * k:2], x[:, 1:2 * k:2]
    assert keys.min() >= 1 and keys.max() <= half - 1  # token 0 is never a key
    assert values.min() >= half and values.max() <= cfg.vocab_size - 1
    assert x.min() >= 0 and x.max() < cfg.vocab_size
    for block in (keys, values):  # no key (and no value) twice inside an example
        s = np.sort(block, axis=1)
        assert (s[:, 1:] != s[:, :-1]).all()


def test_every_query_is_labelled_with_its_value(data):
    cfg, d = data
    k = cfg.num_kv_pairs
    for x, y in ((d.train_inputs, d.train_labels), (d.test_inputs, d.test_labels)):
        labelled = y != IGNORE_INDEX
        assert (labelled.sum(axis=1) == k).all()  # Zoology places exactly one query per key
        assert not labelled[:, :2 * k].any()  # nothing labelled inside the key-value block
        assert (labelled[:, 2 * k + 1::2] == 0).all()  # queries sit on even offsets after the pairs
        for row_x, row_y in zip(x[:200], y[:200]):
            pairs = dict(zip(row_x[0:2 * k:2].tolist(), row_x[1:2 * k:2].tolist()))
            pos = np.flatnonzero(row_y != IGNORE_INDEX)
            assert sorted(row_x[pos].tolist()) == sorted(pairs)  # each key asked once
            assert [pairs[q] for q in row_x[pos].tolist()] == row_y[pos].tolist()
            if not cfg.random_non_queries:
                rest = np.ones(cfg.seq_len, bool)
                rest[:2 * k] = False
                rest[pos] = False
                assert (row_x[rest] == 0).all()
    if cfg.random_non_queries:  # Zoology's fillers: uniform over the whole vocabulary
        fill = d.train_inputs[:, 2 * k:][d.train_labels[:, 2 * k:] == IGNORE_INDEX]
        assert len(np.unique(fill)) > cfg.vocab_size // 2 and fill.max() >= cfg.vocab_size // 2


def test_zoology_docstring_layout():
    """Zoology's docstring example (vocab 12, 2 pairs, length 16, zero fill): k v k v, then queries."""
    cfg = MQARConfig(seq_len=16, num_kv_pairs=2, vocab_size=12, num_train=50, num_test=5)
    d = make_mqar(cfg)
    x, y = d.train_inputs, d.train_labels
    assert set(np.unique(x[:, 0:4:2])) <= {1, 2, 3, 4, 5} and set(np.unique(x[:, 1:4:2])) <= set(range(6, 12))
    pos = np.argwhere(y != IGNORE_INDEX)[:, 1]
    assert set(pos.tolist()) <= {4, 6, 8, 10, 12, 14}


def test_deterministic_within_and_across_processes():
    cfg = MQARConfig(**SMALL, seed=11, random_non_queries=True)
    here = _digest(make_mqar(cfg))
    assert here == _digest(make_mqar(cfg))
    assert here != _digest(make_mqar(MQARConfig(**SMALL, seed=12, random_non_queries=True)))
    code = ("import hashlib, numpy as np; from attnbench.tasks import MQARConfig, make_mqar; "
            f"d = make_mqar(MQARConfig(**{SMALL!r}, seed=11, random_non_queries=True)); h = hashlib.sha256(); "
            "[h.update(np.ascontiguousarray(a).tobytes()) for a in "
            "(d.train_inputs, d.train_labels, d.test_inputs, d.test_labels)]; print(h.hexdigest())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_examples_do_not_depend_on_how_many_are_drawn():
    small = make_mqar(MQARConfig(**{**SMALL, "num_train": 100}, seed=5))
    large = make_mqar(MQARConfig(**{**SMALL, "num_train": 5000}, seed=5))  # spans two generation chunks
    assert np.array_equal(small.train_inputs, large.train_inputs[:100])
    assert np.array_equal(small.test_inputs, large.test_inputs)


def test_train_and_test_share_no_example(data):
    _, d = data
    assert not rows_in(d.test_inputs, d.train_inputs).any()
    seen = {r.tobytes() for r in d.train_inputs}
    assert not any(r.tobytes() in seen for r in d.test_inputs)


def test_test_examples_found_in_train_are_replaced():
    # 3 keys x 4 values x 1 gap: 12 distinct examples, so most test draws repeat a train example
    cfg = MQARConfig(seq_len=4, num_kv_pairs=1, vocab_size=8, num_train=6, num_test=4, seed=1)
    d = make_mqar(cfg)
    train = {r.tobytes() for r in d.train_inputs}
    assert len(d.test_inputs) == 4 and not any(r.tobytes() in train for r in d.test_inputs)
    assert (d.test_labels[:, 2] == d.test_inputs[:, 1]).all()


def test_too_few_distinct_examples_is_a_config_error():
    with pytest.raises(ConfigError, match="too few distinct examples"):
        make_mqar(MQARConfig(seq_len=4, num_kv_pairs=1, vocab_size=8, num_train=300, num_test=4))


def test_query_gaps_follow_zoologys_draws():
    """Gap of key j = (query position - 2K) / 2. The first key's gap follows the power law itself; each key's
    mean gap matches Zoology's own call, np.random.choice(space, K, replace=False, p=p), per example."""
    cfg = MQARConfig(seq_len=64, num_kv_pairs=4, num_train=20000, num_test=10, seed=7)
    k, space = cfg.num_kv_pairs, (cfg.seq_len - 2 * cfg.num_kv_pairs) // 2
    d = make_mqar(cfg)
    x, y = d.train_inputs, d.train_labels
    gaps = np.empty((len(x), k), dtype=np.int64)
    for j in range(k):
        gaps[:, j] = (np.argmax((x == x[:, [2 * j]]) & (y != IGNORE_INDEX), axis=1) - 2 * k) // 2
    p = gap_weights(cfg.seq_len, k, cfg.power_a)
    assert len(p) == space and p[0] > 0.2 and (np.diff(p) < 0).all()  # power_a 0.01: short gaps dominate
    first = np.bincount(gaps[:, 0], minlength=space) / len(gaps)
    assert 0.5 * np.abs(first - p).sum() < 0.03  # total variation distance
    rs = np.random.RandomState(0)
    ref = np.stack([rs.choice(space, size=k, replace=False, p=p) for _ in range(5000)])
    assert np.allclose(gaps.mean(axis=0), ref.mean(axis=0), atol=0.6)
    assert np.allclose((gaps == 0).mean(axis=0), (ref == 0).mean(axis=0), atol=0.025)  # key j: the j-th draw


def test_accuracy_per_example_on_a_hand_made_batch():
    labels = torch.tensor([
        [-100, 5, -100, 7],  # 2 labels, 1 right -> 1/2
        [3, -100, -100, -100],  # 1 label, right -> 1
        [4, 4, 4, -100],  # 3 labels, 1 right -> 1/3
        [-100, -100, -100, -100],  # no labels: not counted (Zoology's mean skips it)
    ])
    preds = torch.tensor([
        [9, 5, 9, 6],
        [3, 0, 0, 0],
        [4, 1, 2, 4],
        [1, 1, 1, 1],
    ])
    want = (1 / 2 + 1 + 1 / 3) / 3  # per example, then the mean; per token it would be 3/6
    assert accuracy(preds, labels) == pytest.approx(want)
    assert example_accuracies(preds, labels).tolist() == pytest.approx([0.5, 1.0, 1 / 3])
    logits = torch.nn.functional.one_hot(preds, 10).float()
    assert accuracy(logits, labels) == pytest.approx(want)
    assert accuracy(preds.numpy(), labels.numpy().astype(np.int32)) == pytest.approx(want)
    with pytest.raises(ValueError, match="no labelled"):
        accuracy(preds[3:], labels[3:])


def test_masked_loss_ignores_unlabelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 11, generator=g)
    labels = torch.full((3, 8), IGNORE_INDEX, dtype=torch.int32)
    labels[0, 2], labels[1, 5], labels[2, 6] = 4, 9, 1
    loss = masked_loss(logits, labels)
    mask = labels != IGNORE_INDEX
    want = -torch.log_softmax(logits, -1)[mask].gather(1, labels[mask].long()[:, None]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    changed = logits.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 11, generator=g) * 50
    assert masked_loss(changed, labels).item() == loss.item()
    changed[0, 2, 0] += 1.0  # a labelled position does count
    assert masked_loss(changed, labels).item() != loss.item()


@pytest.mark.parametrize("kwargs, words", [
    (dict(seq_len=60, num_kv_pairs=16), ["seq_len 60", "seq_len >= 4 * num_kv_pairs = 64"]),
    (dict(seq_len=63, num_kv_pairs=4), ["seq_len must be even", "use 64"]),
    (dict(vocab_size=64, num_kv_pairs=32, seq_len=128), ["num_kv_pairs 32", "at most", "= 31", "at least 66"]),
    (dict(vocab_size=40000, dtype="int16"), ["vocab_size 40000", "int16", "32767", "use dtype int32"]),
    (dict(dtype="uint16"), ["dtype 'uint16'", "int16, int32, int64"]),
    (dict(num_train=-1), ["num_train must be 0 (training examples streamed, none stored) or positive"]),
    (dict(num_test=-3), ["num_test must be positive"]),
    (dict(num_kv_pairs=0), ["num_kv_pairs must be positive"]),
    (dict(seq_len=0), ["seq_len must be positive"]),
    (dict(num_train=10.5), ["num_train must be an integer"]),
    (dict(power_a=0.0), ["power_a must be a positive number"]),
    (dict(seed=-1), ["seed must be non-negative"]),
])
def test_bad_settings_name_the_setting_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError) as e:
        MQARConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_largest_settings_that_fit_are_accepted():
    MQARConfig(vocab_size=66, num_kv_pairs=32, seq_len=128)
    MQARConfig(vocab_size=32768, dtype="int16")
    MQARConfig(seq_len=64, num_kv_pairs=16)


def test_prepare_is_idempotent_and_rebuilds_damage(tmp_path):
    cfg = MQARConfig(**{**SMALL, "num_train": 500, "num_test": 50}, seed=2)
    folder = prepare_mqar(tmp_path, cfg)
    assert folder == tmp_path / f"mqar-{cfg.short_hash()}" and (folder / "meta.json").is_file()
    loaded, made = load_mqar(folder), make_mqar(cfg)
    assert _digest(loaded) == _digest(made)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_mqar(tmp_path, cfg) == folder  # reused, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["meta.json", "train_inputs.npy", "train_labels.npy", "test_inputs.npy", "test_labels.npy"])

    other = prepare_mqar(tmp_path, MQARConfig(**{**SMALL, "num_train": 500, "num_test": 50}, seed=3))
    assert other != folder

    (folder / "test_labels.npy").write_bytes(b"\x93NUMPY truncated")  # damaged file
    assert prepare_mqar(tmp_path, cfg) == folder
    assert _digest(load_mqar(folder)) == _digest(made)
    (folder / "meta.json").unlink()  # killed before meta.json was written
    prepare_mqar(tmp_path, cfg)
    assert _digest(load_mqar(folder)) == _digest(made)

    raw = bytearray((folder / "train_inputs.npy").read_bytes())  # same size, one byte changed
    raw[-1] ^= 0xFF
    (folder / "train_inputs.npy").write_bytes(bytes(raw))
    prepare_mqar(tmp_path, cfg)
    assert _digest(load_mqar(folder)) != _digest(made)  # the cheap check trusts sizes and headers
    prepare_mqar(tmp_path, cfg, verify=True)
    assert _digest(load_mqar(folder)) == _digest(made)
