"""`attnbench bench`: every subcommand on tiny CPU shapes writes valid rows; decode is the cached path;
out-of-memory is a measured row (injected failures), and the threshold bisection lands on it."""
import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnbench import mixers
from attnbench.bench import cli, decode_graph, latency, memory, options, throughput
from attnbench.bench.rows import RowWriter, base_row
from attnbench.bench.shapes import bench_config, build_model, resolve_shapes
from attnbench.bench.timing import precision
from attnbench.cli import main
from attnbench.errors import ConfigError
from attnbench.ops import fla_preload
from helpers import record_fla_captures

# Tiny shapes every mixer takes on the CPU (NSA's blocks shrunk as in tests/test_model.py).
TINY = ["--no_match", "--set", "n_layer=2", "--set", "n_embd=32", "--set", "n_head=2"]
NSA_TINY = ["--set", "nsa.n_kv_head=1", "--set", "nsa.head_dim=16", "--set", "nsa.block_size=4",
            "--set", "nsa.block_counts=2", "--set", "nsa.window_size=8"]
ALL = mixers.available()
REQUIRED = {"bench", "mixer", "n_params", "shape", "device", "device_name", "dtype", "backend", "batch", "context",
            "metric", "value", "median", "min", "max", "unit", "oom"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(mixer_list=None):
    m = mixer_list or ALL
    return ["--mixers", ",".join(m), "--device", "cpu", *TINY, *(NSA_TINY if "nsa" in m else [])]


def read_rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        missing = REQUIRED - set(r)
        assert not missing, f"row lacks {missing}: {r}"
        assert set(r["shape"]) >= {"n_layer", "n_embd", "n_head", "mixer_args"}
        assert r["device"] == "cpu" and r["dtype"] == "float32"
    return rows


# ------------------------------------------------------------------ latency


@pytest.fixture(scope="module")
def latency_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lat.jsonl"
    rc = main(["bench", "latency", *tiny_args(), "--prompt_lens", "8,40", "--decode_steps", "5",
               "--decode_warmup", "1", "--prefill_repeats", "2", "--json", str(out)])
    assert rc == 0
    return read_rows(out)


def test_latency_rows_for_every_mixer(latency_rows):
    for m in ALL:
        for P in (8, 40):
            rs = [r for r in latency_rows if r["mixer"] == m and r["context"] == P]
            metrics = sorted((r["metric"], r.get("mode")) for r in rs)
            assert metrics == [("decode_ms_per_token", "eager"), ("decode_ms_per_token", "recompute"),
                               ("prefill_ms", None)], (m, P, metrics)
            for r in rs:
                assert r["error"] is None and not r["oom"]
                assert 0 < r["min"] <= r["median"] <= r["max"], r
                assert r["backend"] == "torch" and r["batch"] == 1
            dec = next(r for r in rs if r.get("mode") == "eager")
            assert dec["repeats"] == 5 and dec["cuda_graph"] is False and dec["unit"] == "ms/token"
            rec = next(r for r in rs if r.get("mode") == "recompute")  # uncached decoding
            assert rec["repeats"] == 3 and rec["mixer_tokens_per_decode_step"] == P + 1


def test_decode_is_the_cached_path(latency_rows):
    """Every decode call hands every mixer exactly one token (a recomputed prompt would show P + t);
    the 'recompute' rows are uncached decoding, measured for comparison."""
    for r in latency_rows:
        if r.get("mode") == "recompute":
            assert r["mixer_tokens_per_decode_step"] == r["context"] + 1, r
        elif r["metric"] == "decode_ms_per_token":
            assert r["mixer_tokens_per_decode_step"] == 1, r
        else:
            assert r["mixer_tokens_per_prefill"] == r["context"], r


def test_token_counter_catches_a_recomputing_decode():
    """The check the latency bench relies on: a 'decode' that re-runs the prefix is reported as such."""
    torch.manual_seed(0)
    m = build_model(bench_config(resolve_shapes(["softmax"], match=False,
                                                                     sets=["n_layer=2", "n_embd=32", "n_head=2"])[0].cfg, 64), "cpu")
    m.eval()
    x = torch.randint(0, 65, (1, 20))
    with torch.no_grad():
        cache = m.new_cache(1, 64)
        m(x, cache=cache)
        with latency.count_mixer_tokens(m) as cached:
            m(x[:, -1:], cache=cache)
        with latency.count_mixer_tokens(m) as recomputed:
            m(torch.cat([x, x[:, -1:]], 1))  # what a cache-less decode does
    assert cached == [1, 1]
    assert recomputed == [21, 21]


@pytest.mark.parametrize("mixer", [m for m in ("deltanet", "gated_deltanet", "gated_deltaproduct") if m in ALL])
def test_delta_decode_work_does_not_grow_with_prompt(mixer):
    """A recurrent state makes a decode step the same work after 1000 prompt tokens as after 16: counted
    in FLOPs (torch.utils.flop_counter), which unlike a CPU timing does not depend on a busy machine;
    the latency benchmark's own figures are in results/README.md."""
    shape = resolve_shapes([mixer], match=False, sets=["n_layer=2", "n_embd=32", "n_head=2"])[0]
    cfg = bench_config(shape.cfg, 1024 + 8)
    model = build_model(cfg, "cpu").eval()
    flops = {}
    with torch.no_grad():
        for P in (16, 1024):
            cache = model.new_cache(1, 1024 + 8)
            model(torch.randint(0, cfg.vocab_size, (1, P)), cache=cache)
            with FlopCounterMode(display=False) as fc:
                model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache)
            flops[P] = fc.get_total_flops()
    assert flops[16] > 0 and flops[1024] == flops[16], flops


