"""Launchers: where a sweep's training runs execute. `run_sweep` picks one by name (`--launcher`).

    base.py         the interface (`Launcher`), and the exit statuses of an interrupted run
    local.py        `local` (the default): child processes on this machine's devices (processes.py)
    slurm.py        `slurm`: one Slurm job per run through submitit (an optional extra,
                    `pip install -e ".[slurm]"`), watched until the jobs end
    slurm_options.py  the [launcher] table and --partition/--time/... options, checked before submitting
    slurm_job.py    what runs inside a Slurm job: the same child command the local launcher starts

Every launcher trains the same child, `python -m attnbench.sweep RUN_DIR` (resuming from the run's
checkpoint), appends to the same log file `<out>/logs/<run-id>.log`, and records each run's status in
the same manifest (`<out>/sweep.json`), so the sweep folder alone says where a sweep stands.
"""
from __future__ import annotations

from typing import Any

from ..processes import make_slots, resolve_devices
from ..spec import Sweep
from .base import INTERRUPTED_EXITS, LAUNCHERS, Launcher, check_cli_options, launcher_name
from .local import LocalLauncher
from .slurm import SlurmLauncher
from .slurm_options import SlurmOptions, parse_options


def make_launcher(name: str | None, sweep: Sweep, devices: str | None, jobs_per_device: int, nproc: int,
                  cli_options: dict[str, Any] | None = None) -> tuple[Launcher, list]:
    """The launcher (by --launcher, else the sweep file's [launcher] type, else local) and the slots the
    benchmarks run on, after training, on this machine."""
    name = launcher_name(name, sweep)
    cli_options = cli_options or {}
    check_cli_options(name, cli_options)
    devs = resolve_devices(devices or sweep.devices)
    if name == "local":
        slots = make_slots(devs, jobs_per_device, nproc)
        return LocalLauncher(sweep, slots), slots
    # GPUs per job by default, unless the sweep asks for the CPU (a login node without GPUs picks 'auto' -> cpu)
    cpu = str(devices or sweep.devices).strip() == "cpu"
    opts = parse_options(sweep.launcher, cli_options, sweep.path, nproc=nproc, cpu=cpu)
    return SlurmLauncher(opts, nproc), make_slots(devs, 1, 1)


__all__ = ["INTERRUPTED_EXITS", "LAUNCHERS", "Launcher", "LocalLauncher", "SlurmLauncher",
           "SlurmOptions", "make_launcher", "parse_options"]
