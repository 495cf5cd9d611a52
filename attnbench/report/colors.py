"""One colour and one place per mixer, the same in every figure and table of every report. Hybrids (layer
patterns such as "gated_deltanet*3+softmax") take a colour by the hash of their name and come after the
plain mixers; `mixer_label` writes a name for a markdown cell."""
from __future__ import annotations

import zlib

MIXER_COLORS = {
    "softmax": "#1f77b4",  # blue
    "deltanet": "#ff7f0e",  # orange
    "gated_deltanet": "#2ca02c",  # green
    "gated_deltaproduct": "#d62728",  # red
    "nsa": "#9467bd",  # purple
    "gla": "#8c564b",  # brown
    "kda": "#e377c2",  # pink
    "mamba2": "#17becf",  # cyan
    "swa": "#7f7f7f",  # grey
    "gated_deltanet*3+softmax": "#bcbd22",  # olive
    "mamba2+swa": "#393b79",  # dark blue
}
# every registered mixer and preset hybrid has its own colour above (a test checks), because eleven series
# in one figure left to a hash shared one; other names (new mixers, variant labels such as softmax_nope,
# other patterns) take one of these by a hash of the name
_SPARE = ["#637939", "#843c39", "#7b4173", "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6"]
MIXER_ORDER = list(MIXER_COLORS)  # tables and legends list mixers in this order, then the others by name


def mixer_color(mixer: str) -> str:
    if mixer in MIXER_COLORS:
        return MIXER_COLORS[mixer]
    return _SPARE[zlib.crc32(mixer.encode()) % len(_SPARE)]  # stable across runs and machines


def mixer_key(m: str) -> tuple:
    """Sort key for mixer names (MIXER_ORDER, then the other plain mixers, then hybrids; each by name)."""
    return (MIXER_ORDER.index(m) if m in MIXER_ORDER else len(MIXER_ORDER), "+" in m or "*" in m, m)


def mixer_label(m: str) -> str:
    """A mixer or pattern name for markdown: `*` escaped, so "a*3+b*1" is not read as emphasis."""
    return m.replace("*", "\\*")

