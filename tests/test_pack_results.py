"""scripts/pack_results.py: a finished sweep folder becomes a small results folder: the report, figures as
palette PNGs, benchmark rows, each run's small files and its metrics gzipped; no checkpoints or logs."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _pack_module():
    spec = importlib.util.spec_from_file_location("pack_results", ROOT / "scripts" / "pack_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    (s / "report").mkdir(parents=True)
    (s / "report" / "report.md").write_text("# r\n\n2 finished runs; built today at 10:00 from `/tmp/x/sweep` "
                                            "(files on disk only).\n")
    fig, ax = plt.subplots()
    ax.plot(range(50), [i ** 0.5 for i in range(50)])
    fig.savefig(s / "report" / "loss.png", dpi=100)
    plt.close(fig)
    (s / "bench").mkdir()
    (s / "bench" / "softmax.jsonl").write_text('{"bench": "latency"}\n')
    (s / "sweep.json").write_text("{}")
    run = s / "runs" / "softmax-lr0.001-s1337-abc"
    (run / "ckpt" / "step_10").mkdir(parents=True)
    (run / "ckpt" / "step_10" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / "eval").mkdir()
    for name in ("config.json", "run.json", "summary.json"):
        (run / name).write_text(json.dumps({"name": name}))
    (run / "eval" / "lengthgen.jsonl").write_text('{"length": 256}\n')
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1 / (i + 1)}) + "\n" for i in range(300)))
    (run / "train.log").write_text("log\n")
    return s


def test_pack_keeps_the_report_rows_and_small_files_only(tmp_path):
    pack = _pack_module()
    sweep = _sweep(tmp_path)
    dest = tmp_path / "results" / "x-h200-2026-01-01"
    pack.pack(sweep, dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    run = "runs/softmax-lr0.001-s1337-abc"
    assert got == sorted(["report/report.md", "report/loss.png", "bench/softmax.jsonl.gz", "sweep.json",
                          f"{run}/config.json", f"{run}/run.json", f"{run}/summary.json",
                          f"{run}/eval/lengthgen.jsonl", f"{run}/metrics.jsonl.gz"])
    metrics = (dest / run / "metrics.jsonl.gz").read_bytes()
    assert gzip.decompress(metrics) == (sweep / run / "metrics.jsonl").read_bytes()
    bench = (dest / "bench" / "softmax.jsonl.gz").read_bytes()
    assert gzip.decompress(bench) == (sweep / "bench" / "softmax.jsonl").read_bytes()
    with Image.open(dest / "report" / "loss.png") as im:
        assert im.mode == "P"
    md = (dest / "report" / "report.md").read_text()
    assert "/tmp/x" not in md and "from the sweep folder sweep/" in md


def test_pack_refuses_an_unfinished_sweep_or_an_existing_folder(tmp_path):
    pack = _pack_module()
    sweep = _sweep(tmp_path)
    with pytest.raises(SystemExit, match="no report/report.md"):
        pack.pack(tmp_path, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists already"):
        pack.pack(sweep, tmp_path / "taken")
