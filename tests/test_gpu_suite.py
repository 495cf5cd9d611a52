"""scripts/gpu_suite.sh's packing, which runs on any machine: what a device call brings back is its files
under OUTDIR, and the device tool returns a limited number of files, so results and FLA captures travel
as one archive each."""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_and_fla_captures_are_packed_into_one_archive_each(tmp_path):
    runs, cap, out = tmp_path / "runs", tmp_path / "cap", tmp_path / "out"
    (runs / "seed" / "runs" / "a" / "ckpt").mkdir(parents=True)
    (runs / "seed" / "runs" / "a" / "summary.json").write_text("{}")
    (runs / "seed" / "runs" / "a" / "ckpt" / "meta.json").write_text("{}")  # checkpoints stay behind
    for proc in ("deltanet-train-11", "nsa-bench-12"):
        (cap / proc).mkdir(parents=True)
        (cap / proc / "NVIDIA_H200.preload.json").write_text("{}")
    env = {**os.environ, "ATTNBENCH_RUNS": str(runs), "ATTNBENCH_FLA_CAPTURE": str(cap)}
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", str(out), "no_such_stage"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unknown stage no_such_stage" in r.stdout
    with tarfile.open(out / "results.tar.gz") as t:
        names = t.getnames()
    assert "./seed/runs/a/summary.json" in names and not any("/ckpt/" in n for n in names)
    with tarfile.open(out / "fla_capture.tar.gz") as t:
        names = t.getnames()
    assert {"./deltanet-train-11/NVIDIA_H200.preload.json", "./nsa-bench-12/NVIDIA_H200.preload.json"} <= set(names)


def test_gpu_apps_sampler_records_pids_with_their_commands_and_stops(tmp_path):
    """GPU_APPS_EVERY=S: nvidia-smi's compute processes every S seconds, each with its command line, into
    OUTDIR/gpu_apps.csv; the sampler ends with the suite (a fake nvidia-smi names this test's process)."""
    bindir, out = tmp_path / "bin", tmp_path / "out"
    bindir.mkdir()
    fake = bindir / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\necho \"$FAKE_PID, 512 MiB\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "GPU_APPS_EVERY": "0.2",
           "ATTNBENCH_RUNS": str(tmp_path / "runs"), "FAKE_PID": str(os.getpid())}
    script = "bash scripts/gpu_suite.sh \"$1\" no_such_stage; sleep 0.5"
    r = subprocess.run(["bash", "-c", script, "suite", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = (out / "gpu_apps.csv").read_text().splitlines()
    assert rows and all(row.split(",", 3)[1:3] == [str(os.getpid()), "512"] for row in rows)
    assert all("pytest" in row.split(",", 3)[3] for row in rows)  # the pid's command line
    n = len(rows)
    import time
    time.sleep(0.6)
    assert len((out / "gpu_apps.csv").read_text().splitlines()) == n  # stopped with the suite


def test_gpu_tests_can_run_in_several_pytest_workers(tmp_path):
    """GPU_TESTS_WORKERS=N hands pytest `-n N --dist loadfile` (pytest-xdist: test files in parallel
    processes), GPU_TESTS_DIST=load single tests; unset, one process (a fake python3 records the command
    line)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python3"
    fake.write_text("#!/usr/bin/env bash\necho \"$*\" >> \"$ARGS_LOG\"\n")
    fake.chmod(0o755)
    lines = {}
    for workers, dist in (("", ""), ("3", ""), ("4", "load")):
        log = tmp_path / f"args{workers}.txt"
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "ARGS_LOG": str(log),
               "ATTNBENCH_RUNS": str(tmp_path / "runs"), "GPU_TESTS_WORKERS": workers or "1"}
        if dist:
            env["GPU_TESTS_DIST"] = dist
        r = subprocess.run(["bash", "scripts/gpu_suite.sh", str(tmp_path / f"out{workers}"), "tests:tests/gpu"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lines[workers] = next(x for x in log.read_text().splitlines() if x.startswith("-m pytest"))
    assert "-n" not in lines[""].split() and lines[""].startswith("-m pytest tests/gpu -m gpu")
    assert " -n 3 --dist loadfile" in lines["3"]
    assert " -n 4 --dist load " in lines["4"] + " "


def test_eval_stage_evaluates_a_run_folder_then_reports_it(tmp_path):
    """eval:NAME runs `attnbench eval $ATTNBENCH_RUNS/NAME --lengths $EVAL_LENGTHS`, then `attnbench report`
    on the same folder (a fake python3 records the command lines)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python3"
    fake.write_text("#!/usr/bin/env bash\necho \"$*\" >> \"$ARGS_LOG\"\n")
    fake.chmod(0o755)
    log, runs = tmp_path / "args.txt", tmp_path / "runs"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "ARGS_LOG": str(log), "ATTNBENCH_RUNS": str(runs),
           "EVAL_LENGTHS": "64,128"}
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", str(tmp_path / "out"), "eval:recall"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    calls = [x for x in log.read_text().splitlines() if x.startswith("-m attnbench")]
    assert calls == [f"-m attnbench eval {runs}/recall --lengths 64,128", f"-m attnbench report {runs}/recall"]


def test_each_run_stage_keeps_its_own_log(tmp_path):
    """Two run:/sweep: stages in one call (a preset, then another as time allows) keep both logs."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    env = {**os.environ, "ATTNBENCH_RUNS": str(runs), "GPU_SWEEP_TIMEOUT": "60"}
    r = subprocess.run(["bash", "scripts/gpu_suite.sh", str(out), "run:no_such_a", "run:no_such_b"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("no_such_a", "no_such_b"):
        assert f"'{name}' is not a preset" in (runs / f"run-{name}.log").read_text()
