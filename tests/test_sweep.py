"""Sweeps: a SIGKILLed sweep restarts to the same results as an uninterrupted one, a finished sweep is
left alone, run ids are stable, and sweep files are validated before anything runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench import sweep as sw
from attnbench.config import CONFIGS_DIR
from attnbench.errors import AttnbenchError, ConfigError
from attnbench.sweep import bench_phase, manifest, processes
from attnbench.files import read_jsonl
from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
ITERS, EVAL = 200, 20  # checkpoints every 20 steps: a kill after step 20 of run 2 has ~180 steps of margin


def write_sweep(d: Path, data_dir: Path, body: str = "", name: str = "sweep.toml") -> Path:
    import tomli_w

    base = tiny_run_config(data_dir, d / "unused")
    (d / "base.toml").write_text(tomli_w.dumps(base))
    p = d / name
    p.write_text(body or f"""
name = "tiny"
base_config = "base.toml"
mixers = ["softmax"]
learning_rates = [3e-3]
seeds = [1, 2]
[overrides]
"train.max_iters" = {ITERS}
"train.eval_interval" = {EVAL}
"optim.min_lr" = 3e-4
[bench]
enabled = false
""")
    return p


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def final_val(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["final_val_loss"]


def sweep_cli(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnbench", "sweep", str(cfg), "--out", str(out), "--no_report",
                             "--devices", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted sweep of two runs (also the results folder the report tests use)."""
    d = tmp_path_factory.mktemp("ref")
    cfg = write_sweep(d, tiny_data)
    p = sweep_cli(cfg, d / "out")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return cfg, d / "out"


@pytest.mark.fault("sweep-sigkill")
def test_sigkill_during_second_run_then_restart_equals_uninterrupted(tiny_data, tmp_path, reference):
    _, ref_out = reference
    cfg = write_sweep(tmp_path, tiny_data)
    out = tmp_path / "out"
    runs = [r.run_id for r in sw.plan(sw.load_sweep(cfg), out)]
    assert sorted(runs) == sorted(p.name for p in (ref_out / "runs").iterdir())  # ids do not depend on the folder
    second = out / "runs" / runs[1]
    p = sweep_cli(cfg, out)
    deadline = time.monotonic() + 240
    try:
        while not (second / "ckpt" / "latest.json").exists() or \
                json.loads((second / "ckpt" / "latest.json").read_text())["step"] < EVAL:
            assert p.poll() is None, p.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)  # the sweep dies; its training child follows (PR_SET_PDEATHSIG)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert (out / "runs" / runs[0] / "summary.json").is_file()
    assert not (second / "summary.json").exists(), "the second run finished before the kill; test too slow to race"
    child = json.loads((out / "sweep.json").read_text())["runs"][runs[1]]["pid"]
    for _ in range(200):  # the child is gone (not left training the run behind the restart's back)
        if not processes._still_training(child, second):
            break
        time.sleep(0.05)
    assert not processes._still_training(child, second)

    p = sweep_cli(cfg, out)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert "1 done, 1 to resume, 0 to start" in log
    launches = json.loads((second / "run.json").read_text())["launches"]
    assert len(launches) == 2 and launches[1]["resumed_from_step"] >= EVAL  # resumed, not restarted
    # every run exactly once, every step exactly once, results equal to the uninterrupted sweep
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(runs)
    for rid in runs:
        a, b = losses(ref_out / "runs" / rid), losses(out / "runs" / rid)
        assert [s for s, _ in b] == list(range(1, ITERS + 1))
        assert a == b
        assert final_val(ref_out / "runs" / rid) == final_val(out / "runs" / rid)
    man = json.loads((out / "sweep.json").read_text())
    assert {v["status"] for v in man["runs"].values()} == {"done"}


