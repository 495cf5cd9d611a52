"""ops/fla_configs.py on a CUDA GPU: with this GPU's saved file installed, a training step of each FLA mixer
at the bakeoff preset's shapes times no autotuning candidates (every FLA autotuner it meets starts with its
choice, including those FLA builds through its own fla_cache_autotune: l2norm, causal_conv1d)."""
from __future__ import annotations

import pytest
import torch

from attnbench.bench.shapes import bench_config, build_model, resolve_shapes
from attnbench.bench.timing import precision
from attnbench.bench.training_step import make_optimizer, random_batch, train_step
from attnbench.ops import fla_configs
from attnbench.ops.backend import fla_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not fla_available(), reason="needs the fla package")]


@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet", "gated_deltaproduct", "nsa"])
def test_a_bakeoff_training_step_times_no_autotuning_candidates(mixer, monkeypatch):
    if fla_configs._INSTALLED is None:
        pytest.skip("no saved FLA choices for this GPU and these Triton/FLA versions")
    from triton.runtime.autotuner import Autotuner

    timed = []
    bench = Autotuner._bench

    def recording_bench(self, *args, **kwargs):
        timed.append(fla_configs.kernel_id(self.fn))
        return bench(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "_bench", recording_bench)
    (shape,) = resolve_shapes([mixer])
    cfg = bench_config(shape.cfg, 256)
    model = build_model(cfg, "cuda").train()
    opt = make_optimizer(model, "cuda")
    x, y = random_batch(cfg.vocab_size, 64, 256, "cuda")  # the bakeoff preset's training batch
    train_step(model, opt, x, y, precision("autocast", "cuda", inference=False), "cuda")
    torch.cuda.synchronize()
    assert sorted(set(timed)) == [], f"autotuned despite the saved file: {sorted(set(timed))}"