def test_a_failing_stage_is_a_row_and_keeps_what_was_measured(monkeypatch):
    shape = resolve_shapes(["softmax"], match=False, sets=["n_layer=2", "n_embd=32", "n_head=2"])[0]
    calls = []

    def broken_counter(model):  # first use: the prefill (fine); second: the decode stage (raises)
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("decode exploded")
        return orig(model)

    orig = latency.count_mixer_tokens
    monkeypatch.setattr(latency, "count_mixer_tokens", broken_counter)
    opts = latency.LatencyOptions(prompt_lens=[8, 16], decode_steps=2, decode_warmup=0, prefill_repeats=1,
                                  prefill_warmup=0)
    rows = latency.run([shape], "cpu", opts, RowWriter(None))
    assert [(r["context"], r["metric"], r.get("mode"), r["error"]) for r in rows] == [
        (8, "prefill_ms", None, None), (8, "decode_ms_per_token", "eager", "RuntimeError: decode exploded"),
        (16, "prefill_ms", None, None), (16, "decode_ms_per_token", "eager", "RuntimeError: decode exploded")]


# ------------------------------------------------------------------ graph-safety checks (CPU parts)


def test_inplace_violation_names_the_replaced_tensor():
    s = torch.zeros(2, 3)
    before = decode_graph.state_tensors([{"recurrent": s}])
    assert decode_graph.inplace_violation(before, decode_graph.state_tensors([{"recurrent": s}])) is None
    s.add_(1)  # in place: fine
    assert decode_graph.inplace_violation(before, decode_graph.state_tensors([{"recurrent": s}])) is None
    msg = decode_graph.inplace_violation(before, decode_graph.state_tensors([{"recurrent": s + 1}]))
    assert "states[0]['recurrent']" in msg and "in place" in msg


GRAPH_SAFE = [m for m in ("softmax", "deltanet", "gated_deltanet", "gated_deltaproduct", "nsa") if m in ALL]


def _tiny_model_and_cache(mixer, prompt=12, extra=16, sets=()):
    sets = ["n_layer=2", "n_embd=32", "n_head=2", *sets]
    if mixer == "nsa":
        sets += ["nsa.n_kv_head=1", "nsa.head_dim=16", "nsa.block_size=4", "nsa.block_counts=2", "nsa.window_size=8"]
    shape = resolve_shapes([mixer], match=False, sets=sets)[0]
    m = build_model(bench_config(shape.cfg, prompt + extra), "cpu").eval()
    torch.manual_seed(1)
    with torch.no_grad():
        cache = m.new_cache(2, prompt + extra)
        m(torch.randint(0, 65, (2, prompt)), cache=cache)
    return m, cache


