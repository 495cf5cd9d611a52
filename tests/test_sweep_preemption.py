"""A sweep's run that is preempted (exit status 75 after a checkpoint) is recorded as interrupted, not
failed, and resumed from its checkpoint by the same sweep."""
import json
from pathlib import Path

import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it

from attnbench.files import read_jsonl
from attnbench.sweep import load_sweep, run_sweep
from conftest import tiny_run_config


@pytest.mark.fault("sweep-run-preempted")
def test_a_preempted_run_is_resumed_not_failed(tiny_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "base.toml").write_text(tomli_w.dumps(tiny_run_config(tiny_data, tmp_path / "unused")))
    (tmp_path / "sweep.toml").write_text('name = "tiny"\nbase_config = "base.toml"\nmixers = ["softmax"]\n'
                                         '[overrides]\n"train.max_iters" = 20\n"train.eval_interval" = 10\n'
                                         '[bench]\nenabled = false\n')
    monkeypatch.setenv("ATTNBENCH_TEST_SIGNAL_AT_STEP", "3:SIGTERM")  # the run's process: SIGTERM after step 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    man = run_sweep(load_sweep(tmp_path / "sweep.toml"), out=tmp_path / "out", devices="cpu", report=False)
    (run_id, run), = man["runs"].items()
    assert run["status"] == "done" and run["attempts"] == 2, run
    assert "preempted" in capsys.readouterr().out
    run_dir = tmp_path / "out" / "runs" / run_id
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert [la["resumed_from_step"] for la in launches] == [None, 3]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == list(range(1, 21))
    assert Path(run_dir / "summary.json").is_file()
