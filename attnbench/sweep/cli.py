"""`attnbench sweep FILE` on the command line, and the launch options `attnbench run` shares."""
from __future__ import annotations

import argparse
from typing import Any

from . import spec
from .execute import run_sweep
from .launchers import LAUNCHERS

# the Slurm launcher's options, as run_sweep's launcher_options (attnbench/sweep/launchers/slurm_options.py)
SLURM_OPTIONS = ("partition", "time", "gpus_per_job", "cpus_per_job", "mem", "sbatch")


def add_launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mixers", action="append", default=[], metavar="NAMES",
                   help="mixers to train instead of the sweep's, comma-separated: registered names, layer patterns, "
                        "or 'all' (every registered mixer and the hybrids of attnbench.mixers.PATTERNS)")
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
    g = p.add_argument_group("Slurm", "with --launcher slurm (pip install -e \".[slurm]\"; docs/slurm.md); each "
                                      "overrides the sweep file's [launcher] key of the same name")
    g.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="local: child processes on this machine's devices; slurm: one Slurm job per run "
                        "(default: the sweep file's launcher.type, else local)")
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default one)")
    g.add_argument("--time", default=None, help="time limit per job, Slurm's format, e.g. 4:00:00 or 1-00:00:00 "
                                                "(default: the partition's)")
    g.add_argument("--gpus_per_job", type=int, default=None,
                   help="GPUs per job (default: --nproc_per_node, or 0 with --devices cpu)")
    g.add_argument("--cpus_per_job", type=int, default=None, help="CPUs per job (sbatch --cpus-per-task)")
    g.add_argument("--mem", default=None, help="memory per job, e.g. 32G (sbatch --mem)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="another sbatch option, e.g. --sbatch account=lab --sbatch qos=high; repeatable")


def launcher_options(a: argparse.Namespace) -> dict[str, Any]:
    """The Slurm options given on the command line (run_sweep's launcher_options)."""
    return {k: getattr(a, k) for k in SLURM_OPTIONS}


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
                        overrides=a.overrides_set, cuda_mps=a.cuda_mps, launcher=a.launcher,
                        launcher_options=launcher_options(a), mixers=a.mixers)
        bad = [k for k, v in man["runs"].items() if v["status"] in ("failed", "interrupted")]
        return 1 if bad else 0

    p.set_defaults(func=run)
