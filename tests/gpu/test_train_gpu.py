"""Training on a CUDA GPU: regional compilation (train.compile_scope = "blocks", the default),
compile_mode "reduce-overhead" (CUDA graphs) and the whole-step CUDA graph (train.cuda_graph) follow the
eager run's losses for every mixer, FLA kernels included (bf16 autocast: within 2e-2 over the first steps)."""
from __future__ import annotations

import pytest
import torch

import attnbench
from attnbench import mixers
from attnbench.files import read_jsonl
from conftest import tiny_run_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL_ARGS = {"nsa": {"n_kv_head": 1, "block_size": 8, "block_counts": 2, "window_size": 16}}


# every mixer with the default mode; CUDA graphs (reduce-overhead) for one FLA-backed mixer: each case
# compiles, so the list is kept short for the one-call GPU suite
CASES = [(m, "default") for m in mixers.available()] + \
        [(m, "reduce-overhead") for m in ("deltanet", "softmax") if m in mixers.available()]


@pytest.mark.parametrize("mixer,mode", CASES)
def test_compiled_blocks_train_like_eager(mixer, mode, tiny_data, tmp_path):
    losses = {}
    for compiled in (False, True):
        over = {"model.mixer": mixer, "model.n_embd": 128, "model.n_head": 2, "train.device": "cuda",
                "train.max_iters": 8, "train.eval_interval": 8, "train.compile": compiled,
                "train.compile_mode": mode}
        for k, v in SMALL_ARGS.get(mixer, {}).items():
            over[f"model.mixer_args.{k}"] = v
        out = tmp_path / f"{compiled}"
        torch._dynamo.reset()
        attnbench.train(tiny_run_config(tiny_data, out, **over))
        losses[compiled] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    torch._dynamo.reset()
    assert len(losses[True]) == len(losses[False]) == 8
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    print(f"{mixer} compile_mode={mode}: max |loss diff| {diff:.2e}")
    assert diff < 2e-2, (losses[True], losses[False])


# every mixer and hybrid pattern eager inside the graph; torch.compile'd blocks inside the graph for one mixer
# on SDPA and one on the PyTorch delta op (Inductor kernels captured by the outer graph)
GRAPH_CASES = [(m, False) for m in mixers.everything()] + \
              [(m, True) for m in ("softmax", "gated_deltanet") if m in mixers.available()]


@pytest.mark.parametrize("mixer,compiled", GRAPH_CASES)
def test_cuda_graph_step_trains_like_eager(mixer, compiled, tiny_data, tmp_path):
    """train.cuda_graph: the whole step (FLA or PyTorch-op backward, clipping, fused AdamW with a device
    learning rate) is captured and replayed, and follows the eager run's losses (dropout off, so both
    runs see the same numbers; bf16 autocast: within 2e-2)."""
    losses, summaries = {}, {}
    for graphed in (False, True):
        torch._dynamo.reset()
        over = {"model.mixer": mixer, "model.n_embd": 128, "model.n_head": 2, "train.device": "cuda",
                "train.max_iters": 12, "train.eval_interval": 6, "train.cuda_graph": graphed,
                "train.compile": compiled and graphed}
        if mixers.is_hybrid(mixer):  # the pattern once (at least 2 layers), each layer's mixer its small args
            over["model.n_layer"] = max(2, mixers.pattern_length(mixer))
            for name in mixers.components(mixer):
                for k, v in SMALL_ARGS.get(name, {}).items():
                    over[f"model.mixer_args.{name}.{k}"] = v
        for k, v in ({} if mixers.is_hybrid(mixer) else SMALL_ARGS.get(mixer, {})).items():
            over[f"model.mixer_args.{k}"] = v
        out = tmp_path / f"{graphed}"
        summaries[graphed] = attnbench.train(tiny_run_config(tiny_data, out, **over))
        losses[graphed] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert summaries[True]["cuda_graph"] is True, summaries[True]["cuda_graph_reason"]
    assert summaries[False]["cuda_graph"] is False
    assert len(losses[True]) == len(losses[False]) == 12
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    print(f"{mixer} cuda_graph (compiled blocks: {compiled}): max |loss diff| {diff:.2e}; val {summaries[True]['final_val_loss']:.4f} "
          f"vs {summaries[False]['final_val_loss']:.4f}")
    assert diff < 2e-2, (losses[True], losses[False])
    assert abs(summaries[True]["final_val_loss"] - summaries[False]["final_val_loss"]) < 2e-2


@pytest.mark.parametrize("mixer", ["softmax", "deltanet"])
def test_cuda_graph_captures_a_task_step_with_the_head_at_labelled_positions(mixer, tmp_path):
    """MQAR steps (GPT.forward's labels_per_row: topk of the label mask, gathers) capture in the whole-step
    CUDA graph and follow the eager run's losses."""
    losses, summaries = {}, {}
    for graphed in (False, True):
        cfg = {"model": {"mixer": mixer, "n_layer": 2, "n_head": 1, "n_embd": 64, "dropout": 0.0, "mlp": False,
                         "pos_emb": "rope" if mixer == "softmax" else "none"},
               "task": {"kind": "mqar", "seq_len": 64, "num_kv_pairs": 4, "vocab_size": 512, "num_train": 2048,
                        "num_test": 64},
               "data": {"data_dir": str(tmp_path / "data")},
               "train": {"out_dir": str(tmp_path / f"{graphed}"), "device": "cuda", "batch_size": 64,
                         "max_iters": 12, "eval_interval": 6, "eval_batch_size": 64, "log_interval": 1,
                         "compile": False, "cuda_graph": graphed, "progress": False}}
        summaries[graphed] = attnbench.train(cfg)
        losses[graphed] = [r["loss"] for r in read_jsonl(tmp_path / f"{graphed}" / "metrics.jsonl") if "loss" in r]
    assert summaries[True]["cuda_graph"] is True, summaries[True]["cuda_graph_reason"]
    assert len(losses[True]) == len(losses[False]) == 12
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 2e-2, (losses[True], losses[False])
