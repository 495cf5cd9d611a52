"""submitit against a real Slurm cluster (scripts/slurm_cluster.sh, one node on localhost): the behaviours
the Slurm launcher relies on, each pinned by a test.

- submit/result: a function runs in a batch job (`srun python -m submitit.core._submit` inside sbatch)
  and its return value comes back through the pickle in the executor's folder.
- arrays: map_array makes one array job; task ids are "<array id>_<index>", index from 0.
- scancel of a running job: Slurm sends SIGCONT then SIGTERM to the job's processes at once, and
  SIGKILL KillWait seconds later (5 s on the test cluster, 30 s by Slurm's default); the process runs,
  and can write files, in between. submitit's state becomes "CANCELLED" (a real sacct writes
  "CANCELLED by <uid>"), and job.result() raises submitit.core.utils.UncompletedJobError, whose message
  holds "has not produced any output (state: CANCELLED...)" and the job's stderr. result() and
  exception() of a job that ended without a result first wait 15 s for the pickle (submitit's
  Job._results_timeout_s, for slow shared filesystems): read job.state first.
- scancel --signal=SIG (without --batch): only SIG, to the job step's processes (the Python process
  under srun); the job goes on running and ends normally. slurmstepd still prints
  "*** STEP <id>.0 ON <node> CANCELLED AT ... ***" to the job's stderr, which means nothing here.
- scancel --batch --signal=TERM: the signal goes to the batch shell only, not to Python; the shell dies
  of it, so the job ends "FAILED" (ExitCode 0:15), and Slurm then ends the step as in a cancel (SIGCONT,
  SIGTERM, SIGKILL after KillWait). result() raises UncompletedJobError "(state: FAILED)".
- submitit's own handlers, installed before the function runs: SIGTERM and SIGCONT are logged and
  ignored ("Bypassing signal SIGTERM"); SIGUSR2 (sbatch --signal=USR2@<signal_delay_s>, 90 s before the
  time limit; also what preemption sends after SIGTERM) checkpoints a submitit.helpers.Checkpointable
  and runs `scontrol requeue`. The requeued job waits cred_expire seconds (5 s here, 120 s by Slurm's
  default) before it starts again, from the checkpoint, with SLURM_RESTART_COUNT=1. A function that
  installs its own handler replaces submitit's for that signal.
- submitit calls a USR2 "timed-out" (and spends one of its slurm_max_num_timeout requeues) unless the
  job ran under min(0.8 * timeout, timeout - 10 min): with timeout_min under about 50, every USR2 counts
  as a time-out. The tests ask for 60 min so that a USR2 reads as a preemption.
- a signal sent to the step reaches every process in it, children included, and not necessarily in the
  order scancel sent them: a SIGTERM that arrives after the USR2 kills the `scontrol requeue` submitit's
  handler runs, and the job fails (CalledProcessError ... died with SIGTERM) instead of requeueing.
- job ids restart at 1 whenever the test cluster starts afresh, so an executor folder must not outlive
  the cluster (submitit names its files by job id).

The job functions below travel by value (cloudpickle), since a job's Python cannot import this test
module by name.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[slurm]')")
import cloudpickle  # noqa: E402  (a dependency of submitit)

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the session fixture)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

UncompletedJobError = submitit.core.utils.UncompletedJobError


# --- functions that run inside the jobs ------------------------------------------------------------

def _job_facts(x):
    return x * 2, os.environ["SLURM_JOB_ID"], os.environ["SLURM_JOB_PARTITION"], os.getpid()


def _square(x):
    return x * x, int(os.environ["SLURM_ARRAY_TASK_ID"])


def _record_signals(folder):
    """Installs handlers that append "<SIGNAME> <time>" to folder/signals, replacing submitit's."""
    def record(signum, frame):
        with open(Path(folder) / "signals", "a") as f:
            f.write(f"{signal.Signals(signum).name} {time.time():.3f}\n")
    for sig in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, record)
    (Path(folder) / "started").write_text(str(os.getpid()))


def _tick_until_killed(folder, seconds):
    """Records signals and rewrites folder/tick with the time every 50 ms: the last tick is the kill."""
    _record_signals(folder)
    end = time.time() + seconds
    while time.time() < end:
        (Path(folder) / "tick.tmp").write_text(f"{time.time():.3f}")
        os.replace(Path(folder) / "tick.tmp", Path(folder) / "tick")
        time.sleep(0.05)
    return "ran to the end"


def _wait_for_signals(folder, wanted, seconds):
    """Records signals until all of `wanted` arrived; returns their names in arrival order."""
    _record_signals(folder)
    end = time.time() + seconds
    while time.time() < end:
        got = _signal_names(folder)
        if set(wanted) <= set(got):
            return [name for name in got if name in wanted]
        time.sleep(0.05)
    return _signal_names(folder)


class _CountRuns(submitit.helpers.Checkpointable):
    """Sleeps on its first run, returns at once on the next; checkpoint() (inherited) resubmits self."""

    def __init__(self, folder):
        self.folder = folder
        self.runs = 0

    def __call__(self, seconds):
        self.runs += 1
        with open(Path(self.folder) / "runs", "a") as f:
            f.write(f"{self.runs} restart_count={os.environ.get('SLURM_RESTART_COUNT', '')}\n")
        if self.runs == 1:
            time.sleep(seconds)
        return self.runs


# --- helpers ---------------------------------------------------------------------------------------

def _signal_names(folder):
    path = Path(folder) / "signals"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def _signal_times(folder, name):
    return [float(line.split()[1]) for line in (Path(folder) / "signals").read_text().splitlines()
            if line.split()[0] == name]