@pytest.mark.parametrize("mixer,sets", [(m, ()) for m in GRAPH_SAFE] + [("softmax", ("pos_emb=rope",))])
def test_decode_step_is_graph_safe(mixer, sets):
    """In-place state updates and no host-side position: what a CUDA-graph replay needs (CPU proxy)."""
    m, cache = _tiny_model_and_cache(mixer, sets=sets)
    tokens = torch.randint(0, 65, (4, 2, 1))
    assert decode_graph.host_frozen_check(m, cache, tokens) is None


def test_compiled_decode_step_compiles_once_and_matches_eager():
    """`--compile`: the blocks are compiled (regional: one graph serves every layer) and run with frozen
    host counters, so dynamo never recompiles; the (graph-safe) step still advances the device state
    exactly as eager steps do; afterwards the blocks run eagerly again."""
    m, cache = _tiny_model_and_cache("gated_deltanet" if "gated_deltanet" in ALL else "softmax")
    ref = copy.deepcopy(cache)
    tok = torch.zeros(2, 1, dtype=torch.long)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step():
        return m(tok, cache=cache)[0]

    with torch.no_grad():
        with decode_graph.compiled_blocks(m, backend=counting_backend):
            run = decode_graph.frozen_host(step, cache)
            for i, t in enumerate(torch.randint(0, 65, (4, 2, 1))):
                tok.copy_(t)
                got = run()
                with torch.compiler.set_stance("force_eager"):
                    want = m(t, cache=ref)[0]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                if i == 0:
                    n_first = len(graphs)
        assert n_first == 1, f"{n_first} graphs for {len(m.blocks)} blocks: the blocks did not share one"
        assert len(graphs) == n_first, "the decode step was recompiled"
        m(tok, cache=ref)
        assert len(graphs) == n_first and all(b._compiled_call_impl is None for b in m.blocks)
    torch._dynamo.reset()


@pytest.mark.skipif("nsa" not in ALL, reason="nsa not registered")
def test_host_frozen_check_catches_a_host_position():
    """A decode step whose result depends on the Python-side position (as a slice cache[:pos] would):
    a graph replay would not see it advance, and the check says so."""
    m, cache = _tiny_model_and_cache("softmax")
    mixer = m.blocks[0].mixer
    orig = mixer.forward

    def host_reading(x, state=None):
        y, st = orig(x, state)
        return y + st.pos, st

    mixer.forward = host_reading
    reason = decode_graph.host_frozen_check(m, cache, torch.randint(0, 65, (4, 2, 1)))
    assert reason is not None and "host" in reason


# ------------------------------------------------------------------ memory


def test_find_threshold_doubles_then_bisects_to_tolerance():
    calls = []

    def fake(T):  # out of memory above 5000 tokens
        calls.append(T)
        return {"oom": T > 5000, "step_s": 0.001}

    points, s = memory.find_threshold(fake, 256, 2**20, tol=0.1)
    assert calls[:6] == [256, 512, 1024, 2048, 4096, 8192]
    assert s["limited_by"] == "oom" and s["fits"] <= 5000 < s["first_oom"]
    assert s["first_oom"] / s["fits"] <= 1.1
    assert [T for T, _ in points] == calls

    _, s = memory.find_threshold(lambda T: {"oom": False, "step_s": 0.0}, 256, 2048)
    assert s == {"fits": 2048, "first_oom": None, "limited_by": "max_len", "ratio": None}

    # quadratic step times: stop growing before the predicted step overruns the budget
    _, s = memory.find_threshold(lambda T: {"oom": False, "step_s": (T / 1024) ** 2}, 256, 2**20, time_budget_s=10)
    assert s["limited_by"] == "time_budget" and s["fits"] == 2048


