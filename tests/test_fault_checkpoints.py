"""Damaged checkpoints: resuming and sampling fall back to the newest intact one, name the damaged folder
and keep it; with none intact, a clear error; pruning never deletes a damaged folder."""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import attnbench
from attnbench import checkpoint as ck
from attnbench.cli import main
from attnbench.files import read_jsonl
from attnbench.sample import load_run
from conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """A 20-step run with checkpoints at steps 10 and 20 (copied by each test)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_run_config(tiny_data, out)
    attnbench.train(cfg)
    return out, cfg


def copy_run(trained, tmp_path: Path) -> tuple[Path, dict]:
    src, cfg = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "summary.json").unlink()  # as if killed after its last checkpoint
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["out_dir"] = str(out)
    return out, cfg


def folder_of(out: Path, step: int) -> Path:
    (f,) = [p for p in (out / "ckpt").iterdir() if p.name.startswith(f"step_{step:07d}-")]
    return f


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncated":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit flipped in the middle: the tensor data, not the header
        data[len(data) // 2] ^= 0x10
        file.write_bytes(bytes(data))


CASES = [pytest.param(ck.MODEL_FILE, "truncated", marks=pytest.mark.fault("ckpt-model-truncated")),
         pytest.param(ck.MODEL_FILE, "bitflip", marks=pytest.mark.fault("ckpt-model-bitflip")),
         pytest.param(ck.STATE_FILE, "truncated", marks=pytest.mark.fault("ckpt-state-truncated")),
         pytest.param(ck.STATE_FILE, "bitflip", marks=pytest.mark.fault("ckpt-state-bitflip"))]


@pytest.mark.parametrize("file,how", CASES)
def test_damaged_newest_checkpoint_falls_back_and_is_kept(trained, tmp_path, caplog, file, how):
    out, cfg = copy_run(trained, tmp_path)
    bad, good = folder_of(out, 20), folder_of(out, 10)
    damage(bad / file, how)
    bad_files, good_files = digest(bad), digest(good)
    assert file in ck.verify_checkpoint(bad)

    with caplog.at_level(logging.WARNING, logger="attnbench.checkpoint"):  # sample: the step-10 weights
        model, _ = load_run(out)
    assert f"{bad} is damaged" in caplog.text and file in caplog.text
    ref = type(model)(model.config)
    ck.load_checkpoint(good, ref)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    caplog.clear()
    rows_to_10 = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] <= 10]
    with caplog.at_level(logging.WARNING, logger="attnbench.checkpoint"):  # --resume: from step 10, not 0
        s = attnbench.train(cfg, {"resume": True})
    assert f"{bad} is damaged" in caplog.text
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[:len(rows_to_10)] == rows_to_10  # the rows up to the checkpoint stay; 11-20 are redone once
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21)) and s["steps"] == 20
    assert s["final_val_loss"] == json.loads((trained[0] / "summary.json").read_text())["final_val_loss"]
    assert digest(bad) == bad_files and digest(good) == good_files  # the damaged folder is kept as it was


@pytest.mark.fault("ckpt-all-damaged")
def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_touched(trained, tmp_path, capsys):
    out, cfg = copy_run(trained, tmp_path)
    for step in (10, 20):
        damage(folder_of(out, step) / ck.MODEL_FILE, "truncated")
    before = {p.name: digest(p) for p in (out / "ckpt").iterdir() if p.is_dir()}
    metrics = (out / "metrics.jsonl").read_bytes()
    import tomli_w

    (tmp_path / "cfg.toml").write_text(tomli_w.dumps(cfg))
    assert main(["train", str(tmp_path / "cfg.toml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and str(folder_of(out, 10)) in err and str(folder_of(out, 20)) in err
    assert "new --out_dir" in err and "Traceback" not in err
    assert main(["sample", f"--out_dir={out}", "--device=cpu"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err
    assert {p.name: digest(p) for p in (out / "ckpt").iterdir() if p.is_dir()} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / "summary.json").exists()


@pytest.mark.fault("ckpt-damaged-pruning")
def test_pruning_keeps_damaged_folders_and_keep_intact_ones(tmp_path):
    model = torch.nn.Linear(4, 4)
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, model, {"x": step}, keep=2)
    damaged = folder_of(tmp_path, 1)
    damage(damaged / ck.MODEL_FILE, "truncated")
    files = digest(damaged)
    for step in (3, 4, 5):
        ck.save_checkpoint(tmp_path, step, model, {"x": step}, keep=2)
    left = sorted(p.name.split("-")[0] for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert left == ["step_0000001", "step_0000004", "step_0000005"]
    assert digest(damaged) == files
    assert ck.resume_checkpoint(tmp_path) == folder_of(tmp_path, 5)


@pytest.mark.fault("ckpt-no-manifest")
def test_checkpoint_without_manifest_loads_unverified_and_a_cut_one_is_damaged(trained, tmp_path, caplog):
    out, _ = copy_run(trained, tmp_path)
    newest = folder_of(out, 20)
    (newest / ck.MANIFEST).unlink()
    assert ck.verify_checkpoint(newest) is None
    with caplog.at_level(logging.WARNING, logger="attnbench.checkpoint"):
        model, _ = load_run(out)
    assert caplog.text == ""
    assert ck.load_checkpoint(newest, model)["step"] == 20
    damage(newest / ck.MODEL_FILE, "truncated")
    assert ck.MODEL_FILE in ck.verify_checkpoint(newest)
    assert ck.resume_checkpoint(out) == folder_of(out, 10)
    (newest / ck.MODEL_FILE).write_bytes(b"")
    shutil.copy(folder_of(out, 10) / ck.MODEL_FILE, newest / ck.MODEL_FILE)
    damage(newest / ck.STATE_FILE, "truncated")
    assert ck.STATE_FILE in ck.verify_checkpoint(newest)


@pytest.mark.fault("resume-without-checkpoint")
def test_resume_of_a_start_without_checkpoint_says_so_and_logs_each_step_once(trained, tmp_path, capsys):
    out, cfg = copy_run(trained, tmp_path)
    shutil.rmtree(out / "ckpt")  # as a start killed before its first checkpoint leaves it: config and metrics only
    s = attnbench.train(cfg, {"resume": True})
    assert "no checkpoint yet" in capsys.readouterr().out and s["steps"] == 20
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 21))


@pytest.mark.fault("ckpt-latest-empty")
def test_empty_latest_json_falls_back_to_the_newest_intact_folder(trained, tmp_path):
    out, cfg = copy_run(trained, tmp_path)
    (out / "ckpt" / "latest.json").write_text("")
    assert ck.resume_checkpoint(out) == folder_of(out, 20)
    assert attnbench.train(cfg, {"resume": True})["steps"] == 20
