"""scripts/profile_decode.py on a CUDA GPU at the bake-off shapes: graph replays are timed and the eager step's
kernels counted (the CPU test cannot reach this path)."""
import re

import pytest
import torch

from test_profile_decode import COUNT, run_profile_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_profile_decode_times_graph_replays_and_counts_kernels(tmp_path):
    r = run_profile_decode("--device", "cuda", "--mixers", "softmax,deltanet", "--variants", "eager,graph",
                           "--prompt_len", "256", "--steps", "20", "--warmup", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    sections = {s.split()[0]: s for s in r.stdout.split("## ")[1:]}
    assert sorted(sections) == ["deltanet", "softmax"], r.stdout
    for text in sections.values():
        assert "bfloat16" in text.splitlines()[0], text  # bench latency's decode precision
        assert re.search(r"graph +[\d.]+ ms/token", text), text
        m = COUNT.search(text)
        assert m and "device kernels" in m.group(0) and int(m.group(1)) > 0, text
