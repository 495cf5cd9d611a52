"""Sweeps: many training runs from one TOML file, then the benchmarks, then the report (`attnbench sweep`).

One module per job, in the order a sweep uses them:

    spec.py         the sweep file: its keys, `load_sweep` and validation
    plan.py         one resolved RunConfig per (mixer, learning rate, seed), shapes, run ids (`plan`)
    manifest.py     what is on disk: sweep.json, run.json, the folder lock, each run's state
    processes.py    device slots, the training children, signals, the training loop
    __main__.py     the child: `python -m attnbench.sweep RUN_DIR` trains one planned run
    bench_phase.py  the benchmarks after training, one `attnbench bench` child per mixer
    launchers/      where the runs train: `local` (processes.py) or `slurm` (a Slurm job per run, submitit)
    eval_phase.py   the [eval] table: every finished run at longer lengths (attnbench/evaluate/)
    execute.py      `run_sweep`: all of the above, then `attnbench.report.build_report`
    cli.py          `attnbench sweep FILE` and the launch options `attnbench run` shares

A sweep resumes: re-running the same command skips the runs that are done, resumes those with a
checkpoint and starts the rest (manifest.py); after training each mixer is benchmarked alone on its
device (bench_phase.py) and `<out>/report/report.md` is written with its figures.
"""
from .bench_phase import bench_command, bench_tasks, check_bench_options, prestarts_bench
from .cli import add_launch_options, launcher_options, register_cli
from .execute import run_sweep
from .launchers import LAUNCHERS, make_launcher
from .manifest import read_summary, run_state
from .plan import ID_EXCLUDE, PlannedRun, plan, run_id_for
from .processes import Slot, child_command, make_slots, resolve_devices, wants_mps
from .spec import BENCHES, SWEEP_KEYS, BenchSpec, EvalSpec, Sweep, add_overrides, expand_mixers, load_sweep, set_mixers

__all__ = ["BENCHES", "ID_EXCLUDE", "LAUNCHERS", "SWEEP_KEYS", "BenchSpec", "EvalSpec", "PlannedRun", "Slot",
           "Sweep", "add_launch_options", "add_overrides", "bench_command", "bench_tasks", "check_bench_options",
           "child_command", "expand_mixers", "launcher_options", "load_sweep", "make_launcher", "make_slots", "plan",
           "prestarts_bench", "read_summary", "register_cli", "resolve_devices", "run_id_for", "run_state",
           "run_sweep", "set_mixers", "wants_mps"]
