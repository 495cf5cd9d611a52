"""Bad files a user hands in (a binary or non-UTF-8 config, an empty or binary --input, a checkpoint of
another model given to `sample`): exit 2 with the file and the problem named, nothing written."""
import shutil
from pathlib import Path

import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it

import attnbench
from attnbench.cli import main
from attnbench.data import prepare_text
from conftest import _synthetic_text, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")
BINARY = bytes(range(256)) * 4  # NUL bytes and invalid UTF-8


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.fault("config-binary")
def test_binary_config_file(tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(BINARY)
    rc, err = cli(capsys, "train", str(bad), f"--out_dir={tmp_path / 'run'}")
    assert rc == 2 and str(bad) in err and "binary" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.fault("config-not-utf8")
def test_config_file_in_another_encoding(tiny_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_data, tmp_path / "run")
    cfg["log"] = {"wandb_run_name": "café"}
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(tomli_w.dumps(cfg).encode("latin-1"))
    rc, err = cli(capsys, "train", str(bad))
    assert rc == 2 and str(bad) in err and "not UTF-8" in err and "byte" in err and "iconv" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.fault("prepare-empty")
def test_prepare_empty_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    rc, err = cli(capsys, "prepare", "text", f"--input={empty}", "--name=x", f"--data_dir={tmp_path / 'data'}")
    assert rc == 2 and str(empty) in err and "empty" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.fault("prepare-binary")
@pytest.mark.parametrize("data", [BINARY, b"text\0with a NUL byte, valid UTF-8\n" * 10], ids=["invalid-utf8", "nul"])
def test_prepare_binary_input(tmp_path, capsys, data):
    src = tmp_path / "model.bin"
    src.write_bytes(data)
    rc, err = cli(capsys, "prepare", "text", f"--input={src}", "--name=x", f"--data_dir={tmp_path / 'data'}")
    assert rc == 2 and str(src) in err and ("binary" in err or "not valid UTF-8" in err)
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def softmax_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("softmax") / "run"
    attnbench.train(tiny_run_config(tiny_data, out, **{"train.max_iters": 2, "train.eval_interval": 2}))
    return out


def swap_checkpoints(run: Path, other: Path, tmp_path: Path) -> Path:
    """A copy of `run` whose ckpt/ is `other`'s (a folder copied from the wrong run)."""
    dst = tmp_path / "mixed"
    shutil.copytree(run, dst)
    shutil.rmtree(dst / "ckpt")
    shutil.copytree(other / "ckpt", dst / "ckpt")
    return dst


@pytest.mark.fault("sample-other-mixer")
def test_sample_with_another_mixers_checkpoint(tiny_data, softmax_run, tmp_path, capsys):
    other = tmp_path / "deltanet"
    attnbench.train(tiny_run_config(tiny_data, other, **{"model.mixer": "deltanet", "train.max_iters": 2,
                                                          "train.eval_interval": 2}))
    mixed = swap_checkpoints(softmax_run, other, tmp_path)
    rc, err = cli(capsys, "sample", f"--out_dir={mixed}", "--device=cpu", "--max_new_tokens=2")
    assert rc == 2 and "model.safetensors does not fit this model" in err and str(mixed / "ckpt") in err
    assert "another mixer" in err


@pytest.mark.fault("sample-other-vocab")
def test_sample_with_another_tokenizers_checkpoint(softmax_run, tmp_path, capsys):
    data = tmp_path / "data"
    (tmp_path / "t.txt").write_text(_synthetic_text(20_000))
    prepare_text(tmp_path / "t.txt", "tiny", tokenizer="byte", data_dir=data, verbose=False)
    other = tmp_path / "bytes"
    attnbench.train(tiny_run_config(data, other, **{"train.max_iters": 2, "train.eval_interval": 2}))
    mixed = swap_checkpoints(softmax_run, other, tmp_path)
    rc, err = cli(capsys, "sample", f"--out_dir={mixed}", "--device=cpu", "--max_new_tokens=2")
    assert rc == 2 and "does not fit this model" in err and "vocabulary" in err
    assert "[256, 32]" in err  # the embedding's shape: 256 byte tokens against the run's characters
    # the run's own dataset prepared again from another text: the vocabularies differ
    rc, err = cli(capsys, "sample", f"--out_dir={other}", "--device=cpu", "--max_new_tokens=2")
    assert rc == 0
    prepare_text(tmp_path / "t.txt", "tiny", tokenizer="char", data_dir=data, verbose=False, force=True)
    rc, err = cli(capsys, "sample", f"--out_dir={other}", "--device=cpu", "--max_new_tokens=2")
    assert rc == 2 and "meta.json" in err and "256" in err
