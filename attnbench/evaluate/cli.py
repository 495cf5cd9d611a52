"""`attnbench eval RUN_DIR|SWEEP_DIR`: a trained run (or every finished run of a sweep) at many lengths."""
from __future__ import annotations

import argparse
from typing import Any

from .run import DEFAULT_BATCH_TOKENS, evaluate_path
from .windows import parse_lengths

DEFAULT_LENGTHS = "256,1024,4096,16384"


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate trained runs at many lengths: loss per position (length generalisation)",
        description="Evaluate a run's checkpoint on the validation split in non-overlapping windows of each length "
                    "(as many as the split holds; the same windows for every model): per-position losses in "
                    "power-of-two buckets and the mean loss per length, written to RUN/eval/lengthgen.jsonl with "
                    "a plot, eval/lengthgen.png. Lengths past block_size are 'not defined' for learned position "
                    "embeddings; a window that does not fit in GPU memory gives an 'out_of_memory' row. A recall "
                    "(MQAR) run is tested on MQAR sequences of each length with proportionally more key-value "
                    "pairs instead (accuracy against length). docs/length-generalisation.md explains the method.")
    p.add_argument("dir", help="a run folder (attnbench train --out_dir) or a sweep folder (its --out): every "
                               "finished run is evaluated")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"window lengths in tokens (default {DEFAULT_LENGTHS})")
    p.add_argument("--checkpoint", default="best", help="best (the best validation loss, ckpt/best.json; default) "
                                                        "or latest (the newest intact checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    p.add_argument("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"tokens per forward batch (windows per batch = this // length, at least 1; halved on CUDA "
                        f"out-of-memory; default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--data_dir", default=None, help="folder of prepared datasets (default: each run's data.data_dir)")

    def run(a: argparse.Namespace) -> int:
        done = evaluate_path(a.dir, parse_lengths(a.lengths), a.checkpoint, a.device, a.batch_tokens, a.data_dir)
        rows = [r for rs in done.values() for r in rs]
        print(f"eval: {len(rows)} rows in {len(done)} run folder(s), eval/lengthgen.jsonl and eval/lengthgen.png; "
              f"`attnbench report {a.dir}` adds the length-generalisation section to a sweep's report")
        return 0

    p.set_defaults(func=run)
