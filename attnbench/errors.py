"""The exception types users see, and the one "did you mean" helper their messages use.

Bad input is named, with a fix, and raised before any work starts; the CLI prints the message and exits
with code 2.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class AttnbenchError(Exception):
    """A user-facing error. The CLI prints its message and exits with code 2."""


class ConfigError(AttnbenchError):
    """A configuration key, type or combination is invalid."""


class DiskFullError(AttnbenchError):
    """A write failed for lack of space; the files written before it are intact (attnbench.files)."""


def did_you_mean(word: str, candidates: Iterable[str], prefix: str = "", list_all: bool = False,
                 cutoff: float = 0.5) -> str:
    """'; did you mean <prefix>X?' for the nearest candidate, else the valid choices (with list_all) or ''.

    Appended to an error message: `f"unknown key {k!r}{did_you_mean(k, keys)}"`.
    """
    names = list(candidates)
    near = difflib.get_close_matches(str(word), names, n=1, cutoff=cutoff)
    if near:
        return f"; did you mean {prefix}{near[0]!r}?" if not prefix else f"; did you mean {prefix}{near[0]}?"
    if list_all:
        return f"; valid choices: {', '.join(names) or '(none)'}"
    return ""