def test_find_threshold_retimes_repeated_small_spikes_too():
    """Small spikes at every new length add up: a first step that pays about a second of compilation at
    each new length (4.4 s at 32,768) against ~0.07 s steady would, counted as steady time, stop the search at
    32,768 on a 10 s budget. Retimed, the search reaches the real out-of-memory point."""
    first_step = {256: 0.72, 512: 0.84, 1024: 0.90, 2048: 0.92, 4096: 0.07, 8192: 1.26, 16384: 0.84,
                  32768: 4.39}
    seen = set()

    def fake(T):
        first = T not in seen
        seen.add(T)
        if T > 150_000:
            return {"oom": True}
        steady = 0.07 * max(1.0, T / 16384)
        return {"oom": False, "step_s": first_step.get(T, 2 * steady) if first else steady}

    points, s = memory.find_threshold(fake, 256, 2**20, tol=0.1, time_budget_s=10)
    assert s["limited_by"] == "oom" and s["fits"] <= 150_000 < s["first_oom"]
    assert {T for T, r in points if "first_step_s" in r} >= {256, 512, 1024, 2048, 8192, 16384, 32768}


def test_oom_in_process_is_a_result_and_frees_the_step():
    shape = resolve_shapes(["softmax"], match=False, sets=["n_layer=2", "n_embd=32", "n_head=2"])[0]
    cfg = bench_config(shape.cfg, 0)
    prec = precision("float32", "cpu", inference=False)
    r = memory.measure_in_process(cfg, 64, 2, "cpu", prec, oom_above=32)
    assert r["oom"] is True and "simulated out of memory" in r["error"]
    assert memory.LAST_MODEL is not None and memory.LAST_MODEL() is None, "the failed step's model is still alive"
    r = memory.measure_in_process(cfg, 32, 2, "cpu", prec, oom_above=32)  # the process is still usable
    assert r["oom"] is False and r["error"] is None and r["step_s"] > 0


def test_memory_cli_bisects_to_the_injected_threshold(tmp_path):
    out = tmp_path / "mem.jsonl"
    rc = main(["bench", "memory", *tiny_args(["deltanet", "softmax"]), "--start", "16", "--max_len", "1024",
               "--simulate_oom_above", "100", "--no_isolate", "--json", str(out)])
    assert rc == 0
    rows = read_rows(out)
    for m in ("deltanet", "softmax"):
        pts = [r for r in rows if r["mixer"] == m and r["metric"] == "peak_memory_mb"]
        assert [r["context"] for r in pts[:4]] == [16, 32, 64, 128]
        for r in pts:
            assert r["oom"] == (r["context"] > 100) and r["batch"] == 4
            assert (r["error"] is None) != r["oom"]
            assert r["value"] > 0 and r["unit"].startswith("MiB")
        (s,) = [r for r in rows if r["mixer"] == m and r["metric"] == "oom_threshold"]
        assert s["limited_by"] == "oom" and s["value"] <= 100 < s["first_oom"] and s["first_oom"] / s["value"] <= 1.1


def test_memory_cpu_child_process_measures_rss(tmp_path):
    """The default CPU path: one child process per point, its peak RSS; an OOM in the child is a row."""
    out = tmp_path / "mem.jsonl"
    rc = main(["bench", "memory", *tiny_args(["softmax"]), "--start", "32", "--max_len", "64",
               "--simulate_oom_above", "32", "--tol", "1", "--json", str(out)])
    assert rc == 0
    rows = read_rows(out)
    pts = [r for r in rows if r["metric"] == "peak_memory_mb"]
    assert [(r["context"], r["oom"]) for r in pts] == [(32, False), (64, True)]
    ok = pts[0]
    assert ok["isolated"] and ok["value"] >= ok["baseline_rss_mb"] > 50  # a Python with torch loaded
    assert "simulated out of memory" in pts[1]["error"]
    (s,) = [r for r in rows if r["metric"] == "oom_threshold"]
    assert s["value"] == 32 and s["first_oom"] == 64


