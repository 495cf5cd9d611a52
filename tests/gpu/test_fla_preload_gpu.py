"""ops/fla_preload.py on a CUDA GPU: the specialization data Triton hands its post-compile hook for FLA's
kernels compiles again through JITFunction.preload (the round trip a run's preload depends on)."""
from __future__ import annotations

import pytest
import torch

from attnbench.ops import fla_preload
from attnbench.ops.backend import fla_available
from attnbench.ops.delta_rule import delta_rule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not fla_available(), reason="needs the fla package")]


def test_recorded_fla_kernels_preload_without_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(fla_preload, "_recorded", {})
    # an unusual shape (7 heads of 32), so this process compiles the kernels here, not in an earlier test
    q, k, v = (torch.randn(1, 80, 7, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    beta = torch.rand(1, 80, 7, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fla_preload.recording("probe") as specs:
        o, _ = delta_rule(q, k, v, beta, backend="fla")
        o.float().sum().backward()
    print(f"{len(specs)} FLA kernel specializations recorded")
    assert specs
    path = tmp_path / "probe.preload.json"
    fla_preload.save(path, torch.cuda.get_device_name(0), recorded={"probe": specs})
    n, failed, secs = fla_preload.preload("probe", path)
    print(f"preloaded {n} in {secs:.1f} s, {failed} failed")
    assert (n, failed) == (len(specs), 0)
