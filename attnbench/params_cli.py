"""`attnbench params`: every mixer's shape matched to a parameter budget, as a table or JSON, with
--flops also their forward FLOPs per token (attnbench.flops). A module of its own because it sits
above both attnbench.params and attnbench.flops, which imports params."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import flops
from .config import ModelConfig
from .files import atomic_write_text
from .params import REQUIRED_TOL, format_table, match_all, parse_budget


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params", help="match every mixer's shape to a parameter budget",
        description="Find, for each mixer, the GPT shape (width, heads, head dim) whose trainable parameter "
                    "count is closest to --budget, with n_layer fixed. Prints a table; --json writes rows "
                    "(to stdout, or to FILE; with --flops an object {matches, flops}); --flops adds per-token "
                    "forward FLOPs at the matched shapes, the decoding state sizes and the context length from "
                    "which each mixer is cheaper than softmax. Exit status 1 when a mixer misses the band.")
    p.add_argument("--budget", default="10.7M", help="parameters, e.g. 10.7M, 850k, 1.5e7 (default 10.7M)")
    p.add_argument("--mixers", default=None, help="comma-separated mixer names (default: all registered)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=65)
    p.add_argument("--pos_emb", default="learned", choices=["learned", "rope", "none"])
    p.add_argument("--tol", type=float, default=REQUIRED_TOL, help="band around the budget as a fraction (default 0.01)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="emit JSON rows instead of the table: to stdout, or to FILE")
    p.add_argument("--flops", action="store_true", help="also print per-token FLOPs and softmax crossovers")
    p.add_argument("--T", default="256,8192", help="context lengths for --flops (default 256,8192)")
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> int:
    base = ModelConfig(n_layer=a.n_layer, block_size=a.block_size, vocab_size=a.vocab_size, pos_emb=a.pos_emb)
    names = [n.strip() for n in a.mixers.split(",") if n.strip()] if a.mixers else None
    matches = match_all(a.budget, names, a.n_layer, base, tol=a.tol)
    Ts = tuple(int(float(t)) for t in a.T.split(",") if t.strip())
    table = flops.flops_table(matches, Ts) if a.flops else None
    if a.json is not None:
        out: Any = [m.to_row() for m in matches]
        if table is not None:
            out = {"matches": out, "flops": table}
        text = json.dumps(out, indent=2)
        if a.json == "-":
            print(text)
        else:
            atomic_write_text(a.json, text + "\n")
            print(f"wrote {a.json}", file=sys.stderr)
        return 0
    budget = parse_budget(a.budget)
    print(f"parameter budget {budget:,} (n_layer={a.n_layer}, block_size={a.block_size}, vocab_size={a.vocab_size}); "
          f"band {a.tol:.1%}")
    print(format_table(matches))
    bad = [m.mixer for m in matches if not m.within]
    if bad:
        print(f"outside {REQUIRED_TOL:.0%}: {', '.join(bad)}")
    if table is not None:
        print()
        print(flops.format_flops_table(table, matches))
    return 1 if bad else 0
