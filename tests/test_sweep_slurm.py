"""`attnbench sweep --launcher slurm`: the runs as Slurm jobs, on the real one-node cluster of
scripts/slurm_cluster.sh (tests/slurm_cluster.py), with the same losses as the local sweep; a cancelled
job resumed from its checkpoint by the next sweep; a running job watched, never submitted twice; a
failed job reported with its log's tail while the others go on. The errors before anything is
submitted are tested without a cluster (fake `sbatch` and `sinfo` on PATH).
"""
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attnbench import sweep as sw
from attnbench.cli import main
from attnbench.errors import AttnbenchError, ConfigError
from attnbench.files import read_jsonl
from attnbench.sweep.launchers import slurm_options
from attnbench.sweep.launchers.slurm import job_states
from conftest import tiny_run_config
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

ROOT = Path(__file__).resolve().parents[1]
ITERS, EVAL = 300, 20  # a checkpoint every 20 steps; the cancel comes after the first, ~280 steps before the end


def write_sweep(d: Path, data_dir: Path, extra: str = "", mixers: str = '["softmax"]') -> Path:
    import tomli_w

    d.mkdir(parents=True, exist_ok=True)
    (d / "base.toml").write_text(tomli_w.dumps(tiny_run_config(data_dir, d / "unused")))
    p = d / "sweep.toml"
    p.write_text(f"""
name = "tiny"
base_config = "base.toml"
mixers = {mixers}
learning_rates = [3e-3]
seeds = [1, 2]
[overrides]
"train.max_iters" = {ITERS}
"train.eval_interval" = {EVAL}
"optim.min_lr" = 3e-4
[bench]
enabled = false
{extra}""")
    return p


