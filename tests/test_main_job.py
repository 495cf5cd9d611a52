"""The main job end to end through the command line, at a tiny size: `attnbench run` prepares the data
from --input, trains every mixer of the CPU preset, writes the report and prints the bake-off table."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_attnbench_run_from_an_empty_folder(tmp_path):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "lord", "my", "and", "thou", "art", "love"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
    (tmp_path / "input.txt").write_text(text)
    work = tmp_path / "elsewhere"  # not the repository: presets come from the installed package
    work.mkdir()
    tiny = ["train.max_iters=6", "train.eval_interval=3", "train.log_interval=3", "train.eval_batch_size=64",
            "optim.warmup_iters=2", "optim.lr_decay_iters=6", "model.block_size=32", "train.batch_size=4"]
    cmd = [sys.executable, "-m", "attnbench", "run", "--preset", "bakeoff-quick", "--out", "res", "--input",
           str(tmp_path / "input.txt"), "--no_bench", "--status_interval", "5"]
    for kv in tiny:
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k != "ATTNBENCH_DATA"}
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| mixer |" in p.stdout  # the bake-off table is printed
    report = work / "res" / "report" / "report.md"
    assert report.is_file() and "softmax" in report.read_text()
    summaries = sorted((work / "res" / "runs").glob("*/summary.json"))
    assert len(summaries) == 5
    for s in summaries:
        d = json.loads(s.read_text())
        assert d["steps"] == 6 and d["best_val_loss"] < 10
