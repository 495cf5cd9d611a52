"""Preemption: SIGTERM or SIGUSR1 stops training at a step boundary with a checkpoint and exit status 75;
`--resume` then ends exactly where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it

import attnbench
from attnbench import checkpoint as ck
from attnbench.files import read_jsonl
from attnbench.preemption import EXIT_PREEMPTED, Preempted
from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
ITERS = 200
pytestmark = pytest.mark.usefixtures("one_thread")


def config(data: Path, out: Path, **over) -> dict:
    return tiny_run_config(data, out, **{"model.dropout": 0.1, "train.max_iters": ITERS, "train.eval_interval": 50,
                                         **over})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    attnbench.train(config(tiny_data, out))
    return out


@pytest.mark.fault("sigterm-mid-run", "sigusr1-mid-run")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_mid_run_checkpoints_exits_75_and_resumes_exactly(tiny_data, straight, tmp_path, sig):
    out = tmp_path / "run"
    (tmp_path / "cfg.toml").write_text(tomli_w.dumps(config(tiny_data, out)))
    cmd = [sys.executable, "-m", "attnbench", "train", str(tmp_path / "cfg.toml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while max(losses(out), default=0) < 5:  # mid-run: after a few steps, between checkpoints
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err
    done = max(losses(out))
    assert 5 <= done < ITERS and f"stopped by {sig.name} after step {done}" in err and "--resume" in err
    newest = ck.resume_checkpoint(out)
    assert newest.name.startswith(f"step_{done:07d}-") and ck.verify_checkpoint(newest) is None
    assert sorted(losses(out)) == list(range(1, done + 1))  # every finished step logged
    assert not (out / "summary.json").exists()

    r = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(straight)  # bit-for-bit on the CPU, every step once
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert a["final_val_loss"] == b["final_val_loss"] and a["best_val_loss"] == b["best_val_loss"]


@pytest.mark.fault("sigterm-during-ckpt-write")
def test_sigterm_during_a_checkpoint_write_completes_it(tiny_data, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config(tiny_data, out, **{"train.log_interval": 4, "train.keep_checkpoints": 3})
    real_save = ck.save_model
    writes = []

    def save_and_signal(model, filename):  # the signal lands while the step-50 weights are being written
        writes.append(filename)
        if len(writes) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        return real_save(model, filename)

    monkeypatch.setattr(ck, "save_model", save_and_signal)
    with pytest.raises(Preempted) as e:
        attnbench.train(cfg)
    monkeypatch.undo()
    assert e.value.step == 50 and e.value.signame == "SIGTERM"
    folders = sorted(p for p in (out / "ckpt").iterdir() if p.is_dir())
    assert [p.name[:12] for p in folders] == ["step_0000000", "step_0000050"]
    assert all(ck.verify_checkpoint(p) is None for p in folders) and e.value.checkpoint == folders[-1]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][-2:] == [48, 50]  # the partial interval (49-50) is logged
    s = attnbench.train(cfg, {"resume": True})
    assert s["final_val_loss"] == json.loads((straight / "summary.json").read_text())["final_val_loss"]