def sweep_cli(cfg: Path, out: Path, *args: str) -> subprocess.Popen:
    # one OpenMP thread everywhere (here, and in the jobs, which inherit this environment): equal losses;
    # no GPU visible, so that the run asking for CUDA fails on any machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "attnbench", "sweep", str(cfg), "--out", str(out), "--no_report",
                             "--devices", "cpu", "--status_interval", "5", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def ckpt_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "ckpt" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{proc.communicate()[0]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def state_of(job: str) -> str | None:
    return (job_states([job]) or {}).get(job)


def job_ids(out: Path) -> dict[str, str]:
    try:
        runs = json.loads((out / "sweep.json").read_text())["runs"]
    except (OSError, ValueError):
        return {}
    return {rid: v["job_id"] for rid, v in runs.items() if v.get("job_id")}


class LocalReference:
    """The local sweep of the two softmax runs, started once and waited for where a test needs it (it
    trains while the Slurm sweeps of the tests run)."""

    def __init__(self, d: Path, data_dir: Path):
        self.out = d / "out"
        self.proc = sweep_cli(write_sweep(d, data_dir), self.out, "--jobs_per_device", "2")
        self.log: str | None = None

    def run_dir(self, rid: str) -> Path:
        if self.log is None:
            self.log, _ = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, self.log
        return self.out / "runs" / rid


@pytest.fixture(scope="module")
def local_reference(tiny_data, tmp_path_factory):
    ref = LocalReference(tmp_path_factory.mktemp("local"), tiny_data)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def assert_same_as_local(run_dir: Path, ref_dir: Path) -> None:
    assert [s for s, _ in losses(run_dir)] == list(range(1, ITERS + 1))  # every step exactly once
    assert losses(run_dir) == losses(ref_dir)
    ref = json.loads((ref_dir / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert (got["best_val_loss"], got["final_val_loss"]) == (ref["best_val_loss"], ref["final_val_loss"])


# --- on the cluster --------------------------------------------------------------------------------

@pytest.mark.fault("slurm-job-cancelled", "slurm-job-fails", "slurm-sweep-stopped")
def test_slurm_sweep_resumes_cancelled_watches_running_reports_failed(slurm_cluster, local_reference, tiny_data,
                                                                     tmp_path):
    """Sweep A submits four jobs: two softmax runs, two that fail at start (train.device = "cuda", no GPU
    visible). Once run 1 has a checkpoint: its job is cancelled, run 2's job suspended (so that it is
    surely still running later), and sweep A stopped (Ctrl-C: the jobs stay). Sweep B then submits run 1
    again (it resumes from its checkpoint), watches run 2's job instead of submitting it twice, reports
    the failed runs with their logs' tails, and both softmax runs end with the losses of a local sweep."""
    cfg = write_sweep(tmp_path / "slurm", tiny_data, mixers='["softmax", "deltanet"]', extra="""
[mixer_overrides.deltanet]
"train.device" = "cuda"
""")
    out = tmp_path / "slurm" / "out"
    runs = [r.run_id for r in sw.plan(sw.load_sweep(cfg), out)]
    good, bad = runs[:2], runs[2:]
    assert all(r.startswith("softmax") for r in good) and all(r.startswith("deltanet") for r in bad)
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=10).stdout.split()
    if int(cpus[0]) < 2:
        pytest.skip(f"the test cluster's node has {cpus[0]} CPU; two jobs must run at once")
    a = sweep_cli(cfg, out, "--launcher", "slurm")
    try:
        wait_until(lambda: len(job_ids(out)) == 4, 120, "four jobs", a)
        jobs = job_ids(out)
        # run 2 is suspended as soon as it trains (its first metrics row): a tiny run could otherwise finish
        # before run 1's checkpoint, and a job suspended before its step starts loses srun's handshake
        wait_until(lambda: state_of(jobs[good[1]]) == "RUNNING" and losses(out / "runs" / good[1]), 120,
                   "run 2 to train", a)
        subprocess.run(["scontrol", "suspend", jobs[good[1]]], check=True, timeout=10)
        wait_until(lambda: ckpt_step(out / "runs" / good[0]) >= EVAL, 120, "run 1's first checkpoint", a)
        subprocess.run(["scancel", jobs[good[0]]], check=True, timeout=10)
        os.killpg(a.pid, signal.SIGINT)
        log_a, _ = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, log_a
    assert "warning: the sweep folder" in log_a and "private to this machine" in log_a  # tmp_path is in /tmp
    assert "stopped watching" in log_a and "scancel" in log_a
    assert not (out / "runs" / good[0] / "summary.json").exists(), "run 1 finished before its cancel"
    assert not (out / "runs" / good[1] / "summary.json").exists(), "run 2 finished before its suspension"
    wait_until(lambda: state_of(jobs[good[0]]) not in (None, *sw.launchers.slurm.ACTIVE), 30,
               "the cancelled job to end")

    b = sweep_cli(cfg, out, "--launcher", "slurm")
    lines = []
    watchdog = threading.Timer(240, b.kill)  # reading its output below would otherwise wait for ever
    watchdog.start()
    try:
        for line in b.stdout:  # run 2's job resumes once sweep B has found it
            lines.append(line)
            if f"watch {good[1]}: Slurm job {jobs[good[1]]} (suspended)" in line:
                subprocess.run(["scontrol", "resume", jobs[good[1]]], check=True, timeout=10)
        b.wait(timeout=180)
    finally:
        watchdog.cancel()
        if b.poll() is None:
            b.kill()
        subprocess.run(["scontrol", "resume", jobs[good[1]]], capture_output=True, timeout=10)
    log_b = "".join(lines)
    assert b.returncode == 1, log_b  # the failed runs
    assert f"watch {good[1]}: Slurm job {jobs[good[1]]} (suspended)" in log_b, log_b
    assert f"submit {good[0]} as Slurm job" in log_b and "(resume from step" in log_b
    for rid in bad:
        assert f"FAILED {rid}" in log_b
    assert log_b.count("no CUDA GPU is visible") >= 2  # the tail of each failed run's log

    man = json.loads((out / "sweep.json").read_text())
    assert [man["runs"][r]["status"] for r in runs] == ["done", "done", "failed", "failed"]
    assert all(man["runs"][r]["launcher"] == "slurm" for r in runs)
    launches = {r: json.loads((out / "runs" / r / "run.json").read_text())["launches"] for r in good}
    assert len(launches[good[1]]) == 1  # watched, not submitted again
    assert len(launches[good[0]]) == 2 and launches[good[0]][1]["resumed_from_step"] >= EVAL
    assert "stopped by SIGTERM" in (out / "logs" / f"{good[0]}.log").read_text()  # a checkpoint at the cancel
    assert launches[good[0]][1]["job_id"] == man["runs"][good[0]]["job_id"] != jobs[good[0]]
    for rid in good:
        assert_same_as_local(out / "runs" / rid, local_reference.run_dir(rid))


@pytest.mark.fault("slurm-job-usr1")
def test_preemption_signal_requeues_the_job_and_the_run_resumes(slurm_cluster, local_reference, tiny_data, tmp_path):
    """SIGUSR1, the signal Slurm sends signal_delay_s before the time limit (and a preemption may send):
    the training child stops (having saved a checkpoint where the trainer handles the signal, else at its
    last checkpoint), submitit requeues the job (same job id), and the requeued job resumes the run from
    its checkpoint to the local sweep's losses, while the sweep watches; nothing is submitted twice."""
    cfg = write_sweep(tmp_path, tiny_data)
    cfg.write_text(cfg.read_text().replace("seeds = [1, 2]", "seeds = [1]"))
    out = tmp_path / "out"
    [rid] = [r.run_id for r in sw.plan(sw.load_sweep(cfg), out)]
    p = sweep_cli(cfg, out, "--launcher", "slurm")
    try:
        wait_until(lambda: ckpt_step(out / "runs" / rid) >= EVAL, 120, "the run's first checkpoint", p)
        job = job_ids(out)[rid]
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=10)
        log, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, log
    run_log = (out / "logs" / f"{rid}.log").read_text()
    assert f"(Slurm job {job} on" in run_log and "restart 1)" in run_log, run_log  # the same job, requeued
    assert "stopped by SIGUSR1" in run_log  # the child wrote a checkpoint at the signal
    assert "this job is preempted" in (out / "slurm" / f"{job}_0_log.err").read_text()
    man = json.loads((out / "sweep.json").read_text())
    assert man["runs"][rid]["status"] == "done" and man["runs"][rid]["job_id"] == job
    assert len(json.loads((out / "runs" / rid / "run.json").read_text())["launches"]) == 1
    assert_same_as_local(out / "runs" / rid, local_reference.run_dir(rid))


# --- before anything is submitted (no cluster needed) --------------------------------------------

def fake_slurm(bin_dir: Path, partitions: str = "debug*\ngpu", test_only_error: str = "") -> None:
    """`sinfo -h -o %P` listing `partitions`, and an `sbatch --test-only` that refuses with test_only_error."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "sinfo": f"#!/bin/sh\nprintf '%s\\n' {' '.join(repr(p) for p in partitions.split())}\n",
        "scontrol": "#!/bin/sh\necho 'PartitionName=debug DefaultTime=NONE MaxTime=1-00:00:00'\n",
        "sbatch": ("#!/bin/sh\n" + (f"echo 'sbatch: error: {test_only_error}' >&2\nexit 1\n" if test_only_error
                                    else "echo 'sbatch: Job 1 to start at now'\n")),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)


@pytest.fixture
def tiny_sweep(tiny_data, tmp_path):
    return write_sweep(tmp_path / "sw", tiny_data)


def test_no_sbatch_says_install_slurm_or_use_local(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AttnbenchError, match=r"`sbatch` is not on PATH.*--launcher local"):
        sw.run_sweep(tiny_sweep, out=tmp_path / "out", devices="cpu", launcher="slurm")
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_no_submitit_says_pip_install_the_extra(tiny_sweep, tmp_path, monkeypatch):
    fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(AttnbenchError, match=r'submitit.*pip install -e "\.\[slurm\]"'):
        sw.run_sweep(tiny_sweep, out=tmp_path / "out", devices="cpu", launcher="slurm")


def test_unknown_partition_lists_the_partitions(tiny_sweep, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake_slurm(tmp_path / "bin", partitions="debug*\ngpu-h100\ncpu")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(AttnbenchError, match=r"--partition 'gpu-h10': no such partition .*lists debug, gpu-h100, cpu"
                                             r".*did you mean 'gpu-h100'"):
        sw.run_sweep(tiny_sweep, out=tmp_path / "out", devices="cpu", launcher="slurm",
                     launcher_options={"partition": "gpu-h10"})
    assert not (tmp_path / "out").exists()


def test_options_slurm_refuses_are_reported_before_submitting(tiny_sweep, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    fake_slurm(tmp_path / "bin", test_only_error="Requested time limit is invalid (missing or exceeds some limit)")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(AttnbenchError, match=r"Slurm refuses the job options --partition=debug --time=30-00:00:00.*"
                                             r"Requested time limit is invalid"):
        sw.run_sweep(tiny_sweep, out=tmp_path / "out", devices="cpu", launcher="slurm",
                     launcher_options={"time": "30-00:00:00"})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-12", 2160),
                                            ("2-0:30", 2910), ("1-00:00:01", 1441), ("UNLIMITED", None)])
def test_slurm_time_formats(value, minutes):
    assert slurm_options.time_minutes(value) == minutes


@pytest.mark.parametrize("table, cli, match", [
    ({}, {"time": "4h"}, r"--time '4h' is not a Slurm time"),
    ({}, {"time": "0"}, r"must be positive"),
    ({"gpus_per_job": -1}, {}, r"launcher.gpus_per_job must be an integer >= 0"),
    ({}, {"cpus_per_job": 0}, r"--cpus_per_job must be an integer >= 1"),
    ({}, {"mem": "lots"}, r"--mem 'lots' is not a Slurm memory size"),
    ({}, {"sbatch": ["time=5"]}, r"sbatch option 'time': use --time instead"),
    ({}, {"sbatch": ["--output=x"]}, r"sbatch option 'output': the launcher sets it"),
    ({"partiton": "gpu"}, {}, r"unknown key launcher.partiton.*did you mean 'partition'"),
    ({"setup": [1]}, {}, r"launcher.setup must be a list of shell lines"),
])
def test_slurm_options_are_checked(table, cli, match):
    with pytest.raises(ConfigError, match=match):
        slurm_options.parse_options(table, cli, "sweep.toml")


def test_slurm_options_table_then_command_line():
    o = slurm_options.parse_options({"partition": "a", "mem": "8G", "sbatch": {"account": "lab"}},
                                    {"partition": "b", "sbatch": ["qos=high", "exclusive"]}, "s.toml", nproc=2)
    assert (o.partition, o.mem, o.gpus_per_job) == ("b", "8G", 2)  # GPUs default to nproc_per_node
    assert o.sbatch == {"account": "lab", "qos": "high", "exclusive": True}
    assert slurm_options.sbatch_flags(o)[-3:] == ["--account=lab", "--qos=high", "--exclusive"]
    assert slurm_options.parse_options({}, {}, "s.toml", cpu=True).gpus_per_job == 0
    with pytest.raises(ConfigError, match=r"nproc_per_node 4 needs 4 GPUs"):
        slurm_options.parse_options({"gpus_per_job": 2}, {}, "s.toml", nproc=4)


def test_cli_slurm_option_without_slurm_launcher_and_bad_launcher_exit_2(tiny_sweep, tmp_path, capsys):
    assert main(["sweep", str(tiny_sweep), "--out", str(tmp_path / "out"), "--partition", "gpu"]) == 2
    assert "--partition is an option of --launcher slurm" in capsys.readouterr().err
    tiny_sweep.write_text(tiny_sweep.read_text() + '\n[launcher]\ntype = "slurmm"\n')
    assert main(["sweep", str(tiny_sweep), "--out", str(tmp_path / "out")]) == 2
    assert "launcher.type 'slurmm' is not a launcher" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class FakeExecutor:
    """Stands in for submitit's SlurmExecutor: hands out job ids 100, 101, ..."""

    def __init__(self):
        self.submitted = []

    def update_parameters(self, **kw):
        pass

    def submit(self, fn):
        self.submitted.append(fn)
        return type("Job", (), {"job_id": str(99 + len(self.submitted))})()


@pytest.mark.parametrize("rc, state, summary, resubmits, status", [
    (0, "COMPLETED", True, 0, "done"),
    (None, "CANCELLED", True, 0, "done"),  # cancelled after its summary: done
    (2, "COMPLETED", False, 0, "failed"),  # the child failed: not submitted again by this sweep
    (None, "FAILED", False, 0, "failed"),
    (75, "COMPLETED", False, 0, "submitted"),  # the preemption exit, not requeued by submitit: resubmitted
    (None, "PREEMPTED", False, 0, "submitted"),
    (None, "TIMEOUT", False, 0, "submitted"),
    (None, "TIMEOUT", False, 10, "interrupted"),  # max_requeues used up
    (130, "CANCELLED", False, 0, "interrupted"),  # scancel: left for the next sweep
])
def test_how_an_ended_job_is_recorded(tiny_sweep, tmp_path, rc, state, summary, resubmits, status):
    """Without a cluster: a job that ended is done, failed, interrupted, or submitted again (cluster's doing)."""
    pytest.importorskip("submitit")
    import pickle

    from attnbench.sweep import manifest
    from attnbench.sweep.launchers.slurm import SlurmLauncher, _Watched

    s = sw.load_sweep(tiny_sweep)
    out = tmp_path / "out"
    r = sw.plan(s, out)[0]
    man = manifest._Manifest(out, s, [r])
    rd = out / "runs" / r.run_id
    rd.mkdir(parents=True)
    (out / "slurm").mkdir()
    if rc is not None:
        (out / "slurm" / "7_0_result.pkl").write_bytes(pickle.dumps(("success", rc)))
    if summary:
        (rd / "summary.json").write_text(json.dumps({"final_val_loss": 1.5, "best_val_loss": 1.5}))
    launcher = SlurmLauncher(slurm_options.SlurmOptions(partition="debug"))
    ex, watched, failed = FakeExecutor(), {}, []
    w = _Watched(r, "7", "RUNNING", time.monotonic(), resubmits=resubmits)
    done = launcher._ended(ex, s, out, w, state, man, watched, failed, 0, 1)
    assert man.data["runs"][r.run_id]["status"] == status
    assert done == (status == "done") and (failed == [r.run_id]) == (status == "failed")
    assert (r.run_id in watched) == (status == "submitted") == bool(ex.submitted)
    if status == "submitted":
        assert man.data["runs"][r.run_id]["job_id"] == "100" and watched[r.run_id].resubmits == resubmits + 1
