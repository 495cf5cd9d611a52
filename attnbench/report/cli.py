"""`attnbench report DIR [--out FOLDER]`: writes the report and prints its bake-off table."""
from __future__ import annotations

import argparse
from typing import Any

from .markdown import bakeoff_section, build_report


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="report.md + PNG figures from a results folder",
                              description="Write report.md and PNG figures from a sweep's results folder "
                                          "(runs/ and bench/), from the files on disk alone.")
    p.add_argument("dir", help="results folder (a sweep's --out), a folder of run folders, or one run folder")
    p.add_argument("--out", default=None, help="where to write report.md and the figures (default: DIR/report)")

    def run(a: argparse.Namespace) -> int:
        path = build_report(a.dir, a.out)
        print(bakeoff_section(path))
        print(f"report: {path}")
        return 0

    p.set_defaults(func=run)
