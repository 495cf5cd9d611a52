"""scripts/fla_tune.py on the CPU: the part that runs a sweep's benchmarks in its own process (so FLA's
autotuners meet, and save, the keys a preset's benchmark phase needs). Its GPU parts run on a GPU only."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from attnbench.files import read_jsonl
from test_sweep import write_sweep

ROOT = Path(__file__).resolve().parents[1]


def _load_script(monkeypatch):
    monkeypatch.setenv("ATTNBENCH_FLA_CONFIGS", "on")  # the script sets it 'off' on import; restored after
    spec = importlib.util.spec_from_file_location("fla_tune", ROOT / "scripts" / "fla_tune.py")
    fla_tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fla_tune)
    return fla_tune


def test_merge_takes_every_capture_under_a_folder(tmp_path, monkeypatch):
    from attnbench.ops import fla_configs, fla_preload

    fla_tune = _load_script(monkeypatch)
    vers = {"triton": "3.6.0", "fla": "0.6.0"}
    cap = tmp_path / "cap"
    for i, (mixer, phase) in enumerate([("deltanet", "train"), ("deltanet", "bench"), ("nsa", "bench")]):
        d = cap / f"{mixer}-{phase}-{100 + i}"
        fla_preload.save(d / "NVIDIA_H200.preload.json", "NVIDIA H200", vers, {f"{mixer}:{phase}": [f"S{i}"]})
        fla_configs._write_merged(d / "NVIDIA_H200.json", [(f"fla.k{i}", {"key": [i], "config": {"num_warps": 4}})],
                                  "NVIDIA H200", vers)
    out = tmp_path / "configs"
    fla_tune.merge_all(out, cap)
    pre = json.loads((out / "NVIDIA_H200.preload.json").read_text())
    assert pre["mixers"] == {"deltanet:bench": ["S1"], "deltanet:train": ["S0"], "nsa:bench": ["S2"]}
    assert sorted(json.loads((out / "NVIDIA_H200.json").read_text())["kernels"]) == ["fla.k0", "fla.k1", "fla.k2"]


def test_exercise_preset_benchmarks_runs_the_sweeps_bench_commands_in_process(tiny_data, tmp_path, monkeypatch):
    fla_tune = _load_script(monkeypatch)
    cfg = write_sweep(tmp_path, tiny_data, """
name = "tiny"
base_config = "base.toml"
mixers = ["softmax", "deltanet"]
[bench]
enabled = true
benches = ["latency", "throughput"]
[bench.options]
prompt_lens = [8]
decode_steps = 2
recompute_steps = 0
contexts = [16]
tokens_per_batch = 32
""")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fla_tune.exercise_preset_benchmarks(cfg, ["deltanet"], scratch, device="cpu")
    assert sorted(p.name for p in scratch.iterdir()) == ["deltanet-latency.jsonl", "deltanet-throughput.jsonl"]
    for p in scratch.iterdir():
        rows = read_jsonl(p)
        assert rows and {r["mixer"] for r in rows} == {"deltanet"}
        assert all(r["shape"]["n_embd"] == 32 for r in rows)  # the sweep's trained shape, not a default one
