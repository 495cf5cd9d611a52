"""The text table of matched shapes that `attnbench params` prints."""
from __future__ import annotations

from .count import Match


def format_table(matches: list[Match]) -> str:
    head = ["mixer", "n_layer", "n_embd", "heads", "head dim", "parameters", "deviation", "mixer args"]
    rows = []
    for m in matches:
        c = m.model_cfg
        heads = f"{m.heads}" + (f" (kv {m.kv_heads})" if m.kv_heads is not None else "")
        args = ", ".join(f"{k}={v}" for k, v in sorted(c.mixer_args.items())) or "-"
        if not m.kernel_ok:
            args += "  [no FLA kernel]"
        rows.append([m.mixer, str(c.n_layer), str(c.n_embd), heads, str(m.head_dim), f"{m.n_params:,}",
                     f"{m.deviation:+.2%}", args])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {1, 2, 4, 5, 6}
    fmt = lambda r: "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(line.rstrip() for line in lines)
