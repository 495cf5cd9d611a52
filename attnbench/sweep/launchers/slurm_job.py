"""What a Slurm job of the sweep runs: `TrainJob(run_dir, ...)()` trains one run through the same child
command the local launcher starts (`python -m attnbench.sweep RUN_DIR`, under torchrun when the run
spans several GPUs), appending to the same log file, and returns the child's exit status.

Signals: Slurm sends a signal to every process of the job step, so the training child gets it directly;
on SIGTERM or SIGUSR1 it finishes its step, writes a checkpoint and exits with
attnbench.preemption.EXIT_PREEMPTED (75). Plain `scancel` (SIGTERM, SIGKILL KillWait seconds later): the
job ends CANCELLED, and the next `attnbench sweep` resubmits the run, which resumes from that checkpoint.
Before the time limit (`sbatch --signal=USR1@<signal_delay_s>`) and on a preemption that sends USR1:
submitit, which has this process catch the same signal (SUBMITIT_PREEMPT_SIGNAL=USR1, set by the job's
setup), calls `checkpoint()`, which waits for the child and hands submitit a fresh TrainJob; submitit
then requeues the job (`scontrol requeue`, the same job id), and the requeued job resumes the run.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from ..manifest import _clear_stale, _now, run_state
from ..processes import _child_env, _die_with_parent, _signal_group, child_command

# seconds checkpoint() waits for the training child to save and exit after the preemption signal
CHILD_GRACE_S = 90


class TrainJob:
    """The callable submitit pickles into the job (by reference: the job imports this module)."""

    def __init__(self, run_dir: str, log_path: str, nproc: int = 1, cpus: int | None = None):
        self.run_dir, self.log_path, self.nproc, self.cpus = run_dir, log_path, nproc, cpus
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None)

    def __call__(self) -> int:
        rd = Path(self.run_dir)
        state, _ = run_state(rd)
        if state == "done":  # finished by an earlier attempt that died before it could say so
            return 0
        if state == "stale":  # files of an attempt that died before its first checkpoint
            _clear_stale(rd)
        env: dict[str, str] = {}
        if self.cpus and "OMP_NUM_THREADS" not in os.environ:  # the job's CPUs, shared by its processes
            env["OMP_NUM_THREADS"] = str(max(1, self.cpus // self.nproc))
        cmd = child_command(rd, self.nproc)
        log = Path(self.log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n=== {_now()} {' '.join(cmd)} (Slurm job {os.environ.get('SLURM_JOB_ID', '?')} on "
                    f"{socket.gethostname()}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')})\n")
            f.flush()
            # its own session, as locally; Slurm's signals still reach it (they go to every process of the step)
            self._proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=_child_env(env), start_new_session=True, preexec_fn=_die_with_parent)
        while True:  # poll, not wait(): checkpoint() may wait for the child from a signal handler meanwhile
            rc = self._proc.poll()
            if rc is not None:
                return rc
            time.sleep(0.2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's preemption hook (runs in its signal handler): the child got the signal too and saves a
        checkpoint; wait for it, then requeue a fresh TrainJob, which resumes from that checkpoint."""
        import submitit  # the optional extra: present in a job submitit started

        p = self._proc
        if p is not None and p.poll() is None:
            deadline = time.monotonic() + CHILD_GRACE_S
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if p.poll() is None:  # it did not get the signal, or cannot stop: the last checkpoint stays
                _signal_group(p, signal.SIGTERM)
        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir, self.log_path, self.nproc, self.cpus))
