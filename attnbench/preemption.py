"""Preemption: SIGTERM (a scheduler stopping the job) and SIGUSR1 (Slurm's warning before a time limit,
`#SBATCH --signal=USR1@120`) ask a training run to stop at the next step boundary.

The signal only sets a flag, so a step or a checkpoint write in progress finishes; the trainer then
writes a checkpoint, logs the steps since its last metrics row and raises Preempted. The command exits
with EXIT_PREEMPTED, and `--resume` continues from that checkpoint exactly as after a scheduled one.
"""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Iterator

# EX_TEMPFAIL of sysexits.h ("try again later"): not a failure; the run resumes from its checkpoint.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; `--resume` continues it."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "its checkpoint"
        super().__init__(f"stopped by {signame} after step {step}; {where} holds the run: continue it with --resume "
                         f"(exit status {EXIT_PREEMPTED})")


class StopRequest:
    """Set by SIGTERM / SIGUSR1 while `stop_requests()` is active; read at step boundaries."""

    def __init__(self) -> None:
        self.signame: str | None = None

    def __bool__(self) -> bool:
        return self.signame is not None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Handle SIGTERM and SIGUSR1 by recording them (the previous handlers come back on exit). Outside the
    main thread signals cannot be handled: the request then never becomes true."""
    req = StopRequest()

    def handler(signum: int, frame: object) -> None:
        req.signame = signal.Signals(signum).name

    prev = {}
    try:
        for sig in SIGNALS:
            prev[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield req
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)
