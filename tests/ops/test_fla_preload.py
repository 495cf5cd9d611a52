"""ops/fla_preload.py on the CPU: recording FLA kernels' specializations from Triton's post-compile hook,
the saved file, and preloading them in threads (a stand-in for Triton's JITFunction.preload; the real
one needs a GPU driver)."""
from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from attnbench.ops import fla_preload

VERS = {"triton": "3.6.0", "fla": "0.6.0"}


def test_recording_keeps_fla_kernels_under_the_mixer_and_restores_the_hook(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(fla_preload, "_recorded", {})
    knobs = triton.knobs.runtime
    before = knobs.jit_post_compile_hook

    def compiled(module: str, spec: str) -> None:  # what Triton's JIT does after compiling a kernel
        knobs.jit_post_compile_hook(key="k", repr="r", fn=SimpleNamespace(module=module, name="kern"),
                                    compile={"specialization_data": spec}, is_manual_warmup=False,
                                    already_compiled=False)

    with fla_preload.recording("deltanet") as specs:
        compiled("fla.ops.delta_rule.chunk", "S1")
        compiled("fla.ops.delta_rule.chunk", "S1")  # the same specialization again: kept once
        compiled("attnbench.ops.nsa_decode_triton", "S2")  # not FLA's
    with fla_preload.recording("nsa"):
        compiled("fla.ops.nsa.parallel", "S3")
    assert specs == ["S1"] and fla_preload._recorded == {"deltanet": ["S1"], "nsa": ["S3"]}
    with fla_preload.recording("outer"):  # a whole-run capture around a test that records its own
        with fla_preload.recording("nsa"):
            compiled("fla.ops.nsa.parallel", "S6")
        compiled("fla.ops.delta_rule.chunk", "S7")  # the outer key resumes
    assert fla_preload._recorded["outer"] == ["S7"] and fla_preload._recorded["nsa"] == ["S3", "S6"]
    del fla_preload._recorded["outer"]
    fla_preload._recorded["nsa"].remove("S6")
    assert knobs.jit_post_compile_hook is before

    path = tmp_path / "NVIDIA_H200.preload.json"
    assert fla_preload.save(path, "NVIDIA H200", VERS) == 2
    assert fla_preload.save(path, "NVIDIA H200", VERS, {"deltanet": ["S1", "S4"]}) == 1  # merged, no repeats
    assert json.loads(path.read_text())["mixers"] == {"deltanet": ["S1", "S4"], "nsa": ["S3"]}
    fla_preload.save(path, "NVIDIA H200", {**VERS, "fla": "0.6.1"}, {"nsa": ["S5"]})  # other versions: over
    assert json.loads(path.read_text())["mixers"] == {"nsa": ["S5"]}


def test_preload_compiles_a_mixers_kernels_in_threads_and_counts_failures(tmp_path, monkeypatch):
    calls = []

    class FakeJIT:  # as triton's JITFunction: preload(specialization_data) compiles
        def preload(self, spec):
            if json.loads(spec)["bad"]:
                raise RuntimeError("no such specialization")
            calls.append(spec)

    mod = types.ModuleType("fla.ops.fake")
    mod.kern = SimpleNamespace(fn=SimpleNamespace(fn=FakeJIT()))  # autotune(heuristics(jit)) wrappers
    monkeypatch.setitem(sys.modules, "fla.ops.fake", mod)
    specs = [json.dumps({"name": "fla.ops.fake.kern", "bad": i == 3, "i": i}) for i in range(8)]
    path = tmp_path / "p.json"
    fla_preload.save(path, "NVIDIA H200", VERS, {"deltanet": specs, "nsa": [specs[0]]})
    n, failed, secs = fla_preload.preload("deltanet", path, threads=4, vers=VERS)
    assert (n, failed) == (7, 1) and sorted(calls) == sorted(s for i, s in enumerate(specs) if i != 3)
    assert secs >= 0
    assert fla_preload.preload("gated_deltanet", path, vers=VERS)[:2] == (0, 0)  # nothing saved for it
    assert fla_preload.preload("deltanet", path, vers={**VERS, "triton": "3.7.1"})[:2] == (0, 0)
    assert fla_preload.preload("deltanet", tmp_path / "missing.json", vers=VERS)[:2] == (0, 0)


def test_preload_is_on_unless_switched_off_and_needs_a_gpu(monkeypatch):
    monkeypatch.delenv("ATTNBENCH_FLA_PRELOAD", raising=False)
    assert fla_preload.enabled()
    assert fla_preload.preload_for_run("deltanet", "train") is None  # no CUDA here: nothing to compile
    for off in ("0", "off", "false"):
        monkeypatch.setenv("ATTNBENCH_FLA_PRELOAD", off)
        assert not fla_preload.enabled()


def _spec(name: str, consts: dict[int, object], num_warps: int, num_stages: int = 2) -> str:
    """Specialization data as Triton's JIT serialises it (constants keyed by argument-index paths)."""
    from triton.runtime.jit import serialize_specialization_data

    return serialize_specialization_data(name, {"x": "*fp32"}, {(i,): v for i, v in consts.items()}, {},
                                         SimpleNamespace(num_warps=num_warps, num_stages=num_stages), "k")


def _tuner(module: str, name: str, arg_names: list[str], chosen: list) -> SimpleNamespace:
    """An autotuner as FLA's: autotune(jit(python function)), with a cache of chosen configurations."""
    py_fn = types.FunctionType((lambda: None).__code__, {}, name)
    py_fn.__module__ = module
    jit = SimpleNamespace(arg_names=arg_names, fn=py_fn)
    return SimpleNamespace(fn=jit, cache={("key", i): c for i, c in enumerate(chosen)})


def test_chosen_only_drops_the_candidates_an_autotuner_only_timed():
    triton = pytest.importorskip("triton")
    tuner = _tuner("fla.ops.fake", "kern", ["x", "T", "BK", "BV"], [triton.Config({"BK": 64, "BV": 32}, num_warps=4,
                                                                                    num_stages=2)])
    name = "fla.ops.fake.kern"
    chosen = _spec(name, {2: 64, 3: 32}, num_warps=4)
    chosen_constexpr = _spec(name, {2: {"constexpr": 64}, 3: 32, 1: 1}, num_warps=4)  # T specialised to 1 too
    other_block = _spec(name, {2: 32, 3: 32}, num_warps=4)
    other_warps = _spec(name, {2: 64, 3: 32}, num_warps=8)
    other_stages = _spec(name, {2: 64, 3: 32}, num_warps=4, num_stages=3)
    untuned = _spec("fla.ops.fake.helper", {1: 16}, num_warps=1)
    kept = fla_preload.chosen_only({"deltanet:train": [chosen, chosen_constexpr, other_block, other_warps,
                                                       other_stages, untuned]}, [tuner])
    assert kept == {"deltanet:train": [chosen, chosen_constexpr, untuned]}


def test_capturing_writes_the_processes_choices_and_chosen_kernels_even_when_interrupted(tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    import torch

    from attnbench.ops import backend, fla_configs

    monkeypatch.setattr(fla_preload, "_recorded", {})
    monkeypatch.setenv(fla_preload.CAPTURE_ENV, str(tmp_path / "cap"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(backend, "fla_available", lambda: True)
    monkeypatch.setattr(fla_configs, "versions", lambda: VERS)
    monkeypatch.setattr(fla_preload, "versions", lambda: VERS)
    tuner = _tuner("fla.ops.fake", "kern", ["x", "BK"], [triton.Config({"BK": 64}, num_warps=4, num_stages=2)])
    monkeypatch.setattr(fla_configs, "live_fla_tuners", lambda: [tuner])
    keep, drop = _spec("fla.ops.fake.kern", {1: 64}, 4), _spec("fla.ops.fake.kern", {1: 128}, 4)
    knobs = triton.knobs.runtime

    with pytest.raises(KeyboardInterrupt):
        with fla_preload.capturing("deltanet", "bench"):
            for spec in (keep, drop):
                knobs.jit_post_compile_hook(key="k", repr="r", fn=SimpleNamespace(module="fla.ops.fake", name="kern"),
                                            compile={"specialization_data": spec}, is_manual_warmup=False,
                                            already_compiled=False)
            raise KeyboardInterrupt  # Ctrl-C (or the sweep's SIGINT) in the middle of the benchmarks
    (out,) = (tmp_path / "cap").iterdir()
    assert out.name.startswith("deltanet-bench-")
    pre = json.loads((out / "NVIDIA_H200.preload.json").read_text())
    assert pre["mixers"] == {"deltanet:bench": [keep]} and (pre["triton"], pre["fla"]) == ("3.6.0", "0.6.0")
    cfg = json.loads((out / "NVIDIA_H200.json").read_text())
    assert cfg["kernels"]["fla.ops.fake.kern"][0]["config"]["kwargs"] == {"BK": 64}


def test_capturing_does_nothing_without_its_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(fla_preload.CAPTURE_ENV, raising=False)
    monkeypatch.setattr(fla_preload, "_recorded", {})
    with fla_preload.capturing("deltanet", "train"):
        pass
    assert fla_preload._recorded == {}


def test_merge_adds_a_captures_specializations_of_the_same_versions(tmp_path):
    dst, src = tmp_path / "dst.preload.json", tmp_path / "src.preload.json"
    fla_preload.save(dst, "NVIDIA H200", VERS, {"deltanet:train": ["S1"]})
    fla_preload.save(src, "NVIDIA H200", VERS, {"deltanet:train": ["S1", "S2"], "nsa:bench": ["S3"]})
    assert fla_preload.merge(dst, src) == 2
    assert json.loads(dst.read_text())["mixers"] == {"deltanet:train": ["S1", "S2"], "nsa:bench": ["S3"]}
    other = tmp_path / "other.preload.json"
    fla_preload.save(other, "NVIDIA H200", {**VERS, "fla": "0.6.1"}, {"nsa:bench": ["S4"]})
    with pytest.raises(ValueError, match="cannot be merged"):
        fla_preload.merge(dst, other)
