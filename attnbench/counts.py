"""Counts written the way people write them: '10.7M' parameters, '64k' tokens, '1Mi' bytes.

The one parser for every such value in configs, sweep files and command lines.
"""
from __future__ import annotations

import math
import re

from .errors import ConfigError

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30}
_PATTERN = re.compile(r"((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*(ki|mi|gi|k|m|g|b)?", flags=re.I)


def parse_count(value: str | int | float, what: str = "count") -> int:
    """'10.7M' -> 10_700_000, '850k', '1.5e7', '10_700_000', '1,000', '1Mi' -> 1_048_576, 4096 -> 4096.

    `what` names the setting in the error: "cannot read param_budget '10.7X' as a count ...".
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number like '10.7M', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        s = str(value).strip().replace("_", "").replace(",", "")
        m = _PATTERN.fullmatch(s)
        if not m:
            raise ConfigError(f"cannot read {what} {value!r} as a count; write e.g. 10.7M, 850k, 1.5e7, 1Mi or 4096")
        suffix = (m.group(2) or "").lower()
        n = float(m.group(1)) * {**_DECIMAL, **_BINARY}[suffix]
    if not math.isfinite(n) or n < 1:
        raise ConfigError(f"{what} must be a positive count, got {value!r}")
    return int(round(n))


def format_count(n: int | float) -> str:
    """10_700_000 -> '10.7M', 850_000 -> '850k', 4096 -> '4096' (inverse of parse_count up to rounding)."""
    for div, suf in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:g}"