def test_rerunning_a_finished_sweep_does_nothing(reference, capsys):
    cfg, out = reference
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file() and p.name != "run.json"}
    man = sw.run_sweep(cfg, out=out, devices="cpu", report=False)
    assert "2 done, 0 to resume, 0 to start" in capsys.readouterr().out
    assert {v["status"] for v in man["runs"].values()} == {"done"}
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file() and p.name != "run.json"}
    assert after == before
    for rd in (out / "runs").iterdir():
        assert len(json.loads((rd / "run.json").read_text())["launches"]) == 1


def test_run_id_ignores_where_and_how_but_not_what(tiny_data, tmp_path):
    from attnbench.resolve import load_config

    cfg = load_config(tiny_run_config(tiny_data, tmp_path / "a"))
    rid = sw.run_id_for(cfg)
    assert rid.startswith("softmax-lr0.003-s1337-") and len(rid.rsplit("-", 1)[1]) == 8
    same = load_config(cfg, {"train.out_dir": str(tmp_path / "b"), "data.data_dir": "/elsewhere", "progress": True,
                             "log_interval": 5, "compile": True})
    assert sw.run_id_for(same) == rid
    for change in ({"learning_rate": 1e-3}, {"train.seed": 2}, {"max_iters": 21}, {"model.n_layer": 3},
                   {"model.dropout": 0.1}):
        assert sw.run_id_for(load_config(cfg, change)) != rid, change


def test_plan_applies_overrides_and_mixer_overrides(tiny_data, tmp_path):
    cfg = write_sweep(tmp_path, tiny_data, f"""
base_config = "base.toml"
mixers = ["softmax"]
learning_rates = [1e-3, 3e-3]
min_lr_ratio = 0.1
[overrides.train]
max_iters = 7
[mixer_overrides.softmax]
"model.n_layer" = 3
""")
    runs = sw.plan(sw.load_sweep(cfg), tmp_path / "out")
    assert [r.learning_rate for r in runs] == [1e-3, 3e-3]
    assert all(r.config["train"]["max_iters"] == 7 and r.config["model"]["n_layer"] == 3 for r in runs)
    assert [r.config["optim"]["min_lr"] for r in runs] == pytest.approx([1e-4, 3e-4])
    assert runs[0].config["train"]["out_dir"] == str(tmp_path / "out" / "runs" / runs[0].run_id)
    assert runs[0].config["train"]["progress"] is False


