"""Turn a text file into token arrays on disk: `<data_dir>/<name>/{train.bin, val.bin, meta.json}`.

The layout is nanoGPT's (uint16 token ids, first 90% of the characters train, last 10% val), so its
prepared folders and ours are interchangeable. meta.json is written last: a folder without it is
half-prepared and gets redone; a folder whose meta.json records the same source sha256 is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from attnbench.errors import AttnbenchError, DiskFullError
from attnbench.files import atomic_write, disk_full_error

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
ENV_VAR = "ATTNBENCH_DATA"
TOKENIZERS = ("char", "byte")
TRAIN_FRACTION = 0.9
MAX_VOCAB = 65536  # ids 0..65535 fit in uint16
MIN_SPLIT_TOKENS = 2  # a split needs at least one (input, target) pair
DOWNLOAD_TIMEOUT_S = 20.0


# ---------------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, meta: dict[str, Any]) -> bool:
    """True when both .bin files exist with the sizes meta.json promises."""
    try:
        return (
            (folder / "train.bin").stat().st_size == 2 * int(meta["train_tokens"])
            and (folder / "val.bin").stat().st_size == 2 * int(meta["val_tokens"])
        )
    except (OSError, KeyError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# Text -> tokens


def _read_text(input_path: Path) -> tuple[str, bytes]:
    """Read and validate a UTF-8 text file; returns (text, raw bytes)."""
    if not input_path.exists():
        raise AttnbenchError(f"input file not found: {input_path}")
    if not input_path.is_file():
        raise AttnbenchError(f"input path is not a file: {input_path}")
    raw = input_path.read_bytes()
    if not raw:
        raise AttnbenchError(f"input file is empty: {input_path}")
    if b"\0" in raw:
        raise AttnbenchError(f"input file is binary, not text: {input_path} (it holds NUL bytes, at byte "
                             f"{raw.index(0)}); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttnbenchError(
            f"input file is not valid UTF-8: {input_path} (byte offset {e.start}: {e.reason}); "
            "convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    return text, raw


def _tokenize(text: str, tokenizer: str, source: str) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Split `text` 90/10 by characters and encode both parts: (train_ids, val_ids, itos, n_tokens)."""
    n_chars = len(text)
    n_train_chars = int(n_chars * TRAIN_FRACTION)
    if tokenizer == "char":
        # Code points as integers; np.unique sorts them, which is exactly sorted(set(text)).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        vocab = np.unique(codes)
        if len(vocab) > MAX_VOCAB:
            raise AttnbenchError(
                f"{source} has {len(vocab)} distinct characters; the char tokenizer stores ids as uint16 "
                f"(at most {MAX_VOCAB}); use --tokenizer byte"
            )
        ids = np.searchsorted(vocab, codes).astype(np.uint16)
        itos = [chr(int(c)) for c in vocab]
        return ids[:n_train_chars], ids[n_train_chars:], itos, len(ids)
    if tokenizer == "byte":
        # Split on a character boundary so no multi-byte character straddles train and val.
        train = np.frombuffer(text[:n_train_chars].encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        val = np.frombuffer(text[n_train_chars:].encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        # itos for bytes is informational only (bytes >= 128 are not characters on their own).
        itos = [chr(i) for i in range(256)]
        return train, val, itos, len(train) + len(val)
    raise AttnbenchError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")


def _prepare(
    text: str,
    raw: bytes,
    *,
    source: str,
    name: str,
    tokenizer: str,
    data_dir: Path,
    force: bool,
    verbose: bool,
) -> Path:
    if tokenizer not in TOKENIZERS:
        raise AttnbenchError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise AttnbenchError(f"invalid dataset name {name!r}: use a plain folder name like 'my_text'")
    folder = Path(data_dir) / name
    sha = _sha256(raw)

    old = _read_meta(folder)
    if (
        not force
        and old is not None
        and old.get("source_sha256") == sha
        and old.get("tokenizer") == tokenizer
        and _is_complete(folder, old)
    ):
        if verbose:
            print(f"{folder} is already prepared from this source (sha256 {sha[:12]}); "
                  "nothing to do (--force rewrites)")
        return folder

    train, val, itos, n_tokens = _tokenize(text, tokenizer, source)
    for split, arr in (("train", train), ("val", val)):
        if len(arr) < MIN_SPLIT_TOKENS:
            raise AttnbenchError(
                f"{source} is too short to split: {len(text)} characters give {len(arr)} {split} tokens "
                f"(the {split} split needs at least {MIN_SPLIT_TOKENS}); use a longer text"
            )

    folder.mkdir(parents=True, exist_ok=True)
    # The new arrays are written beside the old folder's files first, so a failed write (a full disk)
    # leaves a prepared folder whole. Then meta.json goes before the arrays are swapped in: a crash
    # in between leaves the folder visibly half-prepared instead of pairing old metadata with new arrays.
    staged: dict[str, Path] = {}
    try:
        for split, arr in (("train", train), ("val", val)):
            data = arr.astype(np.uint16).tobytes()
            staged[split] = folder / f".{split}.bin.new"
            try:
                atomic_write_bytes(staged[split], data)
            except DiskFullError:
                raise disk_full_error(folder / f"{split}.bin", len(data)) from None
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    (folder / "meta.json").unlink(missing_ok=True)
    for split, tmp in staged.items():
        os.replace(tmp, folder / f"{split}.bin")
    meta = {
        "name": name,
        "tokenizer": tokenizer,
        "vocab_size": len(itos),
        "itos": itos,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "chars": len(text),
        "source_sha256": sha,
        "tokens_per_char": n_tokens / len(text),
    }
    meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    atomic_write_bytes(folder / "meta.json", meta_bytes)  # last: its presence marks a complete folder
    if verbose:
        print(f"wrote {folder / 'train.bin'} ({meta['train_tokens']:,} tokens)")
        print(f"wrote {folder / 'val.bin'} ({meta['val_tokens']:,} tokens)")
        print(f"wrote {folder / 'meta.json'} (tokenizer {tokenizer}, vocab_size {meta['vocab_size']}, "
              f"{len(text):,} characters)")
    return folder


# ---------------------------------------------------------------------------------------------------
# Public entry points


def prepare_text(
    input_path: str | Path,
    name: str,
    tokenizer: str = "char",
    data_dir: str | Path = "data",
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Prepare any UTF-8 text file as dataset `name`; returns the dataset folder."""
    if tokenizer not in TOKENIZERS:
        raise AttnbenchError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    input_path = Path(input_path)
    text, raw = _read_text(input_path)
    return _prepare(
        text, raw, source=str(input_path), name=name, tokenizer=tokenizer,
        data_dir=Path(data_dir), force=force, verbose=verbose,
    )


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Fetch `url`; raises urllib.error.URLError / OSError without network. Tests replace this."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _missing_data_error(reason: str) -> AttnbenchError:
    return AttnbenchError(
        f"cannot get tiny Shakespeare: {reason}.\n"
        f"Download {SHAKESPEARE_URL} elsewhere and give it to attnbench in one of two ways:\n"
        "  attnbench prepare shakespeare_char --input PATH\n"
        f"  {ENV_VAR}=/path/to/input.txt attnbench ..."
    )


def _shakespeare_source(data_dir: Path, input_path: str | Path | None, verbose: bool) -> Path:
    """Find input.txt: explicit path, then $ATTNBENCH_DATA, then an earlier download, then the network."""
    if input_path is not None:
        return Path(input_path)
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        if not p.is_file():
            raise AttnbenchError(f"{ENV_VAR}={env} does not point to a file; set it to the path of input.txt")
        return p
    dest = data_dir / "shakespeare_char" / "input.txt"
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    if verbose:
        print(f"downloading {SHAKESPEARE_URL}")
    try:
        raw = _download(SHAKESPEARE_URL)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise _missing_data_error(f"no --input given, {ENV_VAR} is not set, and the download failed ({e})") from None
    if not raw:
        raise _missing_data_error("the download returned no data")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, raw)
    return dest


def prepare_shakespeare_char(
    data_dir: str | Path = "data",
    input_path: str | Path | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """nanoGPT's shakespeare_char: 65 characters, 1,003,854 train / 111,540 val tokens."""
    data_dir = Path(data_dir)
    src = _shakespeare_source(data_dir, input_path, verbose)
    text, raw = _read_text(src)
    return _prepare(
        text, raw, source=str(src), name="shakespeare_char", tokenizer="char",
        data_dir=data_dir, force=force, verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------------
# CLI


def _cmd_shakespeare(args: argparse.Namespace) -> int:
    prepare_shakespeare_char(args.data_dir, input_path=args.input, force=args.force)
    return 0


def _cmd_text(args: argparse.Namespace) -> int:
    prepare_text(args.input, args.name, tokenizer=args.tokenizer, data_dir=args.data_dir, force=args.force)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `prepare shakespeare_char` and `prepare text` to the main CLI; each sets args.func."""
    p = subparsers.add_parser("prepare", help="tokenize a text corpus into <data_dir>/<name>/")
    sub = p.add_subparsers(dest="dataset", metavar="{shakespeare_char,text}", required=True)

    s = sub.add_parser("shakespeare_char", help="tiny Shakespeare, char-level (as nanoGPT)")
    s.add_argument("--data_dir", default="data", help="parent folder of the dataset (default: data)")
    s.add_argument("--input", default=None, help=f"local input.txt (else ${ENV_VAR}, else download)")
    s.add_argument("--force", action="store_true", help="rewrite even if already prepared")
    s.set_defaults(func=_cmd_shakespeare)

    t = sub.add_parser("text", help="any UTF-8 text file")
    t.add_argument("--input", required=True, help="UTF-8 text file")
    t.add_argument("--name", required=True, help="dataset name (folder under --data_dir)")
    t.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    t.add_argument("--data_dir", default="data", help="parent folder of the dataset (default: data)")
    t.add_argument("--force", action="store_true", help="rewrite even if already prepared")
    t.set_defaults(func=_cmd_text)


__all__: list[str] = [
    "SHAKESPEARE_URL",
    "prepare_shakespeare_char",
    "prepare_text",
    "register_cli",
    "atomic_write_bytes",
]
