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
