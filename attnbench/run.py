"""`attnbench run [--preset bakeoff|bakeoff-quick|lengthgen|lengthgen-quick|recall|recall-full|recall-quick|bakeoff-all]`: the main job in one command.

1. prepares shakespeare_char in --data_dir when it is missing (from --input, $ATTNBENCH_DATA, an
   earlier download or the network);
2. picks the preset for the hardware unless --preset is given: a CUDA GPU -> `bakeoff` (five mixers
   at ~10.7M parameters, 3000 iterations), otherwise `bakeoff-quick` (the same comparison scaled down
   for a CPU; minutes, not hours); `bakeoff-all` (every mixer and two hybrids, GPU) is chosen by name;
3. runs the sweep (attnbench/configs/sweeps/<preset>.toml: training, benchmarks, evaluation at longer
   lengths when the preset has an [eval] table, report) into --out (default out/<preset>), printing where
   it is; re-running the command continues where it stopped; `lengthgen` trains at 256 tokens and
   evaluates to 64x that (docs/length-generalisation.md);
4. prints the bake-off table and the report's path.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import CONFIGS_DIR
from .data import ensure_prepared, prepare_shakespeare_char
from .data.prepare import ENV_VAR
from .errors import AttnbenchError, did_you_mean
from .report import bakeoff_section, lengthgen_table
from .sweep import add_launch_options, launcher_options, load_sweep, run_sweep
from .sweep.grid import task_kinds

PRESETS = ("bakeoff", "bakeoff-quick", "bakeoff-all", "lengthgen", "lengthgen-quick", "recall", "recall-full",
           "recall-quick")  # recall*: docs/recall.md; bakeoff-all: docs/hybrids.md


def preset_path(name: str) -> Path:
    """The preset's sweep file, attnbench/configs/sweeps/<name>.toml."""
    if name not in PRESETS:
        raise AttnbenchError(f"--preset {name!r} is not a preset (presets: {', '.join(PRESETS)})"
                             f"{did_you_mean(name, PRESETS)}")
    return CONFIGS_DIR / "sweeps" / f"{name}.toml"


def default_preset() -> str:
    return "bakeoff" if torch.cuda.is_available() else "bakeoff-quick"


def run_main(preset: str | None = None, out: str | None = None, data_dir: str = "data", input_path: str | None = None,
             **launch: Any) -> tuple[Path, list[str]]:
    """Prepare the data, run the preset's sweep and report; returns report.md's path and the failed runs."""
    t0 = time.monotonic()
    preset = preset or default_preset()
    path = preset_path(preset)
    how = "given" if launch.pop("preset_given", True) else "picked for this machine"
    sweep = load_sweep(path)
    out = out or str(Path("out") / sweep.name)
    print(f"attnbench run: preset {preset!r} ({how}) from {sweep.path} -> {out}", flush=True)
    if "lm" not in task_kinds(sweep.base_config, sweep.overrides, sweep.grid, sweep.points):
        print(f"attnbench run: data: generated task examples in {data_dir}", flush=True)  # by the sweep's plan
    elif input_path is not None or os.environ.get(ENV_VAR):
        print(f"attnbench run: data: shakespeare_char in {data_dir}", flush=True)
        prepare_shakespeare_char(data_dir, input_path)  # idempotent: a folder from the same source is kept
    else:
        print(f"attnbench run: data: shakespeare_char in {data_dir}", flush=True)
        ensure_prepared(data_dir, "shakespeare_char")  # a prepared folder is used as is; else download
    man = run_sweep(sweep, out=out, data_dir=data_dir, **launch)
    report = Path(out) / man.get("report", "report/report.md")
    table = bakeoff_section(report) if report.is_file() else ""
    print()
    if table:
        print(table)
        print()
    lengths = lengthgen_table(report) if report.is_file() else ""
    if lengths:
        print("Length generalisation (loss at multiples of the training length):")
        print(lengths)
        print()
    failed = [k for k, v in man["runs"].items() if v["status"] == "failed"]
    if failed:
        print(f"attnbench run: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {Path(out) / 'logs'})")
    print(f"attnbench run: finished in {time.monotonic() - t0:.0f} s; report: {report}", flush=True)
    return report, failed


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="the main job: prepare data, train every mixer, benchmark, report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None,
                   help="bakeoff (GPU: five mixers at ~10.7M parameters, 3000 iterations) or bakeoff-quick (the "
                        "same on a CPU, scaled down); lengthgen (GPU: the mixers trained at 256 tokens, evaluated "
                        "to 64x that) or lengthgen-quick (its CPU version); default: bakeoff with CUDA, else "
                        "bakeoff-quick")
    p.add_argument("--out", default=None, help="results folder (default: out/<preset>)")
    p.add_argument("--input", default=None, help="local tiny Shakespeare input.txt (else $ATTNBENCH_DATA, else download)")
    add_launch_options(p)
    p.set_defaults(data_dir="data")
    p.add_argument("--no_bench", action="store_true", help="skip the benchmarks")
    p.add_argument("--status_interval", type=float, default=30.0, help="seconds between progress lines")

    def run(a: argparse.Namespace) -> int:
        report, failed = run_main(a.preset, a.out, a.data_dir or "data", a.input, preset_given=a.preset is not None,
                          devices=a.devices, jobs_per_device=a.jobs_per_device, nproc_per_node=a.nproc_per_node,
                          bench=not a.no_bench, status_interval=a.status_interval, overrides=a.overrides_set,
                          cuda_mps=a.cuda_mps, launcher=a.launcher, launcher_options=launcher_options(a),
                          mixers=a.mixers)
        return 0 if report.is_file() and not failed else 1

    p.set_defaults(func=run)
