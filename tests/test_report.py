"""The report: built from a results folder alone (no checkpoints, no data), with every table and figure;
corrupt or partial run folders are listed as skipped, missing benchmark data is a note."""
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it

from attnbench import report as rp
from attnbench import sweep as sw
from attnbench.cli import main
from attnbench.files import read_jsonl
from attnbench.report.figures import fig_decode, generalisation_points
from conftest import tiny_run_config

FIGS = ["loss_vs_step.png", "loss_vs_time.png", "val_vs_train.png", "ppl_vs_flops.png", "lr_sensitivity.png"]
BENCH_FIGS = ["decode_latency.png", "memory_vs_context.png", "throughput_vs_context.png"]


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    """A finished sweep: softmax at 2 learning rates x 2 seeds, two runs at a time (shared CPU)."""
    d = tmp_path_factory.mktemp("results")
    (d / "base.toml").write_text(tomli_w.dumps(tiny_run_config(tiny_data, d / "unused")))
    (d / "sweep.toml").write_text("""
name = "tiny"
base_config = "base.toml"
mixers = ["softmax"]
learning_rates = [3e-3, 1e-3]
seeds = [1, 2]
[overrides]
"train.max_iters" = 20
"optim.min_lr" = 1e-4
[bench]
enabled = false
""")
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    try:
        man = sw.run_sweep(d / "sweep.toml", out=d / "out", devices="cpu", jobs_per_device=2, report=False)
    finally:
        mp.undo()
    assert {v["status"] for v in man["runs"].values()} == {"done"}
    return d / "out"


