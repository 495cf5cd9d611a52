import subprocess
import sys

import pytest

from attnbench.resolve import load_config
from attnbench.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config("configs/shakespeare_char.toml", ["--max_iters=2", "--wandb_log=false", "--model.n_layer=4",
                                                         "--learning_rate=3e-4", "--compile=False"])
    assert cfg.train.max_iters == 2 and cfg.model.n_layer == 4 and cfg.optim.learning_rate == 3e-4
    assert cfg.train.compile is False and cfg.log.wandb_log is False
    assert cfg.model.n_embd == 384 and cfg.model.dropout == 0.2  # from the file


def test_dict_overrides_like_the_python_api():
    cfg = load_config("configs/cpu_tiny.toml", {"max_iters": 7, "model.mixer_args.rope_base": 500})
    assert cfg.train.max_iters == 7 and cfg.model.mixer_args == {"rope_base": 500}


@pytest.mark.parametrize("override, words", [
    (["--max_iter=2"], ["max_iter", "max_iters"]),
    (["--model.n_layers=2"], ["n_layers", "n_layer"]),
    (["--max_iters=two"], ["train.max_iters", "int", "two"]),
    (["--compile=maybe"], ["train.compile", "bool"]),
    (["--model.n_head=5"], ["n_embd=384", "n_head=5", "nearest valid n_head is 6"]),
    (["--model.mixer=sofmax"], ["sofmax", "softmax"]),
    (["--model.mixer_args.rope_bas=3"], ["rope_bas", "rope_base"]),
    (["--pos_emb=rotary"], ["pos_emb", "rope"]),
])
def test_bad_config_names_key_and_suggestion(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/shakespeare_char.toml", override)
    for w in words:
        assert w in str(e.value)


def test_cli_exit_code_2_before_writing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "attnbench", "train", "configs/cpu_tiny.toml", f"--out_dir={out}",
                        "--n_embd=100", "--n_head=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "n_embd=100" in r.stderr and "n_head=3" in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "attnbench", "train", "configs/cpu_tiny.toml", f"--out_dir={out}",
                        "--bogus_key=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "bogus_key" in r.stderr and not out.exists()


def test_toml_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[model]\nn_layer = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    p.write_text("[modle]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(p)


def test_config_files_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from attnbench.config import CONFIGS_DIR, find_config_file

    monkeypatch.chdir(tmp_path)
    want = CONFIGS_DIR / "shakespeare_char.toml"
    for name in ("shakespeare_char", "shakespeare_char.toml", "configs/shakespeare_char.toml"):
        assert find_config_file(name) == want, name
    assert find_config_file("sweeps/bakeoff") == CONFIGS_DIR / "sweeps" / "bakeoff.toml"
    assert find_config_file("no_such_config") is None
    (tmp_path / "shakespeare_char.toml").write_text("[model]\nn_layer = 2\n")
    assert find_config_file("shakespeare_char.toml") == Path("shakespeare_char.toml")  # a file that exists wins
    assert load_config("cpu_tiny").model.n_layer == 4