@pytest.mark.parametrize("body, match", [
    ('base_config = "base.toml"\nmixers = ["softmax"]\nlearning_rate = [1e-3]', r"learning_rate.*did you mean 'learning_rates'"),
    ('base_config = "base.toml"\nmixers = ["softmaxx"]', r"unknown mixer 'softmaxx'.*did you mean 'softmax'"),
    ('base_config = "nope.toml"\nmixers = ["softmax"]', r"base_config 'nope.toml' not found"),
    ('mixers = ["softmax"]', r"base_config is missing"),
    ('base_config = "base.toml"\nmixers = []', r"mixers is empty"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\nseeds = [1, 1]', r"seeds lists a value twice"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\nlearning_rates = ["fast"]', r"learning_rates must be a list of float"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\n[overrides]\n"train.max_iter" = 3', r"train.max_iter.*did you mean 'max_iters'"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\n[overrides]\n"optim.learning_rate" = 3', r"use the sweep key 'learning_rates'"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\n[mixer_overrides.nsa]\nbackend = "torch"', r"mixer_overrides.nsa.*not in mixers"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\n[bench]\nenable = true', r"bench.enable.*did you mean 'enabled'"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\n[bench]\nbenches = ["latncy"]', r"latncy.*did you mean 'latency'"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\nparam_budget = "lots"', r"param_budget 'lots'"),
    ('base_config = "base.toml"\nmixers = ["softmax"]\nlearning_rates = [1e-5]', r"min_lr"),
])
def test_sweep_file_errors_name_the_key(tiny_data, tmp_path, body, match):
    cfg = write_sweep(tmp_path, tiny_data, body)
    with pytest.raises(ConfigError, match=match):
        sw.plan(sw.load_sweep(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_cli_reports_errors_with_exit_code_2(tiny_data, tmp_path):
    from attnbench.cli import main

    cfg = write_sweep(tmp_path, tiny_data, 'base_config = "base.toml"\nmixers = ["softmax"]\nseed = [1]')
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert main(["sweep", str(cfg).replace("sweep.toml", "missing.toml")]) == 2


def test_slots_pin_devices_and_share_cores():
    s = sw.make_slots(["0", "1"], jobs_per_device=2, nproc=1)
    assert [x.device for x in s] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]  # spread over GPUs first
    assert s[0].env["CUDA_VISIBLE_DEVICES"] == "0" and s[0].shared_by == 2
    t = sw.make_slots(["0", "1", "2", "3"], jobs_per_device=1, nproc=2)
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in t] == ["0,1", "2,3"]
    assert sw.child_command(Path("r"), 2)[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    c = sw.make_slots(["cpu"], jobs_per_device=2, nproc=1)
    assert c[0].env["CUDA_VISIBLE_DEVICES"] == "" and c[0].env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert c[0].env["TORCHINDUCTOR_COMPILE_THREADS"] == c[0].env["OMP_NUM_THREADS"]  # compile workers shared too
    with pytest.raises(AttnbenchError, match="devices"):
        sw.resolve_devices("gpu0")


def test_presets_parse_and_plan(tmp_path):
    """attnbench/configs/sweeps/*.toml: valid files that plan every (mixer, lr, seed), parameter-matched within 1%."""
    pytest.importorskip("attnbench.params")
    files = sorted((CONFIGS_DIR / "sweeps").glob("*.toml"))
    assert {"bakeoff", "bakeoff-quick"} <= {f.stem for f in files}
    for f in files:
        if f.stem == "bakeoff-all":  # tests/test_hybrid.py plans it mixer by mixer (skipping those not merged yet)
            continue
        s = sw.load_sweep(f)
        runs = sw.plan(s, tmp_path / f.stem, load_data=False)
        assert sorted({r.label for r in runs}) == sorted(s.mixers)
        points = len(sw.grid.expand(s.grid, s.points))  # [grid] x [[points]] (recall presets), else 1
        assert len(runs) == len(s.mixers) * len(s.learning_rates or [None]) * len(s.seeds or [None]) * points
        if f.stem in ("bakeoff", "bakeoff-quick"):
            assert len(s.mixers) == 5
        if s.param_budget is not None:  # the recall presets set widths directly
            assert all(abs(r.match["deviation"]) <= 0.01 for r in runs), [(r.mixer, r.match) for r in runs]
        sw.check_bench_options(s.bench, s.path)


def test_cuda_graph_sweep_on_the_cpu_fails_before_any_file(tmp_path):
    """The bakeoff preset captures its steps in CUDA graphs: on a CPU the sweep refuses before writing anything
    (not five runs failing one after another), and says how to go on."""
    from attnbench.data import prepare_text
    from conftest import _synthetic_text

    src = tmp_path / "input.txt"
    src.write_text(_synthetic_text(5000))
    prepare_text(src, "shakespeare_char", tokenizer="char", data_dir=tmp_path / "data", verbose=False)
    out = tmp_path / "bakeoff"
    with pytest.raises(ConfigError, match=r"train.cuda_graph = true needs CUDA GPUs.*cpu.*--set train.cuda_graph=false"):
        sw.run_sweep(sw.load_sweep("sweeps/bakeoff"), out=out, devices="cpu",
                     data_dir=str(tmp_path / "data"))
    assert not out.exists()


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.fault("sweep-ctrl-c")),
                                 pytest.param(signal.SIGUSR1, marks=pytest.mark.fault("sweep-usr1"))])