def fake_bench(folder: Path, block: int = 32, tokens_per_iter: int = 256) -> None:
    """Rows as attnbench.bench writes them (only the fields the report reads)."""
    base = {"mixer": "softmax", "device": "cpu", "device_name": "test cpu", "dtype": "float32",
            "shape": {"n_layer": 2, "n_embd": 32, "n_head": 2, "mixer_args": {}}}
    rows = []
    for T, ms in ((64, 0.5), (256, 0.7), (1024, 1.25)):
        rows.append({**base, "bench": "latency", "metric": "decode_ms_per_token", "mode": "eager", "context": T,
                     "value": ms, "median": ms, "min": ms * 0.9, "max": ms * 1.2, "oom": False})
    rows.append({**base, "bench": "latency", "metric": "decode_ms_per_token", "mode": "cuda_graph", "context": 1024,
                 "value": 0.21, "median": 0.21, "min": 0.2, "max": 0.25, "oom": False, "cuda_graph": True, "compiled": True})
    for T, mb, oom in ((128, 300.0, False), (256, 320.0, False), (512, None, True)):
        rows.append({**base, "bench": "memory", "metric": "peak_memory_mb", "unit": "MiB", "context": T, "value": mb,
                     "median": mb, "min": mb, "max": mb, "oom": oom})
    rows.append({**base, "bench": "memory", "metric": "oom_threshold", "context": 256, "value": 256, "first_oom": 512,
                 "limited_by": "oom"})
    for T, tps in ((block, 12800.0), (2 * block, 11000.0)):
        rows.append({**base, "bench": "throughput", "metric": "train_tokens_per_s", "unit": "tokens/s", "context": T,
                     "value": tps, "median": tps, "min": tps * 0.95, "max": tps * 1.05, "oom": False,
                     "tokens_per_batch": tokens_per_iter, "compiled": False, "cuda_graph": True})
    (folder / "bench").mkdir(exist_ok=True)
    (folder / "bench" / "softmax.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def copy_results(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for ck in dst.rglob("ckpt"):  # the report needs no checkpoints
        shutil.rmtree(ck)
    shutil.rmtree(dst / "logs", ignore_errors=True)
    return dst


def table_row(md: str, section: str, mixer: str) -> list[str]:
    part = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in part.splitlines() if x.startswith(f"| {mixer} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not blank


def test_report_from_results_folder_alone(results, tmp_path):
    out = copy_results(results, tmp_path / "copy")
    fake_bench(out)
    # make each run's best evaluation differ from its last (as in an overfitting run), so the table's
    # choice between them shows
    for i, f in enumerate(sorted((out / "runs").glob("*/summary.json"))):
        s = json.loads(f.read_text())
        s["best_val_loss"] = s["final_val_loss"] - 0.05 - 0.01 * i
        s["best_val_bpc"] = s["best_val_loss"] / math.log(2)
        f.write_text(json.dumps(s))
    path = rp.build_report(out)
    md = path.read_text()
    assert path == out / "report" / "report.md"
    for f in FIGS + BENCH_FIGS:
        assert f"]({f})" in md
        assert_png(out / "report" / f)
    assert "## Parameters" in md and "## Bake-off" in md and "skipped:" not in md
    # bake-off numbers: mean and sd over the two seeds at the best learning rate
    res = rp.load_results(out)
    lrs = rp.by_mixer(res.runs)["softmax"]
    best = rp.best_lr(lrs)
    # the score is the best validation loss each run reached (the checkpoint one keeps), not the last one
    bests = [r.summary["best_val_loss"] for r in lrs[best]]
    assert statistics.fmean(bests) <= min(statistics.fmean(r.summary["best_val_loss"] for r in v) for v in lrs.values())
    row = table_row(md, "Bake-off", "softmax")
    assert row[1] == f"{best:g}" and row[2] == "2"
    assert row[3] == f"{statistics.fmean(bests):.4f} ± {statistics.stdev(bests):.4f}"
    finals = [r.final_val_loss for r in lrs[best]]
    assert row[4] == f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"  # final val loss beside it
    row = row[:4] + row[5:]  # without final val loss: the checks below index the columns after it
    ppl = [math.exp(x) for x in bests]
    assert row[4] == f"{statistics.fmean(ppl):.3f} ± {statistics.stdev(ppl):.3f}"
    bpc = [r.summary["best_val_bpc"] for r in lrs[best]]
    assert row[5] == f"{statistics.fmean(bpc):.4f} ± {statistics.stdev(bpc):.4f}"
    # speed from the throughput benchmark at the training context (12800 tokens/s, 256 tokens/iteration)
    assert row[6] == "12,800" and row[7] == "20.0"
    assert "OOM at 512" in row and "1.25" in row  # OOM threshold, decode ms/token at 1k
    # how the speed was measured is said beside the table
    assert "256 tokens per batch, torch.compile off, step captured in a CUDA graph" in md
    assert row[-1] == "0.21" and "torch.compile'd inside the graph" in md  # graph decode column and how
    prow = table_row(md, "Parameters", "softmax")
    assert prow[1:4] == ["2", "32", "2"] and prow[6].startswith("27,")


def test_speed_from_shared_training_is_flagged_without_bench(results, tmp_path):
    out = copy_results(results, tmp_path / "copy")
    md = rp.build_report(out).read_text()
    row = table_row(md, "Bake-off", "softmax")
    assert row[7].endswith("†") and row[8].endswith("†")  # the runs trained two at a time
    assert "shared the device" in md
    assert "no benchmark data" in md  # figures and columns omitted, with a note
    head = next(x for x in md.split("## Bake-off", 1)[1].splitlines() if x.startswith("| mixer"))
    assert "OOM" not in head and "decode" not in head
    for f in BENCH_FIGS:
        assert not (out / "report" / f).exists()
    for f in FIGS:
        assert_png(out / "report" / f)
    assert "through CUDA MPS" not in md
    for f in (out / "runs").glob("*/run.json"):  # as a sweep with cuda_mps records its launches
        meta = json.loads(f.read_text())
        meta["launches"][-1]["cuda_mps"] = True
        f.write_text(json.dumps(meta))
    md = rp.build_report(out).read_text()
    assert "shared the device (jobs_per_device > 1) through CUDA MPS" in md
    assert "runs shared a device through CUDA MPS" in md  # the header, also when benchmarks give the speeds


def test_corrupt_and_partial_runs_are_skipped_not_fatal(results, tmp_path):
    out = copy_results(results, tmp_path / "copy")
    runs = sorted(p.name for p in (out / "runs").iterdir())
    (out / "runs" / runs[0] / "summary.json").write_text('{"final_val_loss": 1.2')  # torn JSON
    (out / "runs" / runs[1] / "summary.json").unlink()  # killed before its end
    shutil.copytree(out / "runs" / runs[2], out / "runs" / "stray")  # not part of the sweep's plan
    md = rp.build_report(out).read_text()
    assert f"skipped: {runs[0]} (summary.json is not valid JSON" in md
    assert f"skipped: {runs[1]} (unfinished: no summary.json)" in md
    assert "stray: in runs/ but not part of this sweep's plan" in md
    assert "2 finished runs" in md
    # without the manifest every folder counts: the stray copy is reported, a bad config.json is skipped
    (out / "sweep.json").unlink()
    junk = out / "runs" / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("not json")
    (out / "runs" / "empty").mkdir()
    md = rp.build_report(out).read_text()
    assert "skipped: junk (config.json is not valid JSON" in md
    assert "skipped: empty (no config.json)" in md
    assert "3 finished runs" in md


def test_report_cli(results, tmp_path, capsys):
    out = copy_results(results, tmp_path / "copy")
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| softmax |" in printed and str(tmp_path / "rep" / "report.md") in printed
    assert (tmp_path / "rep" / "loss_vs_step.png").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_one_colour_per_mixer():
    """Every registered mixer and preset hybrid (the bakeoff-all preset's eleven series in one figure) has a
    colour of its own; another name takes a stable spare colour that none of them has."""
    from attnbench import mixers

    names = mixers.everything()
    colours = [rp.mixer_color(m) for m in names]
    assert len(set(colours)) == len(names) >= 11
    assert rp.mixer_color("my_new_mixer") == rp.mixer_color("my_new_mixer") not in colours
    assert rp.mixer_color("softmax_nope") not in colours


def test_bakeoff_table_goes_to_wandb_when_runs_logged_there(results, tmp_path, monkeypatch):
    """Runs trained with log.wandb_log=true: the report also sends its bake-off table to W&B (offline here);
    the report on disk does not depend on it."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = copy_results(results, tmp_path / "copy")
    for cfg_path in out.glob("runs/*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg["log"]["wandb_log"] = True
        cfg_path.write_text(json.dumps(cfg))
    rp.build_report(out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in runs[0].iterdir())
    assert (out / "report" / "report.md").is_file()


def test_generalisation_points_pair_each_evaluation_with_recent_training_loss():
    """val_vs_train.png's points: the mean training loss over the second half of each eval interval."""
    r = rp.RunResult.__new__(rp.RunResult)
    r.config = {"train": {"eval_interval": 10}}
    r.train_rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)]
    r.eval_rows = [{"step": 0, "val_loss": 4.0}, {"step": 10, "val_loss": 2.5}, {"step": 20, "val_loss": 2.0}]
    pts = generalisation_points(r)
    # steps 6..10 -> mean loss 3.0 - 0.8 = 2.2; steps 16..20 -> 1.2; the step-0 evaluation has no training loss
    assert [(round(a, 6), b) for a, b in pts] == [(2.2, 2.5), (1.2, 2.0)]


