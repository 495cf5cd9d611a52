"""The Slurm launcher: each run one Slurm job, submitted through submitit, then watched until it ends.

submitit is an optional extra (`pip install -e ".[slurm]"`), imported inside the functions that submit,
so that the local launcher and every other command run without it.

The sweep folder is the single source of truth. `<out>/sweep.json` records each run's launcher and Slurm
job id (and run.json every submission), `<out>/slurm/` holds submitit's files (the job scripts, their
stdout/stderr, the pickles), and the run's own log is `<out>/logs/<run-id>.log` as with the local
launcher. Running `attnbench sweep` again: finished runs are skipped; a run whose job is still pending or
running (squeue) is watched, not submitted twice; a failed, cancelled or preempted one is submitted
again and resumes from its last checkpoint (attnbench/sweep/__main__.py). A job that ends by a time
limit or a preemption (not by `scancel`) is also submitted again by the sweep that watches it, up to
max_requeues times; before the time limit submitit requeues it itself (attnbench/sweep/launchers/slurm_job.py).
"""
from __future__ import annotations

import contextlib
import json
import pickle
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import AttnbenchError
from ..manifest import _clear_stale, _log_tail, _Manifest, _now, _tail_metrics, _write_run_file, read_summary, run_state
from ..plan import PlannedRun
from ..processes import IMPORT_ROOT, _say, child_command
from ..spec import Sweep
from .base import INTERRUPTED_EXITS, Launcher
from .slurm_job import TrainJob
from .slurm_options import (UNLIMITED_MIN, SlurmOptions, check_cluster, sbatch_flags, time_minutes,
                            warn_if_private)

# squeue's states of a job that is not over yet (its run must not be submitted again)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# job ends that are the cluster's doing, not the run's or the user's: the sweep submits the run again
CLUSTER_ENDS = {"PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
POLL_S = 1.0
# a job neither squeue nor sacct knows (sacct lags on some clusters) is taken as ended after this long
UNKNOWN_GRACE_S = 60.0


def _query(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_states(ids: list[str]) -> dict[str, str] | None:
    """{job id: Slurm state} from squeue (jobs the controller holds), then sacct for the others; None
    when squeue gets no answer from the controller (nothing can be concluded then)."""
    states: dict[str, str] = {}
    if not ids:
        return states
    q = _query(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)])
    # squeue fails on a single id it does not know: that is an answer ("not in the queue")
    if q is None or (q.returncode != 0 and "Invalid job id" not in q.stderr):
        return None
    for line in q.stdout.splitlines():
        jid, _, st = line.strip().partition("|")
        if jid in ids:
            states[jid] = st.strip().split()[0] if st.strip() else "UNKNOWN"
    missing = [i for i in ids if i not in states]
    if missing:
        a = _query(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)])
        for line in (a.stdout if a is not None else "").splitlines():
            jid, _, st = line.strip().partition("|")
            if jid in missing and st.strip():
                states[jid] = st.strip().split()[0]  # a real sacct writes "CANCELLED by UID"
    return states


@dataclass
class _Watched:
    run: PlannedRun
    job_id: str
    state: str
    since: float  # when this sweep submitted or found the job
    started: float | None = None  # when this sweep saw it running
    resubmits: int = 0  # submissions by this sweep after a time limit or preemption


