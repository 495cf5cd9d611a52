"""The text table of matched shapes that `attnbench params` prints."""
from __future__ import annotations

from .count import Match


def format_table(matches: list[Match]) -> str:
    head = ["mixer", "n_layer", "n_embd", "heads", "head dim", "parameters", "deviation", "mixer args"]
    rows = []
    for m in matches:
        c = m.model_cfg
        per = m.per_mixer or {m.mixer: {"heads": m.heads, "kv_heads": m.kv_heads, "head_dim": m.head_dim}}
        heads = "/".join(f"{p['heads']}" + (f" (kv {p['kv_heads']})" if p["kv_heads"] is not None else "")
                         for p in per.values())
        head_dim = "/".join(str(p["head_dim"]) for p in per.values())  # a hybrid: one per mixer, in pattern order
        args = ", ".join(f"{k}={v}" for k, v in sorted(_flat(c.mixer_args))) or "-"
        if not m.kernel_ok:
            args += "  [no FLA kernel]"
        rows.append([m.mixer, str(c.n_layer), str(c.n_embd), heads, head_dim, f"{m.n_params:,}",
                     f"{m.deviation:+.2%}", args])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {1, 2, 4, 5, 6}
    fmt = lambda r: "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(line.rstrip() for line in lines)


def _flat(args: dict, prefix: str = "") -> list[tuple[str, object]]:
    """A hybrid's per-mixer sub-tables as "mixer.arg" keys; a plain mixer's args as they are."""
    out = []
    for k, v in args.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out
