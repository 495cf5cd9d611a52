"""The launcher interface, the launcher names, and the exit statuses of an interrupted run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import AttnbenchError, did_you_mean
from ...preemption import EXIT_PREEMPTED
from ..manifest import _Manifest
from ..plan import PlannedRun
from ..spec import Sweep

LAUNCHERS = ("local", "slurm")
# The exits of an interrupted training child (not failed: the run resumes from its checkpoint):
# EXIT_PREEMPTED (SIGTERM or SIGUSR1 reached it, and it wrote a checkpoint first), and 130 for one
# stopped by SIGINT at a step boundary (attnbench/sweep/__main__.py)
INTERRUPTED_EXITS = (EXIT_PREEMPTED, 130)


class Launcher:
    """How a sweep trains its runs. `run_sweep` calls check() before writing anything, in_flight() before
    deciding what to train, then train() with the runs left to do."""

    name = "?"
    prestarts_bench = True  # the bench phase may start a child while the runs train (on this machine)

    def check(self, sweep: Sweep, runs: list[PlannedRun], out: Path) -> None:
        """Raise AttnbenchError for anything that would fail later (before any file is written)."""

    def in_flight(self, man: _Manifest, runs: list[PlannedRun]) -> dict[str, str]:
        """Runs an earlier sweep started that are still training elsewhere: {run id: what, e.g. 'Slurm job 12'}.
        The sweep neither clears nor starts them again; train() watches them."""
        return {}

    def describe(self) -> str:
        return self.name

    def devices(self) -> list[str]:
        """The kinds of device the runs train on ('cpu', 'cuda:0', 'cuda'), for the checks before a sweep."""
        return ["cpu"]

    def dry_run(self, out: Path, todo: list[PlannedRun]) -> list[str]:
        """The lines `--dry_run` prints: what would be launched."""
        return []

    def train(self, sweep: Sweep, out: Path, todo: list[PlannedRun], man: _Manifest, status_interval: float,
              n_done: int, n_total: int) -> list[str]:
        """Train `todo` (resuming each from its checkpoint); returns the run ids that failed."""
        raise NotImplementedError


def launcher_name(name: str | None, sweep: Sweep) -> str:
    """--launcher, else the sweep file's [launcher] type, else local."""
    chosen = name or sweep.launcher.get("type") or "local"
    if chosen not in LAUNCHERS:
        where = "--launcher" if name else f"{sweep.path}: launcher.type"
        raise AttnbenchError(f"{where} {chosen!r} is not a launcher (launchers: {', '.join(LAUNCHERS)})"
                             f"{did_you_mean(str(chosen), LAUNCHERS)}")
    return chosen


def check_cli_options(name: str, cli_options: dict[str, Any]) -> None:
    """Slurm's options on the command line make sense only with --launcher slurm."""
    given = [k for k, v in cli_options.items() if v not in (None, [], {})]
    if name != "slurm" and given:
        raise AttnbenchError(f"--{given[0]} is an option of --launcher slurm (the launcher here is {name!r}); "
                             "add --launcher slurm or drop it")