def test_ctrl_c_stops_children_cleanly_and_keeps_checkpoints(sig, tiny_data, tmp_path):
    cfg = write_sweep(tmp_path, tiny_data, f"""
base_config = "base.toml"
mixers = ["softmax"]
seeds = [1, 2]
jobs_per_device = 2
[overrides]
"train.max_iters" = 100000
"train.eval_interval" = {EVAL}
[bench]
enabled = false
""")
    out = tmp_path / "out"
    runs = [r.run_id for r in sw.plan(sw.load_sweep(cfg), out)]
    p = sweep_cli(cfg, out)
    deadline = time.monotonic() + 120
    try:
        while not all((out / "runs" / r / "ckpt" / "latest.json").exists() for r in runs):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(p.pid, sig)
        log, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, log
    assert "interrupted; checkpoints are kept" in log
    man = json.loads((out / "sweep.json").read_text())
    for r in runs:
        assert man["runs"][r]["status"] == "interrupted"
        assert not processes._still_training(man["runs"][r]["pid"], out / "runs" / r)
        assert sw.run_state(out / "runs" / r)[0] == "resume"
        assert "interrupted at step" in (out / "logs" / f"{r}.log").read_text()  # the trainer stopped itself


def test_only_gpu_benchmarks_are_prestarted(monkeypatch):
    monkeypatch.delenv("ATTNBENCH_BENCH_PRESTART", raising=False)
    assert sw.prestarts_bench("cuda:0") and not sw.prestarts_bench("cpu")  # CPU timings keep both cores
    monkeypatch.setenv("ATTNBENCH_BENCH_PRESTART", "0")
    assert not sw.prestarts_bench("cuda:0")


def test_stopping_the_bench_phase_ends_its_waiting_child(tiny_data, tmp_path, monkeypatch):
    """A sweep stopped while a bench child waits for its turn (Ctrl-C during training) ends that child
    and removes its go file."""
    cfg = write_sweep(tmp_path, tiny_data, """
base_config = "base.toml"
mixers = ["softmax"]
[bench]
benches = ["throughput"]
""")
    s = sw.load_sweep(cfg)
    out = tmp_path / "out"
    runs = sw.plan(s, out)
    monkeypatch.setattr(bench_phase, "prestarts_bench", lambda device: True)
    phase = bench_phase._BenchPhase(s, out, runs, sw.make_slots(["cpu"], 1, 1), manifest._Manifest(out, s, runs))
    phase.prestart()
    job = phase.waiting["cpu"]
    log = out / "logs" / "bench-softmax-throughput.log"
    deadline = time.monotonic() + 60
    while not (log.is_file() and "waiting for" in log.read_text()):
        assert job.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    job.go.touch()  # as if its turn had come just as the sweep stopped
    phase.stop()
    assert job.proc.poll() is not None and not phase.waiting
    assert not job.go.exists()