class SlurmLauncher(Launcher):
    name = "slurm"
    prestarts_bench = False  # the benchmarks run on this machine after the jobs, not beside them

    def __init__(self, opts: SlurmOptions, nproc: int = 1):
        self.opts, self.nproc = opts, nproc
        self._live: dict[str, tuple[str, str]] = {}  # run id -> (job id, state) of jobs from an earlier sweep
        self.interrupted: list[str] = []

    def check(self, sweep: Sweep, runs: list[PlannedRun], out: Path) -> None:
        check_cluster(self.opts)
        warn_if_private(out)

    def describe(self) -> str:
        o = self.opts
        return (f"Slurm jobs on partition {o.partition}, time {o.time}, {o.gpus_per_job} GPU(s)"
                + (f", {o.cpus_per_job} CPUs" if o.cpus_per_job else "") + (f", mem {o.mem}" if o.mem else ""))

    def devices(self) -> list[str]:
        return ["cuda"] if self.opts.gpus_per_job else ["cpu"]

    def in_flight(self, man: _Manifest, runs: list[PlannedRun]) -> dict[str, str]:
        recs = {r.run_id: man.data["runs"][r.run_id] for r in runs}
        ids = {rid: str(rec["job_id"]) for rid, rec in recs.items()
               if rec.get("launcher") == "slurm" and rec.get("job_id")}
        states = job_states(sorted(set(ids.values())))
        if states is None:
            raise AttnbenchError("squeue gets no answer from the Slurm controller, so the sweep cannot tell which of "
                                 f"its jobs ({', '.join(sorted(set(ids.values())))}) still run; try again later")
        self._live = {rid: (jid, states[jid]) for rid, jid in ids.items() if states.get(jid) in ACTIVE}
        return {rid: f"Slurm job {jid} ({st.lower()})" for rid, (jid, st) in self._live.items()}

    def dry_run(self, out: Path, todo: list[PlannedRun]) -> list[str]:
        flags = " ".join(sbatch_flags(self.opts) + [""])  # dry runs skip the cluster: no default partition filled in
        return [f"sbatch {flags}--wrap {shlex.quote(' '.join(child_command(out / 'runs' / r.run_id, self.nproc)))}"
                for r in todo]

    def _executor(self, out: Path) -> Any:
        import submitit  # the optional extra; check() made sure it is installed

        o = self.opts
        minutes = time_minutes(o.time or "UNLIMITED")
        extra: dict[str, Any] = {"time": o.time or "UNLIMITED", "signal": f"USR1@{o.signal_delay_s}", **o.sbatch}
        if o.mem:
            extra["mem"] = o.mem
        # the job's Python imports this attnbench (by reference from the pickle) and catches USR1, the
        # signal Slurm sends signal_delay_s before the time limit (slurm_job.py says what follows)
        setup = list(o.setup) + ["export SUBMITIT_PREEMPT_SIGNAL=USR1",
                                 f"export PYTHONPATH={shlex.quote(str(IMPORT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        ex = submitit.SlurmExecutor(folder=out / "slurm", max_num_timeout=o.max_requeues)
        params: dict[str, Any] = {"partition": o.partition, "time": minutes or UNLIMITED_MIN, "setup": setup,
                                  "signal_delay_s": o.signal_delay_s, "additional_parameters": extra}
        if o.gpus_per_job:
            params["gpus_per_node"] = o.gpus_per_job
        if o.cpus_per_job:
            params["cpus_per_task"] = o.cpus_per_job
        ex.update_parameters(**params)
        return ex

    def _submit(self, ex: Any, sweep: Sweep, out: Path, r: PlannedRun, man: _Manifest, why: str = "") -> _Watched:
        import submitit  # the optional extra, for its exception types

        rd = out / "runs" / r.run_id
        state, step = run_state(rd)
        if state == "stale":
            _clear_stale(rd)
        log = out / "logs" / f"{r.run_id}.log"
        ex.update_parameters(job_name=f"{sweep.name}:{r.run_id}")
        try:
            job = ex.submit(TrainJob(str(rd), str(log), self.nproc, self.opts.cpus_per_job))
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
            raise AttnbenchError(f"sbatch refused the job of run {r.run_id}: {e}. Jobs submitted before it go on; run "
                                 "the sweep again to watch them and submit the rest") from None
        old = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads((rd / "run.json").read_text())
        _write_run_file(rd, r, sweep, old.get("launches", []) + [{
            "started": _now(), "launcher": "slurm", "job_id": job.job_id, "partition": self.opts.partition,
            "time": self.opts.time, "gpus_per_job": self.opts.gpus_per_job, "nproc_per_node": self.nproc,
            "resumed_from_step": step, "command": child_command(rd, self.nproc)}])
        attempts = man.data["runs"][r.run_id].get("attempts", 0) + 1
        man.set(r.run_id, status="submitted", launcher="slurm", job_id=job.job_id, partition=self.opts.partition,
                attempts=attempts)
        resume = f" (resume from step {step})" if step is not None else ""
        _say(f"submit {r.run_id} as Slurm job {job.job_id}{resume}{why}")
        return _Watched(r, job.job_id, "PENDING", time.monotonic())

    def train(self, sweep: Sweep, out: Path, todo: list[PlannedRun], man: _Manifest, status_interval: float,
              n_done: int, n_total: int) -> list[str]:
        ex = self._executor(out)
        watched: dict[str, _Watched] = {}
        failed: list[str] = []
        try:
            for r in todo:
                if r.run_id in self._live:
                    jid, st = self._live[r.run_id]
                    watched[r.run_id] = _Watched(r, jid, st, time.monotonic())
                    man.set(r.run_id, status="running" if st == "RUNNING" else "submitted")
                    _say(f"watch {r.run_id}: Slurm job {jid} ({st.lower()}), submitted by an earlier sweep")
                else:
                    watched[r.run_id] = self._submit(ex, sweep, out, r, man)
            last_status = time.monotonic()
            while watched:
                time.sleep(POLL_S)
                states = job_states(sorted({w.job_id for w in watched.values()}))
                if states is None:  # the controller does not answer: wait (the jobs may well be running)
                    if time.monotonic() - last_status >= status_interval:
                        last_status = time.monotonic()
                        _say("squeue gets no answer from the Slurm controller; waiting")
                    continue
                for rid, w in list(watched.items()):
                    st = states.get(w.job_id)
                    if st is None and time.monotonic() - w.since < UNKNOWN_GRACE_S:
                        continue
                    if st in ACTIVE:
                        if st == "RUNNING" and w.state != "RUNNING":
                            w.started = w.started or time.monotonic()
                            man.set(rid, status="running")
                            _say(f"start {rid}: Slurm job {w.job_id} running")
                        w.state = st
                        continue
                    del watched[rid]
                    n_done += self._ended(ex, sweep, out, w, st or "UNKNOWN", man, watched, failed, n_done, n_total)
                if watched and time.monotonic() - last_status >= status_interval:
                    last_status = time.monotonic()
                    _say(_status_line(out, watched, n_done, n_total))
        except KeyboardInterrupt:
            ids = sorted({w.job_id for w in watched.values()}, key=lambda j: (len(j), j))
            if ids:
                _say(f"stopped watching; {len(ids)} Slurm job(s) keep running ({', '.join(ids)}). Run the same command "
                     f"again to watch them (none is submitted twice), or cancel them: scancel {' '.join(ids)}")
            raise
        if self.interrupted:
            _say(f"{len(self.interrupted)} run(s) interrupted: {', '.join(self.interrupted)}; run the sweep again to "
                 "resume them from their checkpoints")
        return failed

    def _ended(self, ex: Any, sweep: Sweep, out: Path, w: _Watched, state: str, man: _Manifest,
               watched: dict[str, _Watched], failed: list[str], n_done: int, n_total: int) -> int:
        """A job is over: record its run as done, interrupted (resubmitted where the cluster ended it) or
        failed. Returns 1 for a run done."""
        rid, rd = w.run.run_id, out / "runs" / w.run.run_id
        rc, error = _job_result(out / "slurm", w.job_id)
        s = read_summary(rd)
        log = out / "logs" / f"{rid}.log"
        if s is not None and rc in (0, None):
            man.set(rid, status="done", returncode=0, slurm_state=state)
            _say(f"[{n_done + 1}/{n_total}] done {rid}: best val loss {s.get('best_val_loss', float('nan')):.4f}, "
                 f"final {s['final_val_loss']:.4f} (Slurm job {w.job_id}"
                 + (f", {time.monotonic() - w.started:.0f} s)" if w.started else ")"))
            return 1
        if rc in INTERRUPTED_EXITS or state in CLUSTER_ENDS or state == "CANCELLED":
            step = run_state(rd)[1]
            at = f" at checkpoint step {step}" if step is not None else " before its first checkpoint"
            if state != "CANCELLED" and w.resubmits < self.opts.max_requeues:
                nw = self._submit(ex, sweep, out, w.run, man, why=f" after Slurm job {w.job_id} ended {state}{at}")
                nw.resubmits = w.resubmits + 1
                watched[rid] = nw
                return 0
            man.set(rid, status="interrupted", returncode=rc, slurm_state=state)
            self.interrupted.append(rid)
            _say(f"interrupted {rid}: Slurm job {w.job_id} ended {state}{at}")
            return 0
        failed.append(rid)
        man.set(rid, status="failed", returncode=rc, slurm_state=state)
        msg = f"FAILED {rid} (Slurm job {w.job_id} {state}, exit code {rc}); last lines of {log}:\n{_log_tail(log)}"
        if error or rc is None:  # the job died outside the training child: submitit's own stderr says why
            err = out / "slurm" / f"{w.job_id}_0_log.err"
            msg += f"\n  last lines of {err}:\n{_log_tail(err)}"
        _say(msg)
        return 0


def _job_result(folder: Path, job_id: str) -> tuple[int | None, str]:
    """The job function's return value (the training child's exit status), or (None, error text) where
    the job ended without one (killed) or with an exception."""
    try:
        with open(folder / f"{job_id}_0_result.pkl", "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        return None, ""
    if outcome == "success" and isinstance(value, int):
        return value, ""
    return None, str(value)


def _status_line(out: Path, watched: dict[str, _Watched], n_done: int, n_total: int) -> str:
    running, queued = [], []
    for rid, w in watched.items():
        if w.state == "RUNNING":
            row = _tail_metrics(out / "runs" / rid / "metrics.jsonl")
            mi = w.run.config["train"]["max_iters"]
            loss = f" loss {row['loss']:.3f}" if "loss" in row else ""
            running.append(f"{rid} step {row.get('step', 0)}/{mi}{loss} (job {w.job_id})")
        else:
            queued.append(f"{rid} (job {w.job_id} {w.state.lower()})")
    return (f"{n_done}/{n_total} done" + ("; running: " + " | ".join(running) if running else "")
            + ("; queued: " + ", ".join(queued) if queued else ""))
