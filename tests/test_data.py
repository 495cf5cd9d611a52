"""Data preparation, corpus loading and batching (attnbench/data/)."""

from __future__ import annotations

import argparse
import json
import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from attnbench.data import BatchSampler, Corpus, prepare_shakespeare_char, prepare_text, val_windows
from attnbench.data import prepare as prep
from attnbench.data.prepare import register_cli
from attnbench.errors import AttnbenchError

def _synthetic_text(n_lines: int = 200, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "KING", "QUEEN:", "anon!"]
    return "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(n_lines)) + "\n"


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "input.txt"
    p.write_text(_synthetic_text(), encoding="utf-8")
    return p


@pytest.fixture(autouse=True)
def _no_network_no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may reach the network or pick up a developer's ATTNBENCH_DATA by accident.
    def blocked(url: str, timeout: float = 0) -> bytes:
        raise urllib.error.URLError("network blocked in tests")

    monkeypatch.setattr(prep, "_download", blocked)
    monkeypatch.delenv("ATTNBENCH_DATA", raising=False)


# --- preparation ------------------------------------------------------------------------------------


def test_char_prepare_split_meta_and_roundtrip(tmp_path: Path, text_file: Path) -> None:
    text = text_file.read_text(encoding="utf-8")
    folder = prepare_text(text_file, "syn", tokenizer="char", data_dir=tmp_path / "d", verbose=False)
    assert folder == tmp_path / "d" / "syn"
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    n_train = int(len(text) * 0.9)
    assert meta["itos"] == sorted(set(text))
    assert meta["vocab_size"] == len(set(text))
    assert (meta["train_tokens"], meta["val_tokens"], meta["chars"]) == (n_train, len(text) - n_train, len(text))
    assert meta["tokens_per_char"] == 1.0 and meta["tokenizer"] == "char" and meta["name"] == "syn"

    c = Corpus.load(tmp_path / "d", "syn")
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16
    with pytest.raises((ValueError, TypeError)):
        c.train[0] = 1  # read-only
    # The split is the first 90% / last 10% of the characters, in order.
    assert c.decode(c.train) == text[:n_train]
    assert c.decode(c.val) == text[n_train:]
    assert c.decode(c.encode(text)) == text
    assert c.bits_per_char(1.0) == pytest.approx(1 / math.log(2))
    with pytest.raises(AttnbenchError, match="U\\+00E9"):
        c.encode("café")


def test_byte_prepare_roundtrip_non_ascii(tmp_path: Path) -> None:
    text = ("Ünïcødé — λόγος 漢字 🙂 plain ascii too\n" * 30)
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    prepare_text(p, "u", tokenizer="byte", data_dir=tmp_path, verbose=False)
    c = Corpus.load(tmp_path, "u")
    assert c.vocab_size == 256 and c.tokenizer == "byte"
    n_train = int(len(text) * 0.9)
    assert c.decode(c.train) == text[:n_train] and c.decode(c.val) == text[n_train:]
    assert c.decode(c.encode(text)) == text
    n_bytes = len(text.encode("utf-8"))
    assert len(c.train) + len(c.val) == n_bytes
    assert c.meta["tokens_per_char"] == pytest.approx(n_bytes / len(text))
    # bpc = loss per token * tokens / (ln 2 * chars)
    assert c.bits_per_char(0.7) == pytest.approx(0.7 * n_bytes / (math.log(2) * len(text)))