def test_bench_children_start_up_before_their_turn(tiny_data, tmp_path, monkeypatch, capsys):
    """On a GPU each bench child starts early and waits for its go file: the first while the runs train,
    each next one while the previous one measures (forced on here, on the CPU). Every mixer's rows arrive
    in its own file, every child waited, and no go or partial file is left."""
    cfg = write_sweep(tmp_path, tiny_data, """
name = "b"
base_config = "base.toml"
mixers = ["softmax", "deltanet", "gated_deltanet"]
[overrides]
"train.max_iters" = 4
"train.eval_interval" = 2
[bench]
benches = ["throughput"]
options = { contexts = [16], tokens_per_batch = 32, steps = 1, warmup_steps = 1 }
""")
    monkeypatch.setattr(bench_phase, "prestarts_bench", lambda device: True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    man = sw.run_sweep(cfg, out=out, devices="cpu", report=False)
    said = capsys.readouterr().out
    assert {v["status"] for v in man["runs"].values()} == {"done"}
    assert said.count("(started up before its turn)") == 3
    assert said.index("bench softmax throughput on cpu") > max(said.index(f"done {r}") for r in man["runs"])
    for m in ("softmax", "deltanet", "gated_deltanet"):
        rows = read_jsonl(out / "bench" / f"{m}-throughput.jsonl")
        assert {r["mixer"] for r in rows} == {m} and any(r["metric"] == "train_tokens_per_s" for r in rows)
        log = (out / "logs" / f"bench-{m}-throughput.log").read_text()
        assert "waiting for" in log and "go after" in log
    assert sorted(p.name for p in (out / "bench").iterdir()) == sorted(
        f"{m}-throughput.jsonl" for m in ("softmax", "deltanet", "gated_deltanet"))


def test_presets_are_bundled_and_an_unknown_one_names_them():
    from attnbench import run

    for name in run.PRESETS:
        assert run.preset_path(name) == CONFIGS_DIR / "sweeps" / f"{name}.toml" and run.preset_path(name).is_file()
    with pytest.raises(AttnbenchError, match=r"'bakeof' is not a preset \(presets: bakeoff, bakeoff-quick, bakeoff-all, lengthgen, "
                                             r"lengthgen-quick, recall, recall-full, recall-quick\); did you mean 'bakeoff'"):
        run.preset_path("bakeof")


@pytest.mark.parametrize("options, match", [
    ('prompt_len = [64]', r"prompt_len.*did you mean 'prompt_lens'"),
    ('decode_steps = "many"', r"decode_steps"),
    ('device = "cuda"', r"device.*remove it"),
])
def test_bench_options_are_checked_against_the_benchmarks_own_options(tiny_data, tmp_path, options, match):
    cfg = write_sweep(tmp_path, tiny_data, f'base_config = "base.toml"\nmixers = ["softmax"]\n[bench]\nenabled = true\n'
                                           f'[bench.options]\n{options}')
    s = sw.load_sweep(cfg)
    with pytest.raises(ConfigError, match=match):
        sw.check_bench_options(s.bench, s.path)


def test_bench_command_passes_only_the_options_of_its_benchmark(tiny_data, tmp_path):
    cfg = write_sweep(tmp_path, tiny_data, 'base_config = "base.toml"\nmixers = ["softmax"]\n[bench]\nenabled = true\n'
                                           'benches = ["latency", "throughput"]\n'
                                           '[bench.options]\nprompt_lens = [64, 256]\ncontexts = [32]')
    s = sw.load_sweep(cfg)
    sw.check_bench_options(s.bench, s.path)
    model = {"mixer": "softmax", "n_layer": 1, "n_head": 1, "n_embd": 32, "block_size": 32, "vocab_size": 65,
             "bias": False, "pos_emb": "learned", "backend": "auto", "mixer_args": {}}
    lat = sw.bench_command(model, "latency", "cpu", tmp_path / "x.jsonl", s.bench)
    assert lat[lat.index("--prompt_lens") + 1] == "64,256" and "--contexts" not in lat
    thr = sw.bench_command(model, "throughput", "cpu", tmp_path / "x.jsonl", s.bench)
    assert thr[thr.index("--contexts") + 1] == "32" and "--prompt_lens" not in thr


def test_runs_start_in_turn_from_each_mixer(monkeypatch, tmp_path):
    """The local launcher takes the runs round-robin over the mixers (each mixer's in plan order), so waves
    of a sweep with more runs than slots mix mixers rather than leaving one mixer's runs to the end."""
    runs = [sw.PlannedRun(f"{m}{i}", m, 1e-3, 0, {}) for m in ("a", "b", "c") for i in range(3 if m != "b" else 1)]
    assert [r.run_id for r in processes.launch_order(runs)] == ["a0", "b0", "c0", "a1", "c1", "a2", "c2"]
    started = []

    def fake_launch(sweep, out, run, slot, man):
        started.append(run.run_id)
        slot.busy = True
        if len(started) == 3:
            raise RuntimeError("started")  # stop the loop once the three free slots are taken
        return object()

    monkeypatch.setattr(processes, "_launch", fake_launch)
    with pytest.raises(RuntimeError, match="started"):
        processes._train_all(None, tmp_path, runs, sw.make_slots(["cpu"], jobs_per_device=3, nproc=1), None, 30.0, 0, len(runs))
    assert started == ["a0", "b0", "c0"]
