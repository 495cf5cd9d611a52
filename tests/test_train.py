"""Training loop guarantees: learning, exact resume after a kill, crash-safe checkpoints, NaN guard, DDP."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnbench
from attnbench import checkpoint as ck
from attnbench.errors import AttnbenchError
from attnbench.files import read_jsonl
from attnbench.sample import load_run
from conftest import tiny_run_config
from helpers import record_fla_captures

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def run_cli(cfg: dict, tmp_path: Path, *extra: str, env: dict | None = None, name="cfg.toml") -> subprocess.CompletedProcess:
    import tomli_w

    p = tmp_path / name
    p.write_text(tomli_w.dumps(cfg))
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "attnbench", "train", str(p), *extra], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=300)


def test_training_lowers_loss_and_writes_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    s = attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 60, "train.eval_interval": 30}))
    rows = read_jsonl(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5
    assert s["best_val_loss"] == min(vals) and (out / "summary.json").is_file() and (out / "config.json").is_file()
    for k in ("best_val_ppl", "best_val_bpc", "tokens_per_s", "ms_per_iter", "peak_mem_mb", "n_params"):
        assert s[k] > 0
    # cumulative training FLOPs = tokens x the mixer-specific analytic count
    from attnbench.config import RunConfig
    from attnbench.flops import train_flops_per_token

    saved = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert s["train_flops_per_token"] == train_flops_per_token(saved.model)
    assert s["flops"] == s["tokens"] * s["train_flops_per_token"] and s["train_flops_per_token"] > 0
    assert all(r["flops"] == r["tokens"] * s["train_flops_per_token"] for r in rows)
    assert all({"step", "loss", "lr", "tokens_per_s", "peak_mem_mb"} <= r.keys() for r in rows if "loss" in r)
    # process_s: wall time since the process began the run (startup, evaluations and checkpoints included)
    ps = [r["process_s"] for r in rows]
    assert ps == sorted(ps) and all(r["process_s"] >= r["train_time_s"] for r in rows)
    assert ck.latest_checkpoint(out) is not None


@pytest.mark.parametrize("mixer,op", [("gated_deltanet", "gated_delta_rule"), ("softmax", None)])
def test_summary_says_which_op_backends_trained(tiny_data, tmp_path, mixer, op):
    """The summary names the kernels behind its figures: here (CPU) the delta ops' PyTorch backend."""
    s = attnbench.train(tiny_run_config(tiny_data, tmp_path / "run", **{"model.mixer": mixer, "train.max_iters": 2}))
    if op is None:  # softmax calls no dispatched op (PyTorch SDPA)
        assert s["op_backends"] == {}
    else:
        assert s["op_backends"][op] == "torch" and set(s["op_backends"].values()) == {"torch"}


def test_a_run_is_captured_for_the_fla_preload_under_its_mixer(tiny_data, tmp_path, monkeypatch):
    """ATTNBENCH_FLA_CAPTURE: the whole run (its first steps compile the kernels) sits in the capture."""
    events = record_fla_captures(monkeypatch)
    attnbench.train(tiny_run_config(tiny_data, tmp_path / "run", **{"model.mixer": "deltanet", "train.max_iters": 1}))
    assert events == [("deltanet", "train"), "left"]


@pytest.mark.fault("sigkill-mid-run")
def test_resume_after_kill_is_bit_for_bit(tiny_data, tmp_path):
    """20 iterations straight == 10, SIGKILL at 15, resume from the step-10 checkpoint to 20."""
    cfg = tiny_run_config(tiny_data, tmp_path / "straight", **{"model.dropout": 0.1})
    assert run_cli(cfg, tmp_path).returncode == 0
    cfg["train"]["out_dir"] = str(tmp_path / "killed")
    r = run_cli(cfg, tmp_path, env={"ATTNBENCH_TEST_KILL_AT_STEP": "15"})
    assert r.returncode == -9, r.stderr
    assert not (tmp_path / "killed" / "summary.json").exists()
    r = run_cli(cfg, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 21))  # every step exactly once
    assert a == b  # bit-for-bit on the CPU
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sa["final_val_loss"] == sb["final_val_loss"]


@pytest.mark.fault("run-overwrite", "resume-other-settings")
def test_refuses_to_overwrite_and_checks_resume_config(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out, **{"train.max_iters": 10})
    attnbench.train(cfg)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(AttnbenchError, match="--resume"):
        attnbench.train(cfg)
    with pytest.raises(AttnbenchError, match="learning_rate"):
        attnbench.train(cfg, {"resume": True, "learning_rate": 1e-2})
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.fault("ckpt-write-killed", "ckpt-latest-lost")
def test_killed_checkpoint_write_keeps_previous(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 10}))
    good = ck.latest_checkpoint(out)
    model, _ = load_run(out)

    def dying_save(*a, **k):  # the process dies after the weights, before the state file
        raise SystemExit("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(SystemExit):
        ck.save_checkpoint(out, 99, model, {"x": 1})
    monkeypatch.undo()
    assert ck.latest_checkpoint(out) == good
    st = ck.load_checkpoint(good, model)
    assert st["step"] == 10
    # a torn latest.json (killed while renaming is atomic, but be robust to a lost file) falls back to the newest folder
    (out / "ckpt" / "latest.json").unlink()
    assert ck.latest_checkpoint(out) == good


@pytest.mark.fault("nan-loss")
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out, **{"optim.learning_rate": 1e12, "optim.min_lr": 0, "optim.warmup_iters": 0,
                                             "optim.grad_clip": 0.0, "train.max_iters": 40})
    with pytest.raises(AttnbenchError, match="non-finite|nan|inf") as e:
        attnbench.train(cfg)
    assert "last good checkpoint (step 0)" in str(e.value) or "step 10" in str(e.value)
    good = ck.latest_checkpoint(out)
    model, _ = load_run(out)
    st = ck.load_checkpoint(good, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "summary.json").exists()
    assert st["step"] in (0, 10)


