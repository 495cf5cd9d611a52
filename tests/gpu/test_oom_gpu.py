"""Out of GPU memory for real: a micro-batch far past the GPU's memory ends in the named error, with the
step-0 checkpoint kept."""
import pytest
import torch

import attnbench
from attnbench import checkpoint as ck
from attnbench.trainer import OutOfMemory
from conftest import tiny_run_config

pytestmark = pytest.mark.gpu


@pytest.mark.fault("oom-gpu")
def test_a_batch_past_the_gpus_memory_is_a_named_error(tiny_data, tmp_path):
    # 2^20 sequences of 256 tokens at width 256: the token embeddings alone (2^36 floats, 256 GiB) are past
    # any one GPU's memory, so the first allocation of the step fails (before any kernel meets 2^31 elements)
    batch = 1 << 20
    cfg = tiny_run_config(tiny_data, tmp_path / "run", **{
        "model.block_size": 256, "model.n_embd": 256, "train.batch_size": batch, "train.max_iters": 2,
        "train.eval_batch_size": 4, "train.device": "cuda"})
    with pytest.raises(OutOfMemory) as e:
        attnbench.train(cfg)
    msg = str(e.value)
    assert f"out of GPU memory in a training step of softmax (2 layers, n_embd 256) with batch_size={batch} x " \
           "block_size=256 (context)" in msg
    assert f"--batch_size={batch // 2} --gradient_accumulation_steps=2" in msg and "last checkpoint (step 0)" in msg
    kept = ck.latest_checkpoint(tmp_path / "run")
    assert kept.name.startswith("step_0000000-") and ck.verify_checkpoint(kept) is None
    del e
    torch.cuda.empty_cache()