def _executor(cluster, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs")
    assert executor.cluster == "slurm"
    # 60 min: see the module docstring (a shorter timeout turns every USR2 into a time-out)
    executor.update_parameters(slurm_partition=cluster.partition, timeout_min=60, cpus_per_task=1,
                               mem_gb=1)
    return executor


def _wait_until(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _wait_done(job, timeout=30):
    # force_check: ask sacct on every poll instead of submitit's back-off
    try:
        _wait_until(lambda: job.done(force_check=True), timeout, f"job {job.job_id} to end")
    except AssertionError:
        raise AssertionError(f"job {job.job_id} did not end in {timeout} s; state {job.state}; "
                             f"stderr:\n{job.stderr()}") from None


def _sacct_state(job):
    return job.get_info(mode="force").get("State")


def _scancel(*args):
    subprocess.run(["scancel", *args], check=True, capture_output=True, text=True, timeout=10)


# --- tests -----------------------------------------------------------------------------------------

def test_submitted_function_runs_in_a_slurm_job(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(_job_facts, 21)
    _wait_done(job)
    doubled, job_id, partition, pid = job.result()
    assert (doubled, job_id, partition) == (42, job.job_id, slurm_cluster.partition)
    assert pid != os.getpid()
    # the result pickle appears before Slurm has finished the job; sacct then says COMPLETED
    _wait_until(lambda: _sacct_state(job) == "COMPLETED", 15, "sacct to say COMPLETED")


def test_job_array_of_three(slurm_cluster, tmp_path):
    jobs = _executor(slurm_cluster, tmp_path).map_array(_square, [1, 2, 3])
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(3)]
    for job in jobs:
        _wait_done(job)
    assert [job.result() for job in jobs] == [(1, 0), (4, 1), (9, 2)]
    _wait_until(lambda: {_sacct_state(job) for job in jobs} == {"COMPLETED"}, 15, "all COMPLETED")


def test_scancel_sends_sigterm_then_sigkill_after_kill_wait(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(_tick_until_killed, str(tmp_path), 60)
    try:
        _wait_until(lambda: (tmp_path / "tick").exists(), 30, "the job to start")
        _scancel(job.job_id)
        _wait_done(job, timeout=slurm_cluster.kill_wait_s + 20)
        assert job.state == "CANCELLED"
        job._results_timeout_s = 0  # see the module docstring: else result() first waits 15 s
        with pytest.raises(UncompletedJobError, match=r"has not produced any output \(state: CANCELLED"):
            job.result()
        # sent in this order, but Python runs the handlers of signals pending together by number
        assert sorted(_signal_names(tmp_path)[:2]) == ["SIGCONT", "SIGTERM"]
        # between SIGTERM and SIGKILL the process kept running (and writing) for KillWait seconds
        ran_on = float((tmp_path / "tick").read_text()) - _signal_times(tmp_path, "SIGTERM")[0]
        assert slurm_cluster.kill_wait_s - 1.5 < ran_on < slurm_cluster.kill_wait_s + 3, ran_on
    finally:
        job.cancel(check=False)


def test_scancel_signal_reaches_python_and_the_job_goes_on(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(
        _wait_for_signals, str(tmp_path), ["SIGTERM", "SIGUSR1"], 60)
    try:
        _wait_until(lambda: (tmp_path / "started").exists(), 30, "the job to start")
        _scancel("--signal=TERM", job.job_id)
        _wait_until(lambda: "SIGTERM" in _signal_names(tmp_path), 10, "SIGTERM to arrive")
        _scancel("--signal=USR1", job.job_id)
        _wait_done(job)
        assert job.result() == ["SIGTERM", "SIGUSR1"]
        _wait_until(lambda: _sacct_state(job) == "COMPLETED", 15, "sacct to say COMPLETED")
    finally:
        job.cancel(check=False)


def test_scancel_batch_signal_ends_the_job_as_failed(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(_tick_until_killed, str(tmp_path), 60)
    try:
        _wait_until(lambda: (tmp_path / "tick").exists(), 30, "the job to start")
        _scancel("--batch", "--signal=TERM", job.job_id)
        _wait_done(job, timeout=slurm_cluster.kill_wait_s + 20)
        assert job.state == "FAILED"
        job._results_timeout_s = 0
        with pytest.raises(UncompletedJobError, match=r"\(state: FAILED"):
            job.result()
        # Python got no SIGTERM of its own from --batch: only the cleanup's SIGCONT, SIGTERM (and SIGKILL)
        assert sorted(_signal_names(tmp_path)[:2]) == ["SIGCONT", "SIGTERM"]
    finally:
        job.cancel(check=False)


def test_usr2_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path).submit(_CountRuns(str(tmp_path)), 60)
    try:
        _wait_until(lambda: (tmp_path / "runs").exists(), 30, "the first run to start")
        # what Slurm sends on preemption: SIGTERM (submitit ignores it), then the USR2 it asked for.
        # USR2 only once the SIGTERM has arrived: signals reach the step's processes asynchronously, and
        # a late SIGTERM kills the `scontrol requeue` that submitit's USR2 handler runs
        _scancel("--signal=TERM", job.job_id)
        _wait_until(lambda: "Bypassing signal SIGTERM" in (job.stderr() or ""), 10, "SIGTERM to arrive")
        _scancel("--signal=USR2", job.job_id)
        _wait_done(job, timeout=40)
        assert job.result() == 2
        assert (tmp_path / "runs").read_text().splitlines() == ["1 restart_count=", "2 restart_count=1"]
        assert "this job is preempted" in job.stderr()
    finally:
        job.cancel(check=False)
