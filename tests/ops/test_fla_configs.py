"""Saved FLA autotuner choices (attnbench/ops/fla_configs.py): the file, its version guard, and the
wrapped Triton Autotuner constructor that starts FLA's autotuners with them, installed before FLA is
imported (Triton's autotuner objects are built on the CPU too; nothing here runs a kernel)."""
from __future__ import annotations

import json
import sys
import types
import weakref
from types import SimpleNamespace

import pytest

from attnbench.ops import backend, fla_configs

VERS = {"triton": "3.6.0", "fla": "0.6.0"}


def chunk_fwd_kernel_h():  # a "kernel": kernel_id is its module and name
    pass


def other_kernel():
    pass


def _cfg(**kw):
    return SimpleNamespace(kwargs=kw, num_warps=4, num_stages=2, num_ctas=1, maxnreg=None)


def _tuner(fn, cache):
    return SimpleNamespace(fn=SimpleNamespace(fn=fn), cache=cache)  # Autotuner.fn: the jit wrapper


KEY = (6, 64, 64, 64, False, "torch.bfloat16")


def test_save_then_load_round_trips_keys_and_configs(tmp_path):
    path = tmp_path / "NVIDIA_H200.json"
    assert fla_configs.save(path, [_tuner(chunk_fwd_kernel_h, {KEY: _cfg(BV=32)})], "NVIDIA H200", VERS) == 1
    kid = f"{__name__}.chunk_fwd_kernel_h"
    assert fla_configs.load(path, VERS) == {kid: {KEY: {"kwargs": {"BV": 32}, "num_warps": 4, "num_stages": 2,
                                                        "num_ctas": 1, "maxnreg": None}}}
    # a later tuning run adds keys and replaces the ones tuned again
    key2 = (5,) + KEY[1:]
    fla_configs.save(path, [_tuner(chunk_fwd_kernel_h, {key2: _cfg(BV=64), KEY: _cfg(BV=16)})], "NVIDIA H200", VERS)
    got = fla_configs.load(path, VERS)[kid]
    assert set(got) == {KEY, key2} and got[KEY]["kwargs"] == {"BV": 16}
    # a key JSON cannot hold is left out (it could never match when read back)
    assert fla_configs.save(path, [_tuner(chunk_fwd_kernel_h, {(object(),): _cfg()})], "NVIDIA H200", VERS) == 0
    assert set(fla_configs.load(path, VERS)[kid]) == {KEY, key2}
    # other Triton or FLA versions: not used (a kernel's parameters may differ), and a new save starts over
    assert fla_configs.load(path, {**VERS, "triton": "3.7.1"}) is None
    fla_configs.save(path, [], "NVIDIA H200", {**VERS, "fla": "0.6.1"})
    assert json.loads(path.read_text())["kernels"] == {}


def test_merge_adds_another_files_choices_of_the_same_versions(tmp_path):
    """The GPU tests' file (other shapes) merged into the tuned one: union by kernel and key."""
    dst, src = tmp_path / "NVIDIA_H200.json", tmp_path / "tests.json"
    key2 = (5,) + KEY[1:]
    fla_configs.save(dst, [_tuner(chunk_fwd_kernel_h, {KEY: _cfg(BV=32)})], "NVIDIA H200", VERS)
    fla_configs.save(src, [_tuner(chunk_fwd_kernel_h, {key2: _cfg(BV=64)}), _tuner(other_kernel, {KEY: _cfg()})],
                     "NVIDIA H200", VERS)
    assert fla_configs.merge(dst, src) == 2
    got = fla_configs.load(dst, VERS)
    assert set(got[f"{__name__}.chunk_fwd_kernel_h"]) == {KEY, key2} and set(got[f"{__name__}.other_kernel"]) == {KEY}
    other = tmp_path / "old.json"
    fla_configs.save(other, [_tuner(other_kernel, {KEY: _cfg()})], "NVIDIA H200", {**VERS, "fla": "0.5.0"})
    with pytest.raises(ValueError, match="cannot be merged"):
        fla_configs.merge(dst, other)


def test_file_names_follow_the_gpu():
    assert fla_configs.gpu_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert fla_configs.gpu_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


@pytest.fixture
def fresh_install(monkeypatch):
    """install() patches Triton's Autotuner constructor for the process: restored after the test."""
    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(Autotuner, "__init__", Autotuner.__init__)
    monkeypatch.setattr(fla_configs, "_INSTALLED", None)
    monkeypatch.delenv("ATTNBENCH_FLA_CONFIGS", raising=False)
    monkeypatch.setattr(fla_configs, "versions", lambda: dict(VERS))
    return triton


def test_install_starts_fla_autotuners_with_the_saved_choices(tmp_path, fresh_install):
    triton = fresh_install
    from triton.runtime.autotuner import Autotuner

    fla_configs.save(tmp_path / "NVIDIA_H200.json", [_tuner(chunk_fwd_kernel_h, {KEY: _cfg(BV=32)})],
                     "NVIDIA H200", VERS)
    assert fla_configs.install("NVIDIA H100", root=tmp_path) is None  # another GPU's choices: not used
    assert fla_configs.install("NVIDIA H200", root=tmp_path) == tmp_path / "NVIDIA_H200.json"
    configs = [triton.Config({"BV": 32}), triton.Config({"BV": 64})]
    # kernels defined after the install (as FLA's are, at its import) start with their saved keys
    tuned = triton.autotune(configs=configs, key=[])(triton.jit(chunk_fwd_kernel_h))
    assert list(tuned.cache) == [KEY] and tuned.cache[KEY].kwargs == {"BV": 32} and tuned.cache[KEY].num_warps == 4

    class FlaCachedAutotuner(Autotuner):  # as FLA's fla_cache_autotune builds l2norm's and causal_conv1d's
        pass

    jit = triton.jit(chunk_fwd_kernel_h)
    assert list(FlaCachedAutotuner(jit, jit.arg_names, configs, [], None, None).cache) == [KEY]
    other = triton.autotune(configs=configs, key=[])(triton.jit(other_kernel))
    assert other.cache == {}  # nothing saved: Triton autotunes it as before


