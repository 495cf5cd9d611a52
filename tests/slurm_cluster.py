"""The real single-node Slurm cluster of scripts/slurm_cluster.sh, as a session fixture.

A test module imports the fixture (`from slurm_cluster import slurm_cluster`) and asks for it by name:

    def test_x(slurm_cluster):
        executor = submitit.AutoExecutor(folder=tmp_path)
        executor.update_parameters(slurm_partition=slurm_cluster.partition)

The fixture starts the cluster once per session (the script installs Debian's munge and Slurm packages
when they are missing, which needs root and apt-get), points SLURM_CONF and PATH at it for the session
(submitit runs sbatch, scancel and sacct as subprocesses, and the jobs inherit the environment), and
stops it at the end, unless it was already running before the session, in which case it is left running.
Where the cluster cannot start (not root, no apt-get, a daemon refuses) the tests that use it skip with
the script's error; ATTNBENCH_REQUIRE_SLURM=1 turns that skip into a failure, for CI machines that must
run them.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
DEFAULT_FOLDER = "/tmp/attnbench-slurm"
# the script's KillWait: seconds between a plain scancel's SIGTERM and its SIGKILL
KILL_WAIT_S = 5


@dataclass(frozen=True)
class Cluster:
    partition: str
    folder: Path  # the script's private folder: slurm.conf, logs, jobcomp.txt, bin/sacct
    start_s: float  # how long `start` took (0 where the cluster was already running)
    kill_wait_s: int = KILL_WAIT_S


def _script(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=timeout
    )


def _cannot_start(reason: str) -> None:
    if os.environ.get("ATTNBENCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"the Slurm test cluster did not start (ATTNBENCH_REQUIRE_SLURM=1): {reason}")
    pytest.skip(f"no Slurm test cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    if not sys.platform.startswith("linux"):
        _cannot_start("scripts/slurm_cluster.sh runs on Linux only")
    if os.geteuid() != 0:
        _cannot_start("scripts/slurm_cluster.sh needs root (slurmd runs jobs as their submitter; "
                      "apt-get installs munge and slurm)")
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[slurm]')")
    folder = Path(os.environ.get("ATTNBENCH_SLURM_DIR", DEFAULT_FOLDER))
    partition = os.environ.get("ATTNBENCH_SLURM_PARTITION", "debug")
    was_running = _script("status", timeout=30).returncode == 0
    t0 = time.monotonic()
    if not was_running:
        try:  # minutes only where apt-get has to install the packages
            started = _script("start", timeout=600)
        except subprocess.TimeoutExpired:
            _cannot_start("scripts/slurm_cluster.sh start took over 600 s")
        if started.returncode != 0:
            _cannot_start(started.stderr.strip()[-2000:] or f"exit status {started.returncode}")
    cluster = Cluster(partition=partition, folder=folder, start_s=time.monotonic() - t0)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_CONF", str(folder / "slurm.conf"))
        # bin/sacct answers submitit's job-state queries: the cluster has no accounting database
        env.setenv("PATH", f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        try:
            yield cluster
        finally:
            if not was_running:
                _script("stop", timeout=120)