# ------------------------------------------------------------------ throughput


def test_crossover_interpolates_in_log_context():
    soft = {256: 100.0, 512: 80.0, 1024: 50.0}
    assert throughput.crossover(soft, {256: 50.0, 512: 80.0, 1024: 100.0})[0] == pytest.approx(512)
    T, how = throughput.crossover(soft, {256: 50.0, 512: 60.0, 1024: 100.0})
    assert 512 < T < 1024 and "interpolated" in how
    assert throughput.crossover(soft, {256: 10.0, 512: 10.0, 1024: 10.0})[0] is None
    assert throughput.crossover(soft, {256: 200.0, 512: 200.0, 1024: 200.0})[0] == 256


def test_throughput_rows_and_crossovers(tmp_path):
    out = tmp_path / "tp.jsonl"
    rc = main(["bench", "throughput", *tiny_args(), "--contexts", "16,32", "--tokens_per_batch", "64",
               "--steps", "2", "--warmup_steps", "1", "--json", str(out)])
    assert rc == 0
    rows = read_rows(out)
    pts = [r for r in rows if r["metric"] == "train_tokens_per_s"]
    assert sorted((r["mixer"], r["context"]) for r in pts) == sorted((m, T) for m in ALL for T in (16, 32))
    for r in pts:
        assert r["error"] is None and r["value"] > 0 and r["batch"] * r["context"] == 64 and r["repeats"] == 2
    cross = {r["mixer"]: r for r in rows if r["metric"] == "crossover_context"}
    assert set(cross) == set(ALL) - {"softmax"}
    for r in cross.values():
        assert r["value"] is None or 16 <= r["value"] <= 32
        assert set(r["ratios"]) == {"16", "32"}


# ------------------------------------------------------------------ all / CLI


def test_bench_all_runs_the_three(tmp_path, capsys):
    out = tmp_path / "all.jsonl"
    rc = main(["bench", "all", *tiny_args(["softmax", "deltanet"]), "--prompt_lens", "8", "--decode_steps", "3",
               "--decode_warmup", "1", "--prefill_repeats", "1", "--start", "16", "--max_len", "32", "--no_isolate",
               "--contexts", "16", "--tokens_per_batch", "32", "--steps", "1", "--warmup_steps", "1",
               "--json", str(out)])
    assert rc == 0
    rows = read_rows(out)
    assert {r["bench"] for r in rows} == {"latency", "memory", "throughput"}
    text = capsys.readouterr().out
    for title in ("latency (batch 1", "memory: one training step", "throughput: training tokens/s", "\nsummary\n"):
        assert title in text


def test_a_single_mixer_bench_process_is_captured_under_its_mixer(tmp_path, monkeypatch, capsys):
    """ATTNBENCH_FLA_CAPTURE records per mixer, so only a one-mixer process (as sweeps run them) captures."""
    events = record_fla_captures(monkeypatch)
    monkeypatch.setenv(fla_preload.CAPTURE_ENV, str(tmp_path / "cap"))
    args = ["--contexts", "16", "--tokens_per_batch", "32", "--steps", "1", "--warmup_steps", "1"]
    assert main(["bench", "throughput", *tiny_args(["deltanet"]), *args]) == 0
    assert events == [("deltanet", "bench"), "left"]
    assert main(["bench", "throughput", *tiny_args(["softmax", "deltanet"]), *args]) == 0
    assert len(events) == 2 and "one mixer per bench process" in capsys.readouterr().out


def test_wait_for_holds_the_measurement_until_the_go_file(tmp_path):
    """`--wait_for FILE` (how a sweep starts the next benchmark while one measures): the process starts up,
    says so and measures nothing until FILE exists."""
    root = Path(__file__).resolve().parents[1]
    out, go = tmp_path / "rows.jsonl", tmp_path / "go"
    cmd = [sys.executable, "-m", "attnbench", "bench", "throughput", *tiny_args(["softmax"]), "--contexts", "16",
           "--tokens_per_batch", "32", "--steps", "1", "--warmup_steps", "1", "--json", str(out), "--wait_for", str(go)]
    p = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("waiting for" in line for line in lines):
            line = p.stdout.readline()
            assert line, "".join(lines)  # ended without waiting
            lines.append(line)
        time.sleep(1.0)
        assert p.poll() is None and not out.exists()  # still waiting, nothing measured
        go.touch()
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, rest
    assert "go after" in rest and [r["mixer"] for r in read_rows(out) if r["metric"] == "train_tokens_per_s"] == ["softmax"]


