"""The local launcher: each run a child process on this machine's device slots (attnbench/sweep/processes.py)."""
from __future__ import annotations

from pathlib import Path

from ..manifest import _Manifest
from ..plan import PlannedRun
from ..processes import Slot, _train_all, _training_env, child_command
from ..spec import Sweep
from .base import Launcher


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, sweep: Sweep, slots: list[Slot]):
        self.sweep, self.slots = sweep, slots

    def describe(self) -> str:
        return f"local on {', '.join(self.devices())}"

    def devices(self) -> list[str]:
        return sorted({s.device for s in self.slots})

    def dry_run(self, out: Path, todo: list[PlannedRun]) -> list[str]:
        return [" ".join(child_command(out / "runs" / r.run_id, self.slots[0].nproc)) for r in todo]

    def train(self, sweep: Sweep, out: Path, todo: list[PlannedRun], man: _Manifest, status_interval: float,
              n_done: int, n_total: int) -> list[str]:
        with _training_env(sweep, out, self.slots, man, bool(todo)):
            return _train_all(sweep, out, todo, self.slots, man, status_interval, n_done, n_total)