def test_an_unfinished_memory_search_is_labelled_so(results, tmp_path):
    """Memory rows without the benchmark's summary row (the search was interrupted) give the furthest
    context reached, marked unfinished, not a threshold."""
    out = copy_results(results, tmp_path / "copy")
    fake_bench(out)
    path = out / "bench" / "softmax.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows
                            if r["metric"] != "oom_threshold" and not r.get("oom")))
    md = rp.build_report(out).read_text()
    assert "none up to 256 (search unfinished)" in table_row(md, "Bake-off", "softmax")


def test_throughput_caption_names_where_each_mixer_overtakes_softmax():
    def row(m, T, v):
        return {"bench": "throughput", "metric": "train_tokens_per_s", "unit": "tokens/s", "mixer": m,
                "context": T, "value": v, "median": v}

    rows = [row("softmax", 1024, 100.0), row("softmax", 4096, 40.0), row("deltanet", 1024, 50.0),
            row("deltanet", 4096, 80.0), row("nsa", 1024, 10.0), row("nsa", 4096, 20.0)]
    text = rp.crossover_text(rows)
    # deltanet's ratio goes 0.5 -> 2.0: log-log interpolation crosses at the geometric midpoint, 2048
    assert "deltanet at ~2,048 tokens (interpolated between 1024 and 4096)" in text
    assert "nsa does not: slower at every measured context (up to 4096)" in text
    assert rp.crossover_text([row("deltanet", 1024, 5.0)]) == ""  # no softmax rows: nothing to say


def test_report_names_the_kernels_behind_training_and_each_benchmark(results, tmp_path):
    out = copy_results(results, tmp_path / "copy")
    assert "## Kernels behind the figures" not in rp.build_report(out).read_text()  # softmax: nothing dispatched
    for f in (out / "runs").glob("*/summary.json"):
        s = json.loads(f.read_text())
        s["op_backends"] = {"gated_delta_rule": "fla+torch-dqkwg", "causal_conv1d": "fla"}
        f.write_text(json.dumps(s))
    fake_bench(out)
    rows = read_jsonl(out / "bench" / "softmax.jsonl")
    for r in rows:
        if r["bench"] == "latency":
            r["backend_ops"] = {"nsa_decode": "triton"}
    (out / "bench" / "softmax.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = rp.build_report(out).read_text()
    line = md.split("## Kernels behind the figures", 1)[1].strip().splitlines()[0]
    assert line == ("- softmax: training: causal_conv1d fla, gated_delta_rule fla+torch-dqkwg; "
                    "latency: nsa_decode triton")


def test_a_crowded_legend_goes_beside_the_plot(tmp_path):
    """Decode latency with three modes per mixer is 15 series: a legend inside the axes would cover the
    curves, so it is drawn to the right of the plot."""
    import matplotlib.image as mpimg

    rows = [{"bench": "latency", "metric": "decode_ms_per_token", "mixer": m, "mode": mode, "context": P,
             "value": v * (1 + i), "min": v * (1 + i) * 0.9, "max": v * (1 + i) * 1.1}
            for i, m in enumerate(["softmax", "deltanet", "gated_deltanet", "gated_deltaproduct", "nsa"])
            for mode, v in (("eager", 2.0), ("recompute", 40.0), ("cuda_graph", 0.25)) for P in (128, 1024, 16384)]
    img = mpimg.imread(fig_decode(rows, tmp_path))
    (tmp_path / "few").mkdir()
    few = mpimg.imread(fig_decode([r for r in rows if r["mixer"] == "softmax"], tmp_path / "few"))
    assert img.shape[1] / img.shape[0] > 1.25 * few.shape[1] / few.shape[0]  # widened by the legend beside it