def test_shakespeare_char_prepared_from_attnbench_data(tmp_path: Path, text_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a prepared folder, shakespeare_char is prepared on the fly from the file $ATTNBENCH_DATA names
    (a generated text here: any input.txt is split 90/10 by characters)."""
    text = text_file.read_text(encoding="utf-8")
    monkeypatch.setenv("ATTNBENCH_DATA", str(text_file))
    c = Corpus.load(tmp_path, "shakespeare_char")
    n_train = int(len(text) * 0.9)
    assert c.vocab_size == len(set(text)) and c.meta["chars"] == len(text)
    assert (len(c.train), len(c.val)) == (n_train, len(text) - n_train)
    assert c.decode(c.train) + c.decode(c.val) == text


def test_missing_data_error_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(AttnbenchError) as e:
        prepare_shakespeare_char(tmp_path, verbose=False)
    assert "--input" in str(e.value) and "ATTNBENCH_DATA" in str(e.value)
    # Corpus.load goes through the same path.
    with pytest.raises(AttnbenchError, match="ATTNBENCH_DATA"):
        Corpus.load(tmp_path, "shakespeare_char")
    assert not (tmp_path / "shakespeare_char" / "meta.json").exists()


def test_download_is_used_and_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _synthetic_text(50, seed=1)
    monkeypatch.setattr(prep, "_download", lambda url, timeout=0: text.encode("utf-8"))
    folder = prepare_shakespeare_char(tmp_path, verbose=False)
    assert (folder / "input.txt").read_text(encoding="utf-8") == text
    assert Corpus.load(tmp_path, "shakespeare_char").meta["chars"] == len(text)


def test_input_errors(tmp_path: Path) -> None:
    with pytest.raises(AttnbenchError, match="not found"):
        prepare_text(tmp_path / "nope.txt", "x", data_dir=tmp_path, verbose=False)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(AttnbenchError, match="empty"):
        prepare_text(empty, "x", data_dir=tmp_path, verbose=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello world " * 3 + "caf\xe9".encode("latin-1") + b" more")
    with pytest.raises(AttnbenchError, match="byte offset 39"):
        prepare_text(bad, "x", data_dir=tmp_path, verbose=False)
    ok = tmp_path / "ok.txt"
    ok.write_text(_synthetic_text(5), encoding="utf-8")
    with pytest.raises(AttnbenchError, match="unknown tokenizer 'bpe'"):
        prepare_text(ok, "x", tokenizer="bpe", data_dir=tmp_path, verbose=False)
    short = tmp_path / "short.txt"
    short.write_text("abcdefghijk", encoding="utf-8")  # 11 chars -> 9 train / 2 val: fine
    prepare_text(short, "ok_short", data_dir=tmp_path, verbose=False)
    short.write_text("abcdefghij", encoding="utf-8")  # 10 chars -> 9 train / 1 val: too short
    with pytest.raises(AttnbenchError, match="too short"):
        prepare_text(short, "x", data_dir=tmp_path, verbose=False)
    assert not (tmp_path / "x").exists()


def test_vocab_over_uint16(tmp_path: Path) -> None:
    cps = [c for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c <= 0xDFFF]
    p = tmp_path / "huge_vocab.txt"
    p.write_text("".join(map(chr, cps)), encoding="utf-8")
    with pytest.raises(AttnbenchError, match="uint16.*--tokenizer byte"):
        prepare_text(p, "x", data_dir=tmp_path, verbose=False)


def test_idempotent_and_reprepare_on_change(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    folder = prepare_text(text_file, "syn", data_dir=tmp_path, verbose=False)
    files = ["train.bin", "val.bin", "meta.json"]
    # Push mtimes into the past so a rewrite would be visible even on coarse-mtime filesystems.
    for f in files:
        os.utime(folder / f, ns=(1_000_000_000, 1_000_000_000))
    prepare_text(text_file, "syn", data_dir=tmp_path, verbose=True)
    assert "already prepared" in capsys.readouterr().out
    assert all((folder / f).stat().st_mtime_ns == 1_000_000_000 for f in files)

    prepare_text(text_file, "syn", data_dir=tmp_path, force=True, verbose=False)
    assert all((folder / f).stat().st_mtime_ns != 1_000_000_000 for f in files)

    # A changed source is re-prepared.
    text_file.write_text(_synthetic_text(seed=7) + "Zebra\n", encoding="utf-8")
    prepare_text(text_file, "syn", data_dir=tmp_path, verbose=False)
    c = Corpus.load(tmp_path, "syn")
    assert "Z" in c.itos and c.meta["chars"] == len(text_file.read_text(encoding="utf-8"))

    # A half-prepared folder (meta.json missing) is redone rather than trusted.
    (folder / "meta.json").unlink()
    with pytest.raises(AttnbenchError, match="attnbench prepare text"):
        Corpus.load(tmp_path, "syn")
    prepare_text(text_file, "syn", data_dir=tmp_path, verbose=False)
    assert Corpus.load(tmp_path, "syn").meta["chars"] == c.meta["chars"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.fault("data-folder-damaged")
def test_load_errors(tmp_path: Path, text_file: Path) -> None:
    with pytest.raises(AttnbenchError, match="attnbench prepare"):
        Corpus.load(tmp_path, "nothing_here")
    folder = prepare_text(text_file, "syn", data_dir=tmp_path, verbose=False)
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(AttnbenchError, match="damaged"):
        Corpus.load(tmp_path, "syn")


# --- batching ---------------------------------------------------------------------------------------


@pytest.fixture
def tokens() -> np.ndarray:
    # Distinct values make every window identify its offset.
    return np.arange(5000, dtype=np.uint16)


def test_batch_sampler_windows_and_reproducibility(tokens: np.ndarray) -> None:
    torch.manual_seed(0)
    s1, s2 = BatchSampler(tokens, 16, 4, seed=3), BatchSampler(tokens, 16, 4, seed=3)
    s3 = BatchSampler(tokens, 16, 4, seed=4)
    for _ in range(3):
        a, b, c = s1.next_step(2), s2.next_step(2), s3.next_step(2)
        assert len(a) == 2
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == torch.int64 and xa.shape == (4, 16) and ya.shape == (4, 16)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert torch.equal(ya[:, :-1], xa[:, 1:])  # targets shifted by one
            assert torch.equal(xa - xa[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows
            assert int(ya.max()) <= len(tokens) - 1
        assert not torch.equal(a[0][0], c[0][0])
    # The model's global RNG does not influence the data order.
    torch.manual_seed(123)
    s4 = BatchSampler(tokens, 16, 4, seed=3)
    torch.rand(10)
    assert torch.equal(s4.next_step(2)[0][0], BatchSampler(tokens, 16, 4, seed=3).next_step(2)[0][0])


def test_batch_sampler_covers_full_range() -> None:
    # Tiny split: every offset in [0, len - T - 1] must be drawable, nothing beyond.
    toks = np.arange(12, dtype=np.uint16)
    s = BatchSampler(toks, 4, 64, seed=0)
    starts = set()
    for _ in range(10):
        for x, y in s.next_step(1):
            starts |= set(x[:, 0].tolist())
            assert int(y.max()) <= 11
    assert starts == set(range(0, 12 - 4))


def test_batch_sampler_ddp_slicing(tokens: np.ndarray) -> None:
    single = BatchSampler(tokens, 8, 3, seed=11)
    ranks = [BatchSampler(tokens, 8, 3, seed=11) for _ in range(2)]
    for _ in range(4):
        one = single.next_step(num_micro=2)
        per_rank = [r.next_step(num_micro=1, world_size=2, rank=k)[0] for k, r in enumerate(ranks)]
        for (x1, y1), (x2, y2) in zip(one, per_rank):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # Ranks of a 2x2 layout see disjoint slices of one 4-micro-batch step.
    full = BatchSampler(tokens, 8, 3, seed=5).next_step(4)
    r1 = BatchSampler(tokens, 8, 3, seed=5).next_step(2, world_size=2, rank=1)
    assert torch.equal(r1[0][0], full[2][0]) and torch.equal(r1[1][0], full[3][0])
    with pytest.raises(AttnbenchError):
        single.next_step(1, world_size=2, rank=2)


def test_batch_sampler_resume(tokens: np.ndarray, tmp_path: Path) -> None:
    s = BatchSampler(tokens, 8, 2, seed=1)
    for _ in range(5):
        s.next_step(2)
    state = s.state_dict()
    assert state["generator"].dtype == torch.uint8 and state["steps"] == 5
    torch.save(state, tmp_path / "sampler.pt")  # survives a checkpoint round trip
    expected = [s.next_step(2) for _ in range(5)]

    fresh = BatchSampler(tokens, 8, 2, seed=999)
    fresh.load_state_dict(torch.load(tmp_path / "sampler.pt"))
    got = [fresh.next_step(2) for _ in range(5)]
    for e_step, g_step in zip(expected, got):
        for (xe, ye), (xg, yg) in zip(e_step, g_step):
            assert torch.equal(xe, xg) and torch.equal(ye, yg)
    assert fresh.steps == 10
    with pytest.raises(AttnbenchError, match="block_size"):
        BatchSampler(tokens, 16, 2, seed=1).load_state_dict(state)


def test_batch_sampler_too_short() -> None:
    with pytest.raises(AttnbenchError, match="lower block_size"):
        BatchSampler(np.arange(8, dtype=np.uint16), 8, 2, seed=0)


def test_val_windows_cover_split() -> None:
    toks = np.arange(103, dtype=np.uint16)
    x, y = val_windows(toks, 10)
    assert x.dtype == torch.int64 and x.shape == (10, 10) and y.shape == (10, 10)  # (103-1)//10
    assert torch.equal(x.flatten(), torch.arange(100))  # non-overlapping, in order, from 0
    assert torch.equal(y.flatten(), torch.arange(1, 101))
    # Exact fit: len - 1 = N*T uses every token as input or target.
    x2, y2 = val_windows(np.arange(41, dtype=np.uint16), 10)
    assert x2.shape == (4, 10) and int(y2[-1, -1]) == 40
    # A split of exactly T tokens has no target for its last input: one window needs T+1.
    with pytest.raises(AttnbenchError, match="lower block_size"):
        val_windows(np.arange(10, dtype=np.uint16), 10)


# --- CLI --------------------------------------------------------------------------------------------


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnbench")
    register_cli(parser.add_subparsers(dest="cmd"))
    return parser


def test_cli_text_and_shakespeare(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture) -> None:
    args = _cli().parse_args(
        ["prepare", "text", "--input", str(text_file), "--name", "clitext", "--tokenizer", "byte",
         "--data_dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "train.bin" in out and "vocab_size 256" in out
    assert Corpus.load(tmp_path, "clitext").tokenizer == "byte"

    args = _cli().parse_args(["prepare", "shakespeare_char", "--data_dir", str(tmp_path), "--input", str(text_file)])
    assert args.func(args) == 0
    assert (tmp_path / "shakespeare_char" / "meta.json").is_file()
    args = _cli().parse_args(
        ["prepare", "shakespeare_char", "--data_dir", str(tmp_path), "--input", str(text_file), "--force"]
    )
    assert args.force and args.func(args) == 0

    with pytest.raises(SystemExit):
        _cli().parse_args(["prepare", "text", "--input", str(text_file), "--name", "x", "--tokenizer", "bpe"])
    with pytest.raises(SystemExit):
        _cli().parse_args(["prepare"])