def test_cli_errors_are_clean(capsys):
    assert main(["bench", "latency", "--device", "cpu", "--mixers", "sofmax", "--no_match"]) == 2
    assert "did you mean 'softmax'" in capsys.readouterr().err
    assert main(["bench", "latency", "--device", "cpu", "--cuda_graph", "--mixers", "softmax", "--no_match"]) == 2
    assert "--cuda_graph needs --device cuda" in capsys.readouterr().err
    assert main(["bench", "throughput", "--device", "cpu", "--cuda_graph", "on", "--mixers", "softmax", "--no_match"]) == 2
    assert "--cuda_graph needs --device cuda" in capsys.readouterr().err
    assert main(["bench", "latency", "--device", "cpu", "--compile", "--mixers", "softmax", "--no_match"]) == 2
    assert "--compile compiles the CUDA-graph decode step" in capsys.readouterr().err
    assert main(["bench", "memory", "--device", "cpu", "--set", "n_layr=2", "--no_match"]) == 2
    assert "did you mean 'n_layer'" in capsys.readouterr().err


def test_parse_counts():
    assert options.parse_counts("128,1k,1Mi") == [128, 1000, 2**20]
    assert options.parse_counts([64, "4k"]) == [64, 4000]
    assert options.parse_counts(None) is None


def test_find_threshold_retimes_a_compilation_spike_instead_of_stopping():
    """A first step at a new shape that paid Triton autotuning (16 s where the trend says 0.06 s) is timed
    again; growth goes on to the real out-of-memory point."""
    seen = set()

    def fake(T):  # 0.01 s per step, but the first step at T >= 1024 takes 100 s; OOM above 20000
        first = T not in seen
        seen.add(T)
        if T > 20000:
            return {"oom": True}
        return {"oom": False, "step_s": 100.0 if (first and T >= 1024) else 0.01}

    points, s = memory.find_threshold(fake, 256, 2**20, tol=0.1, time_budget_s=20)
    assert s["limited_by"] == "oom" and s["fits"] <= 20000 < s["first_oom"]
    retimed = [r for T, r in points if "first_step_s" in r]
    assert retimed and all(r["first_step_s"] == 100.0 and r["step_s"] == 0.01 for r in retimed)


# ------------------------------------------------------------------ options from a sweep file


def test_check_options_accepts_the_options_of_the_named_benches():
    opts = {"prompt_lens": [64, 256], "decode_steps": 10, "start": 128, "max_len": "1Mi", "tol": 0.2,
            "time_budget_s": 10, "contexts": "64,1k", "tokens_per_batch": "64k", "no_isolate": True,
            "cuda_graph": False, "compile": True, "dtype": "float32", "set": ["n_layer=2"]}
    options.check_options(opts, ["all"], "sweep.toml [bench.options]")
    options.check_options({"batch": 2, "prompt_lens": [8]}, ["latency", "memory"], "w")


