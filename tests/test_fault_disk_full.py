"""A full disk at each write site (checkpoint weights and state, metrics append, summary and report JSON/text
writes, prepared data): every earlier file stays as it was, and the error names the path and the space."""
import errno
import re
import hashlib
import os
from pathlib import Path

import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it

import attnbench
from attnbench import checkpoint as ck
from attnbench import files
from attnbench.cli import main
from attnbench.data import prepare as prep
from attnbench.data import prepare_text
from attnbench.errors import DiskFullError
from attnbench.files import read_jsonl
from conftest import _synthetic_text, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden leftovers too) and its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class TornFile:
    """A file whose write lands `keep` bytes, after which the disk is full."""

    def __init__(self, f, keep: int):
        self.f, self.keep = f, keep

    def write(self, b):
        self.f.write(bytes(b)[: self.keep])
        self.f.flush()
        raise no_space(self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_at(monkeypatch, name_part: str, after: int = 0, keep: int = 5) -> None:
    """attnbench.files' writes to files whose name holds `name_part` hit a full disk, from the
    (after+1)-th such open on."""
    opened = []
    real_open = open

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if name_part in Path(path).name and ("w" in mode or "a" in mode):
            opened.append(path)
            if len(opened) > after:
                return TornFile(f, keep)
        return f

    monkeypatch.setattr(files, "open", fake_open, raising=False)


def train_cli(cfg: dict, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    p = tmp_path / "cfg.toml"
    p.write_text(tomli_w.dumps(cfg))
    rc = main(["train", str(p), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def half_then_full(real, nth: int):
    """`real(obj, path)` whose nth call writes half the file and then finds the disk full."""
    calls = []

    def write(obj, target, *a, **k):
        calls.append(target)
        if len(calls) < nth:
            return real(obj, target, *a, **k)
        real(obj, target, *a, **k)
        if hasattr(target, "write"):  # an open file
            target.truncate(target.tell() // 2)
            raise no_space(target.name)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        raise no_space(target)

    return write


@pytest.mark.fault("enospc-ckpt-weights", "enospc-ckpt-state")
@pytest.mark.parametrize("site", ["weights", "state"])
def test_full_disk_writing_a_checkpoint(tiny_data, tmp_path, monkeypatch, capsys, site):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out)
    if site == "weights":
        monkeypatch.setattr(ck, "save_model", half_then_full(ck.save_model, nth=2))
    else:
        monkeypatch.setattr(ck.torch, "save", half_then_full(ck.torch.save, nth=2))
    before = {}

    real_save = ck.save_checkpoint

    def remember(run_dir, step, *a, **k):  # the run's files just before the step-10 checkpoint
        if step == 10:
            before.update(snapshot(out))
        return real_save(run_dir, step, *a, **k)

    monkeypatch.setattr("attnbench.trainer.save_checkpoint", remember)
    rc, err = train_cli(cfg, tmp_path, capsys)
    assert rc == 2 and "no space left on the device writing" in err and str(out / "ckpt" / "step_0000010-") in err
    assert "needs about" in err and "free in" in err and "last checkpoint (step 0)" in err and "--resume" in err
    assert snapshot(out) == before  # the step-0 checkpoint, latest.json, metrics: as they were; no partial folder
    monkeypatch.undo()
    rc, err = train_cli(cfg, tmp_path, capsys, "--resume")
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 21))


@pytest.mark.fault("enospc-metrics")
def test_full_disk_appending_metrics(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, "metrics.jsonl", after=8)
    rc, err = train_cli(tiny_run_config(tiny_data, out), tmp_path, capsys)
    assert rc == 2 and f"writing {out / 'metrics.jsonl'}" in err and "needs about" in err
    assert "last checkpoint (step 0)" in err
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(read_jsonl(out / "metrics.jsonl")) == 8 == len(text.splitlines())
    assert ck.verify_checkpoint(ck.resume_checkpoint(out)) is None


@pytest.mark.fault("enospc-summary")
def test_full_disk_writing_the_summary(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out)
    fill_disk_at(monkeypatch, "summary.json")
    rc, err = train_cli(cfg, tmp_path, capsys)
    assert rc == 2 and f"writing {out / 'summary.json'}" in err and "needs about" in err
    assert not (out / "summary.json").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    rc, err = train_cli(cfg, tmp_path, capsys, "--resume")  # from the final checkpoint: only the summary is left
    assert rc == 0 and (out / "summary.json").is_file()


@pytest.mark.fault("enospc-report")
def test_full_disk_rewriting_a_report(tmp_path, monkeypatch):
    report = tmp_path / "report" / "report.md"
    files.atomic_write_text(report, "# the previous report\n")
    before = snapshot(tmp_path)
    fill_disk_at(monkeypatch, "report.md")
    with pytest.raises(DiskFullError) as e:
        files.atomic_write_text(report, "# a new report\n" * 1000)
    assert f"writing {report}" in str(e.value) and "needs about 14.6 KiB" in str(e.value)
    assert snapshot(tmp_path) == before


@pytest.mark.fault("enospc-prepare")
def test_full_disk_preparing_data(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    src = tmp_path / "a.txt"
    src.write_text(_synthetic_text(20_000))
    prepare_text(src, "tiny", data_dir=data, verbose=False)
    before = snapshot(data)
    src.write_text(_synthetic_text(30_000, seed=1))
    real = Path.write_bytes

    def full(self, b):
        if "train.bin" in self.name:
            real(self, b[: len(b) // 2])
            raise no_space(self)
        return real(self, b)

    monkeypatch.setattr(prep.Path, "write_bytes", full)
    rc = main(["prepare", "text", f"--input={src}", "--name=tiny", f"--data_dir={data}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"writing {data / 'tiny' / 'train.bin'}" in err
    assert re.search(r"needs about 5\d\.\d KiB \(\d.* free in ", err)  # 2 bytes a token, 90% of ~30,000
    assert snapshot(data) == before
