"""The whole-step CUDA graph wrapper (attnbench/graphed_step.py) and its settings, on the CPU: the control
flow around the capture (warm-up, gradient resets, the eager fallback when a capture fails) and the clear
errors for settings that cannot be captured. The capture itself is checked against eager training on a
GPU (tests/gpu/test_train_gpu.py)."""
from __future__ import annotations

import pytest
import torch

import attnbench
from attnbench import graphed_step
from attnbench.errors import ConfigError
from attnbench.resolve import load_config
from attnbench.errors import AttnbenchError
from attnbench.graphed_step import GraphedStep, make_graph_safe, set_lr
from conftest import tiny_run_config


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(x, y):  # no zero_grad: GraphedStep resets gradients itself
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return model, opt, step


def _batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)) for _ in range(n)]


def _reference_params():
    model, opt, step = _toy()
    for x, y in _batches():
        step(x, y)
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_disabled_runs_every_step_eagerly_and_resets_gradients():
    model, opt, step = _toy()
    resets = []
    gs = GraphedStep(step, lambda: (resets.append(1), opt.zero_grad(set_to_none=True)), enabled=False)
    for x, y in _batches():
        gs(x, y)
        assert all(p.grad is None for p in model.parameters())
    assert len(resets) == 5 and not gs.captured and gs.reason == "disabled"
    for p, q in zip(model.parameters(), _reference_params()):
        assert torch.equal(p, q)


def test_failed_capture_falls_back_to_eager_steps_with_the_reason(monkeypatch, capsys):
    captures = []

    def failing_capture(step, inputs):
        captures.append(len(inputs))
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphed_step, "_capture", failing_capture)
    model, opt, step = _toy()
    gs = GraphedStep(step, lambda: opt.zero_grad(set_to_none=True), enabled=True, warmup_steps=2, label="toy")
    for x, y in _batches():
        gs(x, y)
    # two warm-up steps, one capture attempt at the third call (which then runs eagerly), eager after
    assert captures == [2] and not gs.captured
    assert gs.reason == "RuntimeError: operation not permitted when stream is capturing"
    assert "toy: CUDA graph capture failed" in capsys.readouterr().out
    # every step still trained, exactly as plain eager steps (the warm-up ran on the static input copies)
    for p, q in zip(model.parameters(), _reference_params()):
        assert torch.equal(p, q)


def test_warmup_steps_must_leave_an_eager_step_before_the_capture():
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedStep(lambda: None, lambda: None, warmup_steps=0)


def test_graph_safe_optimizer_reads_its_learning_rate_from_a_tensor_updated_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1}], lr=3e-4)
    make_graph_safe(opt, "cpu")
    lr = opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["capturable"] is True and isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(3e-4)
    set_lr(opt, 1e-3)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-3)  # same tensor: a replay sees it
    plain = torch.optim.AdamW([p], lr=3e-4)
    set_lr(plain, 1e-3)
    assert plain.param_groups[0]["lr"] == 1e-3


def test_cuda_graph_on_the_cpu_is_a_clear_error_before_any_file(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AttnbenchError, match="train.cuda_graph=true needs a CUDA GPU"):
        attnbench.train(tiny_run_config(tiny_data, out, **{"train.cuda_graph": True}))
    assert not out.exists()


@pytest.mark.parametrize("over,match", [
    ({"train.dtype": "float16"}, "float16's loss scaling"),
    ({"train.compile": True, "train.compile_mode": "reduce-overhead"}, "already captures the step"),
])
def test_settings_a_graph_cannot_capture_are_config_errors(over, match, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny_run_config(tiny_data, tmp_path / "r", **{"train.cuda_graph": True, **over}))
