"""Data: prepare text corpora into token arrays, load them, and batch them fairly."""

from .corpus import BatchSampler, Corpus, ensure_prepared, val_windows
from .prepare import SHAKESPEARE_URL, prepare_shakespeare_char, prepare_text, register_cli

__all__ = [
    "Corpus",
    "BatchSampler",
    "val_windows",
    "ensure_prepared",
    "prepare_shakespeare_char",
    "prepare_text",
    "register_cli",
    "SHAKESPEARE_URL",
]
