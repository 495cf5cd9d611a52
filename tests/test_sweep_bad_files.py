"""Sweep files a user hands in that are binary, not UTF-8, or valid TOML of the wrong shape: a ConfigError
(exit 2) naming the file and the problem."""
import pytest

from attnbench.errors import ConfigError
from attnbench.sweep import load_sweep


@pytest.mark.fault("sweep-binary")
@pytest.mark.parametrize("data,problem", [(bytes(range(256)), "binary"),
                                          ('name = "café"\nmixers = ["softmax"]\n'.encode("latin-1"), "not UTF-8")],
                         ids=["binary", "latin1"])
def test_binary_or_non_utf8_sweep_file(tmp_path, data, problem):
    p = tmp_path / "sweep.toml"
    p.write_bytes(data)
    with pytest.raises(ConfigError, match=problem) as e:
        load_sweep(p)
    assert str(p) in str(e.value)


@pytest.mark.fault("sweep-wrong-shape")
@pytest.mark.parametrize("body,match", [
    ('base_config = 5\nmixers = ["softmax"]\n', "base_config must be a string, got 5"),
    ('name = ["a"]\nbase_config = "b.toml"\nmixers = ["softmax"]\n', r"name must be a string, got \['a'\]"),
    ('base_config = "b.toml"\n[mixers]\nsoftmax = 1\n', "mixers must be a list of str values"),
    ('base_config = "b.toml"\nmixers = ["softmax"]\noverrides = 3\n', "overrides must be a table"),
], ids=["base_config-number", "name-list", "mixers-table", "overrides-number"])
def test_valid_toml_of_the_wrong_shape(tmp_path, body, match):
    (tmp_path / "b.toml").write_text("")
    p = tmp_path / "sweep.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=match) as e:
        load_sweep(p)
    assert str(p) in str(e.value)