@pytest.mark.parametrize("opts,benches,match", [
    ({"decode_step": 3}, ["latency"], r"^w: unknown option 'decode_step' .*did you mean 'decode_steps'"),
    ({"contexts": [16]}, ["latency"], r"unknown option 'contexts' for `attnbench bench latency`"),
    ({"batch": 2}, ["all"], r"unknown option 'batch' for `attnbench bench all`"),  # `all` runs default batches
    ({"device": "cpu"}, ["latency"], r"^w: device is not a benchmark option.*remove it"),
    ({"json": "x"}, ["memory"], r"json is not a benchmark option"),
    ({"decode_steps": "10"}, ["latency"], r"^w: decode_steps = '10': expected a whole number"),
    ({"decode_steps": True}, ["latency"], r"decode_steps = True: expected a whole number"),
    ({"no_isolate": "yes"}, ["memory"], r"no_isolate = 'yes': expected true or false"),
    ({"tokens_per_batch": "64q"}, ["throughput"], r"^w: tokens_per_batch: cannot read tokens_per_batch '64q'"),
    ({"prompt_lens": [64, "x"]}, ["latency"], r"^w: prompt_lens: cannot read"),
    ({"prompt_lens": [True]}, ["latency"], r"prompt_lens = \[True\]: expected a list of counts"),
    ({"tol": "0.1"}, ["memory"], r"tol = '0.1': expected a number"),
    ({"dtype": "fp16"}, ["latency"], r"dtype = 'fp16': expected one of 'auto', 'float32'"),
    ({"cuda_graph": "yes"}, ["throughput"], r"cuda_graph = 'yes': expected one of 'auto', 'on', 'off' \(or true/false\)"),
    ({"set": ["n_layer"]}, ["latency"], r"set = \['n_layer'\]: expected a list of 'KEY=VALUE'"),
    ({}, ["latncy"], r"^w: unknown benchmark 'latncy'; did you mean 'latency'"),
])
def test_check_options_names_the_bad_key(opts, benches, match):
    with pytest.raises(ConfigError, match=match):
        options.check_options(opts, benches, "w")


def test_options_to_argv_writes_the_flags_of_one_bench():
    opts = {"prompt_lens": [64, 256], "decode_steps": 10, "start": 128, "tokens_per_batch": "64k",
            "no_isolate": True, "compile": False, "cuda_graph": False, "set": ["n_layer=2", "nsa.block_size=4"],
            "dtype": "float32", "tol": 0.2}
    assert options.options_to_argv(opts, "latency") == [
        "--prompt_lens", "64,256", "--decode_steps", "10", "--cuda_graph", "off",
        "--set", "n_layer=2", "--set", "nsa.block_size=4", "--dtype", "float32"]
    assert options.options_to_argv(opts, "memory") == [
        "--start", "128", "--no_isolate", "--set", "n_layer=2", "--set", "nsa.block_size=4", "--dtype", "float32",
        "--tol", "0.2"]
    assert options.options_to_argv({"tokens_per_batch": "64k", "cuda_graph": True, "set": "n_layer=2"},
                                   "throughput") == ["--tokens_per_batch", "64k", "--cuda_graph", "on",
                                                     "--set", "n_layer=2"]
    assert options.options_to_argv({"batch": 2, "prompt_lens": [8]}, "all") == ["--prompt_lens", "8"]
    with pytest.raises(ConfigError, match="unknown option 'decode_step'.*did you mean 'decode_steps'"):
        options.options_to_argv({"decode_step": 3}, "latency")


@pytest.mark.parametrize("bench", ["latency", "memory", "throughput", "all"])
def test_options_to_argv_is_what_the_cli_parses(bench):
    """Every option a sweep file may give reaches the bench command line as the same value."""
    opts = {"prompt_lens": [64, 256], "decode_steps": 10, "batch": 2, "start": "1k", "max_len": "1Mi",
            "tol": 0.2, "no_isolate": True, "contexts": [16, 32], "tokens_per_batch": "64k", "steps": 3,
            "compile": True, "cuda_graph": "off", "dtype": "float32", "set": ["n_layer=2"]}
    opts = {k: v for k, v in opts.items() if k in options.option_fields(bench)}
    options.check_options(opts, [bench], "w")
    root = argparse.ArgumentParser()
    cli.register_cli(root.add_subparsers())
    ns = root.parse_args(["bench", bench, *options.options_to_argv(opts, bench)])
    want = {"prompt_lens": [64, 256], "start": 1000, "max_len": 2**20, "contexts": [16, 32], "tokens_per_batch": 64000}
    for k, v in opts.items():
        assert getattr(ns, k) == want.get(k, v), k