def test_wandb_missing_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    out = tmp_path / "run"
    with pytest.raises(AttnbenchError, match=r"attnbench\[wandb\]"):
        attnbench.train(tiny_run_config(tiny_data, out, **{"log.wandb_log": True}))
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process_with_doubled_accumulation(tiny_data, tmp_path):
    base = {"train.max_iters": 6, "train.eval_interval": 6, "train.gradient_accumulation_steps": 2}
    one = tiny_run_config(tiny_data, tmp_path / "one", **base)
    assert run_cli(one, tmp_path, name="one.toml").returncode == 0
    two = tiny_run_config(tiny_data, tmp_path / "two", **base)
    import tomli_w

    (tmp_path / "two.toml").write_text(tomli_w.dumps(two))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", "-m", "attnbench", "train", str(tmp_path / "two.toml")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sb["world_size"] == 2
    assert abs(sa["final_val_loss"] - sb["final_val_loss"]) < 1e-4


def test_resume_after_final_checkpoint_does_not_evaluate_twice(tiny_data, tmp_path):
    """Killed between the final checkpoint and summary.json: resuming only writes the summary."""
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out, **{"train.max_iters": 10})
    first = attnbench.train(cfg)
    (out / "summary.json").unlink()
    rows_before = read_jsonl(out / "metrics.jsonl")
    again = attnbench.train(cfg, {"resume": True})
    assert read_jsonl(out / "metrics.jsonl") == rows_before
    assert again["final_val_loss"] == first["final_val_loss"] and (out / "summary.json").is_file()


def test_resume_in_a_moved_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out, **{"train.max_iters": 10})
    attnbench.train(cfg)
    (out / "summary.json").unlink()
    moved = tmp_path / "moved"
    out.rename(moved)
    cfg["train"]["out_dir"] = str(moved)
    assert attnbench.train(cfg, {"resume": True, "max_iters": 12})["steps"] == 12


def test_wandb_offline_logging(tiny_data, tmp_path, monkeypatch):
    """wandb_log=true with WANDB_MODE=offline writes an offline W&B run beside the run's own files."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 10, "log.wandb_log": True}))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in runs[0].iterdir())
    assert (out / "summary.json").is_file()


def test_compile_scopes_train_like_eager_and_blocks_share_one_graph(tiny_data, tmp_path):
    """train.compile with compile_scope "blocks" (regional: one graph reused by every layer) and "model"
    (one graph for the whole model), and with compile_mode "reduce-overhead", follows the eager run's
    losses; "blocks" traces one layer, not all of them."""
    from torch._dynamo.utils import counters

    runs, captured = {}, {}
    for scope in (None, "blocks", "model", "model+reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        over = {"train.max_iters": 6, "train.eval_interval": 6, "model.n_layer": 3}
        if scope:
            sc, _, mode = scope.partition("+")
            over.update({"train.compile": True, "train.compile_scope": sc, "train.compile_mode": mode or "default"})
        s = attnbench.train(tiny_run_config(tiny_data, tmp_path / str(scope), **over))
        runs[scope] = losses(tmp_path / str(scope))
        captured[scope] = counters["stats"]["calls_captured"]
        assert s["compile"] == (scope.partition("+")[0] if scope else False)
        assert s["compile_mode"] == ((scope.partition("+")[2] or "default") if scope else None)
    torch._dynamo.reset()
    # "blocks" traces one layer's ops (its graph is reused by the other layers), "model" all three
    assert 0 < captured["blocks"] < captured["model"] / 2, captured
    for scope in ("blocks", "model", "model+reduce-overhead"):
        for step, loss in runs[None].items():
            assert abs(runs[scope][step] - loss) < 1e-4, (scope, step, runs[scope][step], loss)


def test_bad_compile_scope_or_mode_is_a_config_error():
    from attnbench.resolve import load_config
    from attnbench.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile_scope.*blocks"):
        load_config("configs/shakespeare_char.toml", ["--compile_scope=block"])
    with pytest.raises(ConfigError, match="train.compile_mode.*reduce-overhead"):
        load_config("configs/shakespeare_char.toml", ["--compile_mode=reduce_overhead"])


def test_evaluation_runs_compiled_blocks_eagerly_so_only_the_training_step_compiles(tiny_data, tmp_path):
    """Evaluations (step 0, every eval_interval, the end) run torch.compile'd blocks eagerly: one graph
    (the training step's) is compiled, not a second eval-mode one (a compilation costs minutes on a GPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    over = {"train.max_iters": 6, "train.eval_interval": 2, "model.n_layer": 3, "model.dropout": 0.1,
            "train.compile": True}
    s = attnbench.train(tiny_run_config(tiny_data, tmp_path / "r", **over))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1, dict(counters["stats"])
    assert s["compile"] == "blocks" and len([r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "val_loss" in r]) == 4
