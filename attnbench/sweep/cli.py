"""`attnbench sweep FILE` on the command line, and the launch options `attnbench run` shares."""
from __future__ import annotations

import argparse
from typing import Any

from . import spec
from .execute import run_sweep


def add_launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default=None, help="'auto' (every visible GPU, else the CPU), 'cpu', or GPU indices "
                                                    "such as 0,1: one run per GPU at a time (default: the sweep file's, else auto)")
    p.add_argument("--jobs_per_device", type=int, default=None,
                   help="runs sharing one device at a time (small models; speed numbers then come from the benchmarks)")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="run each training under torchrun with this many processes (GPUs) per run")
    p.add_argument("--data_dir", default=None, help="folder of prepared datasets (default: the configs' data.data_dir)")
    p.add_argument("--cuda_mps", action=argparse.BooleanOptionalAction, default=None,
                   help="runs sharing a GPU train under a private CUDA MPS daemon (default: the sweep file's "
                        "cuda_mps, else off)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides_set",
                   help="a RunConfig setting for every run, after the sweep file's [overrides] "
                        "(e.g. --set train.compile=false); repeatable")


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="train every run of a sweep file, then benchmark and report (resumable)",
                              description=spec.__doc__ + "\nRe-run the same command to continue an "
                              "interrupted sweep (attnbench/sweep/__init__.py says the rest).",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="sweep TOML, a path or a bundled one, e.g. sweeps/bakeoff-quick")
    p.add_argument("--out", default=None, help="results folder (default: out/<sweep name>)")
    add_launch_options(p)
    p.add_argument("--no_bench", action="store_true", help="skip the benchmarks")
    p.add_argument("--no_report", action="store_true", help="skip the report")
    p.add_argument("--dry_run", action="store_true", help="resolve and write the plan, print the commands, train nothing")
    p.add_argument("--status_interval", type=float, default=30.0, help="seconds between progress lines")

    def run(a: argparse.Namespace) -> int:
        man = run_sweep(a.config, out=a.out, devices=a.devices, jobs_per_device=a.jobs_per_device,
                        nproc_per_node=a.nproc_per_node, data_dir=a.data_dir, bench=not a.no_bench,
                        report=not a.no_report, dry_run=a.dry_run, status_interval=a.status_interval,
                        overrides=a.overrides_set, cuda_mps=a.cuda_mps)
        bad = [k for k, v in man["runs"].items() if v["status"] == "failed"]
        return 1 if bad else 0

    p.set_defaults(func=run)
