"""scripts/profile_decode.py on the CPU: every requested mixer gets its section, with a timed eager decode
step and a positive count of aten ops per decode step; --out keeps the same text."""
import os
import re
import subprocess
import sys
from pathlib import Path

from attnbench import mixers

ROOT = Path(__file__).resolve().parents[1]
COUNT = re.compile(r"(\d+) (?:aten ops|device kernels) per decode step")


def run_profile_decode(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "scripts/profile_decode.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_profile_decode_cpu_tiny_names_every_mixer_with_its_op_count(tmp_path):
    out = tmp_path / "profile_decode.txt"
    names = mixers.available()
    r = run_profile_decode("--device", "cpu", "--tiny", "--mixers", ",".join(names), "--variants", "eager,graph",
                           "--prompt_len", "24", "--steps", "3", "--warmup", "1", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    sections = {s.split()[0]: s for s in r.stdout.split("## ")[1:]}
    assert sorted(sections) == sorted(names), r.stdout
    for name, text in sections.items():
        assert "failed" not in text, text
        assert re.search(r"eager +[\d.]+ ms/token", text), text
        assert "graph           skipped: CUDA graphs need --device cuda" in text  # no graph on a CPU, said so
        m = COUNT.search(text)
        assert m and int(m.group(1)) > 0, text
        assert "mixer tokens per call 1" in text  # the profiled step is the cached path
        assert "top 25 by self CPU time" in text
    assert out.read_text().strip() == r.stdout.strip()