def test_install_can_be_switched_off_and_ignores_other_versions(tmp_path, fresh_install, monkeypatch):
    fla_configs.save(tmp_path / "NVIDIA_H200.json", [_tuner(chunk_fwd_kernel_h, {KEY: _cfg()})], "NVIDIA H200",
                     {**VERS, "triton": "3.5.0"})
    assert fla_configs.install("NVIDIA H200", root=tmp_path) is None
    fla_configs.save(tmp_path / "NVIDIA_H200.json", [_tuner(chunk_fwd_kernel_h, {KEY: _cfg()})], "NVIDIA H200", VERS)
    monkeypatch.setenv("ATTNBENCH_FLA_CONFIGS", "off")
    assert fla_configs.install("NVIDIA H200", root=tmp_path) is None


def test_install_runs_before_fla_is_first_imported(monkeypatch):
    calls = []
    monkeypatch.delenv("ATTNBENCH_NO_FLA", raising=False)
    monkeypatch.setattr(fla_configs, "install", lambda: calls.append(1))
    backend.fla_available.cache_clear()
    try:
        backend.fla_available()
    finally:
        backend.fla_available.cache_clear()
    assert calls == [1]


def test_the_choices_of_fla_autotuners_alive_in_the_process_are_saved(tmp_path, monkeypatch):
    """save_live (the GPU tests' end-of-run hook, scripts/fla_tune.py) finds FLA's autotuners among the live
    objects, skips other Triton autotuners and those that chose nothing, and writes their choices."""
    class Autotuner:  # stand-in for triton.runtime.autotuner.Autotuner
        def __init__(self, fn, cache):
            self.fn, self.cache = fn, cache

    runtime = types.ModuleType("triton.runtime")
    runtime.autotuner = types.ModuleType("triton.runtime.autotuner")
    runtime.autotuner.Autotuner = Autotuner
    for name, mod in (("triton", types.ModuleType("triton")), ("triton.runtime", runtime),
                      ("triton.runtime.autotuner", runtime.autotuner)):
        monkeypatch.setitem(sys.modules, name, mod)
    fla_fn = types.FunctionType(chunk_fwd_kernel_h.__code__, {}, "chunk_fwd_kernel_h")
    fla_fn.__module__ = "fla.ops.common.chunk_delta_h"
    mine = types.FunctionType(other_kernel.__code__, {}, "other_kernel")
    keep = [Autotuner(SimpleNamespace(fn=fla_fn), {KEY: _cfg(BV=32)}), Autotuner(SimpleNamespace(fn=mine), {KEY: _cfg()}),
            Autotuner(SimpleNamespace(fn=fla_fn), {})]
    # a weakref.proxy whose object is gone (torch._dynamo.reset() leaves some): isinstance on it raises
    # ReferenceError, which would stop the GPU tests' end-of-run save
    gone = Autotuner(SimpleNamespace(fn=fla_fn), {KEY: _cfg(BV=64)})
    dead = [weakref.proxy(gone)]
    del gone
    assert [fla_configs.kernel_id(t.fn) for t in fla_configs.live_fla_tuners()] == \
        ["fla.ops.common.chunk_delta_h.chunk_fwd_kernel_h"]
    monkeypatch.setattr(fla_configs, "versions", lambda: dict(VERS))
    monkeypatch.setattr("torch.cuda.get_device_name", lambda i=0: "NVIDIA H200")
    assert fla_configs.save_live(tmp_path / "g.json") == 1
    assert list(fla_configs.load(tmp_path / "g.json", VERS)) == ["fla.ops.common.chunk_delta_h.chunk_fwd_kernel_h"]
    del keep, dead


def test_the_test_run_saves_fla_choices_where_asked(tmp_path, monkeypatch):
    """tests/conftest.py's end-of-run hook: with ATTNBENCH_SAVE_FLA_CONFIGS=FILE the test run ends by saving
    FLA's autotuner choices there; without it, nothing is saved."""
    import conftest

    saved = []
    monkeypatch.setattr(fla_configs, "save_live", lambda path: saved.append(path) or 3)
    monkeypatch.delenv("ATTNBENCH_SAVE_FLA_CONFIGS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    conftest.pytest_sessionfinish(None, 0)
    assert saved == []
    monkeypatch.setenv("ATTNBENCH_SAVE_FLA_CONFIGS", str(tmp_path / "g.json"))
    conftest.pytest_sessionfinish(None, 0)
    assert saved == [tmp_path / "g.json"]
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")  # each pytest-xdist worker saves its own file
    conftest.pytest_sessionfinish(None, 0)
    assert saved[-1] == tmp_path / "g-gw3.json"
