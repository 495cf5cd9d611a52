"""Out of GPU memory in a training step (simulated on the CPU): the message names the mixer, batch and context
and settings with the same tokens per step that need less memory; the last checkpoint is kept."""
import pytest

tomli_w = pytest.importorskip("tomli_w")  # dev extra; GPU hosts may lack it
import torch

from attnbench import checkpoint as ck
from attnbench import trainer
from attnbench.cli import main
from conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.fault("oom-train-step")
def test_out_of_memory_in_a_step_names_the_settings_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    real = trainer.GraphedStep

    class OutOfMemoryAtStep13(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.n = 0

        def __call__(self, *a):
            self.n += 1
            if self.n == 13:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().__call__(*a)

    monkeypatch.setattr(trainer, "GraphedStep", OutOfMemoryAtStep13)
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, out, **{"train.gradient_accumulation_steps": 3})
    (tmp_path / "cfg.toml").write_text(tomli_w.dumps(cfg))
    assert main(["train", str(tmp_path / "cfg.toml")]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory in a training step of softmax" in err and "Traceback" not in err
    assert "batch_size=8 x block_size=32 (context) x gradient_accumulation_steps=3" in err
    assert "--batch_size=4 --gradient_accumulation_steps=6" in err and "same 768 tokens per step" in err
    assert "last checkpoint (step 10)" in err
    kept = ck.latest_checkpoint(out)
    assert kept.name.startswith("step_0000010-") and ck.verify_checkpoint(kept) is None
