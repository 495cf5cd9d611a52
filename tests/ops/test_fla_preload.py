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


def test_preload_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("ATTNBENCH_FLA_PRELOAD", raising=False)
    assert not fla_preload.enabled() and fla_preload.preload_for_run("deltanet") is None
    monkeypatch.setenv("ATTNBENCH_FLA_PRELOAD", "1")
    assert fla_preload.enabled()
