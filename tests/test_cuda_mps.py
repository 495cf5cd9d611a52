"""The sweep's private CUDA MPS daemon (attnbench/cuda_mps.py), driven through a fake nvidia-cuda-mps-control:
started with its own pipe/log folders, handed to the training children, quit before the benchmarks;
absent or refusing, the runs go on without it."""
import os
import stat
from pathlib import Path

import pytest
import torch

from attnbench import cuda_mps as mps
from attnbench import sweep as sw
from attnbench.config import CONFIGS_DIR
from attnbench.sweep import processes
from attnbench.errors import ConfigError

# Logs each call (arguments, pipe folder, stdin) to $FAKE_MPS_RECORD; `-d` writes a server log; exit code $FAKE_MPS_RC.
FAKE = """#!/usr/bin/env bash
in=""; [ "$#" -eq 0 ] && in=$(cat)
echo "args=[$*] pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$in" >> "$FAKE_MPS_RECORD"
[ "$1" = "-d" ] && echo "server started" > "$CUDA_MPS_LOG_DIRECTORY/server.log"
[ "${FAKE_MPS_RC:-0}" != 0 ] && echo "cannot start: permission denied" >&2
exit ${FAKE_MPS_RC:-0}
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    monkeypatch.setattr(mps, "probe_client", lambda env: None)  # a client gets through (no GPU here)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    f = bindir / mps.CONTROL
    f.write_text(FAKE)
    f.chmod(f.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.txt"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    return record


def test_daemon_starts_with_private_folders_and_quits(fake_control, tmp_path):
    said = []
    with mps.mps_daemon(tmp_path / "logs", said.append) as env:
        assert set(env) == set(mps.ENV_KEYS)
        assert all(Path(d).is_dir() for d in env.values())
        started = fake_control.read_text().splitlines()
        assert started == [f"args=[-d] pipe={env['CUDA_MPS_PIPE_DIRECTORY']} stdin="]
    calls = fake_control.read_text().splitlines()
    assert calls[1] == f"args=[] pipe={env['CUDA_MPS_PIPE_DIRECTORY']} stdin=quit"  # told to quit, same daemon
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()  # its temporary folder is gone
    assert (tmp_path / "logs" / "mps-server.log").read_text() == "server started\n"
    assert any("started" in m for m in said) and any("stopped" in m for m in said)


def test_daemon_quits_when_the_phase_raises(fake_control, tmp_path):
    with pytest.raises(KeyboardInterrupt), mps.mps_daemon(None, lambda m: None):
        raise KeyboardInterrupt
    assert fake_control.read_text().splitlines()[-1].endswith("stdin=quit")


def test_no_binary_or_refusal_means_no_mps(fake_control, tmp_path, monkeypatch):
    said = []
    with mps.mps_daemon(None, said.append, control="no-such-mps-control") as env:
        assert env == {}
    assert "not found" in said[-1]
    monkeypatch.setenv("FAKE_MPS_RC", "1")
    with mps.mps_daemon(None, said.append) as env:
        assert env == {}
    assert "failed" in said[-1] and "permission denied" in said[-1]
    assert len(fake_control.read_text().splitlines()) == 1  # no quit sent to a daemon that never started


def _sweep(cuda_mps: bool) -> sw.Sweep:
    return sw.Sweep(name="t", path=Path("t.toml"), base_config=Path("b.toml"), mixers=["softmax"], cuda_mps=cuda_mps)


def test_only_runs_sharing_a_gpu_use_mps():
    shared = sw.make_slots(["0"], jobs_per_device=5, nproc=1)
    assert sw.wants_mps(_sweep(True), shared)
    assert not sw.wants_mps(_sweep(False), shared)
    assert not sw.wants_mps(_sweep(True), sw.make_slots(["0", "1"], jobs_per_device=1, nproc=1))  # one run per GPU
    assert not sw.wants_mps(_sweep(True), sw.make_slots(["cpu"], jobs_per_device=2, nproc=1))


class _Man:
    def __init__(self):
        self.data, self.saved = {}, 0

    def save(self):
        self.saved += 1


def test_training_phase_children_get_the_daemon_and_lose_it_after(fake_control, tmp_path):
    slots = sw.make_slots(["0"], jobs_per_device=3, nproc=1)
    man = _Man()
    with processes._training_env(_sweep(True), tmp_path, slots, man, training=True):
        pipes = {s.env["CUDA_MPS_PIPE_DIRECTORY"] for s in slots}
        assert len(pipes) == 1 and man.data["cuda_mps"] is True and man.saved
        env = processes._child_env(slots[0].env)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] in pipes and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert not any(k in s.env for s in slots for k in mps.ENV_KEYS)  # benchmarks run outside MPS
    assert fake_control.read_text().splitlines()[-1].endswith("stdin=quit")
    with processes._training_env(_sweep(True), tmp_path, slots, _Man(), training=False):  # nothing to train: no daemon
        pass
    assert len(fake_control.read_text().splitlines()) == 2


def test_sweep_key_is_validated_and_the_bakeoff_preset_sets_it(tmp_path):
    assert sw.load_sweep(CONFIGS_DIR / "sweeps" / "bakeoff.toml").cuda_mps is True
    assert sw.load_sweep(CONFIGS_DIR / "sweeps" / "bakeoff-quick.toml").cuda_mps is False
    base = CONFIGS_DIR / "shakespeare_char.toml"
    f = tmp_path / "s.toml"
    f.write_text(f'base_config = "{base}"\nmixers = ["softmax"]\ncuda_mps = "yes"\n')
    with pytest.raises(ConfigError, match="cuda_mps must be true or false"):
        sw.load_sweep(f)


def test_a_daemon_no_client_gets_through_is_quit_and_not_used(fake_control, tmp_path):
    """The MPS server starts at the first client: a daemon that starts is no proof. A probe client that
    cannot open a CUDA context through it means no MPS (and the daemon quit), not five crashed runs."""
    seen, said = [], []

    def probe(env):
        seen.append(env)
        return "probe client: CUDA error 805"

    with mps.mps_daemon(None, said.append, probe_env={"CUDA_VISIBLE_DEVICES": "3"}, probe=probe) as env:
        assert env == {}
    assert seen[0]["CUDA_VISIBLE_DEVICES"] == "3" and seen[0]["CUDA_MPS_PIPE_DIRECTORY"]
    assert "could not use it" in said[-2] and "CUDA error 805" in said[-2]
    assert fake_control.read_text().splitlines()[-1].endswith("stdin=quit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the probe where no GPU answers")
def test_the_probe_client_reports_why_without_a_gpu():
    why = mps.probe_client(dict(os.environ))
    assert why is not None and why.startswith("probe client:")


def test_a_sweep_under_mps_records_it_per_launch_and_the_report_says_so(fake_control, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    """End to end on the CPU (MPS forced on, the fake daemon): the training children start with the
    daemon's folders, run.json records MPS for each launch, and the report's shared-device footnote
    names it. The progress line gives the best validation loss beside the last."""
    import json

    import tomli_w

    from attnbench.report import build_report
    from conftest import tiny_run_config

    (tmp_path / "base.toml").write_text(tomli_w.dumps(tiny_run_config(tiny_data, tmp_path / "unused")))
    (tmp_path / "s.toml").write_text('base_config = "base.toml"\nmixers = ["softmax"]\nseeds = [1, 2]\n'
                                     'jobs_per_device = 2\ncuda_mps = true\n[overrides]\n"train.max_iters" = 4\n'
                                     '"train.eval_interval" = 2\n[bench]\nenabled = false\n')
    monkeypatch.setattr(processes, "wants_mps", lambda sweep, slots: sweep.cuda_mps)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    man = sw.run_sweep(tmp_path / "s.toml", out=out, devices="cpu", report=False)
    assert man["cuda_mps"] is True and {v["status"] for v in man["runs"].values()} == {"done"}
    for run_id in man["runs"]:
        assert json.loads((out / "runs" / run_id / "run.json").read_text())["launches"][-1]["cuda_mps"] is True
    assert "best val loss" in capsys.readouterr().out
    assert "through CUDA MPS" in build_report(out).read_text()
