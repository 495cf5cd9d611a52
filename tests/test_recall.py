"""Recall runs (MQAR through the trainer): the evaluation's accuracy, the loss over labelled positions, early
stop, the sweep's [grid]/[[points]] expansion and run ids, bad task settings, the report's section."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnbench.trainer as trainer
from attnbench.config import RunConfig
from attnbench.errors import AttnbenchError, ConfigError
from attnbench.evaluate import evaluate_path
from attnbench.model import GPT
from attnbench.report import build_report
from attnbench.resolve import load_config
from attnbench.sweep.plan import ID_EXCLUDE, plan, run_id_for
from attnbench.sweep.spec import load_sweep
from attnbench.tasks import IGNORE_INDEX, ExampleSampler, StreamSampler, evaluate_task
from attnbench.tasks.mqar import MQARConfig, make_mqar, rows_in, train_examples
from attnbench.tasks.feed import task_config

TINY_TASK = {"kind": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 32, "num_train": 64, "num_test": 16}


def tiny(tmp_path: Path, **train) -> dict:
    return {"model": {"mixer": "softmax", "n_layer": 2, "n_head": 1, "n_embd": 16, "dropout": 0.0, "pos_emb": "rope",
                      "mlp": False},
            "optim": {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 2},
            "train": {"out_dir": str(tmp_path / "run"), "batch_size": 8, "max_iters": 40, "eval_interval": 5,
                      "eval_batch_size": 8, "log_interval": 5, "compile": False, "progress": False, **train},
            "task": dict(TINY_TASK), "data": {"data_dir": str(tmp_path / "data")}}


class _Echo(torch.nn.Module):
    """Predicts input + 1 at every position (one-hot logits over 8 tokens)."""

    def forward(self, x):
        return F.one_hot((x + 1) % 8, 8).float() * 10, None


def test_evaluation_accuracy_on_a_hand_made_batch():
    x = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    y = torch.full((3, 4), IGNORE_INDEX)
    y[0, 1], y[0, 3] = 3, 5  # both right
    y[1, 0], y[1, 2] = 2, 7  # one of two right
    # the third example has no labels: skipped, as Zoology's mean skips it
    loss, acc = evaluate_task(_Echo(), x, y, batch=2, device="cpu", autocast=torch.autocast("cpu", enabled=False))
    assert acc == pytest.approx(0.75)
    logits = _Echo()(x)[0]
    assert loss == pytest.approx(F.cross_entropy(logits[y != IGNORE_INDEX], y[y != IGNORE_INDEX]).item(), rel=1e-6)


def test_model_loss_ignores_unlabelled_positions():
    torch.manual_seed(0)
    cfg = load_config({"model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "mlp": False}, "task": TINY_TASK})
    model = GPT(cfg.model)
    x = torch.randint(0, 32, (2, 16))
    y = torch.full((2, 16), IGNORE_INDEX)
    y[0, 5], y[1, 9] = 20, 30
    logits, loss = model(x, y)
    mask = y != IGNORE_INDEX
    assert loss.item() == pytest.approx(F.cross_entropy(logits[mask], y[mask]).item(), rel=1e-6)
    assert model.blocks[0].mlp is None and cfg.model.block_size == 16 and cfg.model.vocab_size == 32


@pytest.mark.parametrize("mixer", ["softmax", "deltanet"])
def test_head_at_labelled_positions_gives_the_same_loss_and_gradients(mixer):
    """labels_per_row runs the head and the loss at the K labelled positions only: same loss, same gradients."""
    torch.manual_seed(0)
    cfg = load_config({"model": {"mixer": mixer, "n_layer": 2, "n_head": 1, "n_embd": 16, "mlp": False,
                                 "pos_emb": "none"}, "task": TINY_TASK})
    model = GPT(cfg.model).double()
    x = torch.randint(1, 32, (3, 16))
    y = torch.full((3, 16), IGNORE_INDEX)
    for row, cols in enumerate([(3, 8), (5, 15), (0, 1)]):  # exactly two labels per row, anywhere
        y[row, list(cols)] = torch.randint(16, 32, (2,))
    full_logits, full = model(x, y)
    grads = torch.autograd.grad(full, list(model.parameters()))
    logits, part = model(x, y, labels_per_row=2)
    mask = y != IGNORE_INDEX
    assert logits.shape == (3, 2, 32) and torch.allclose(logits.reshape(6, 32), full_logits[mask], rtol=1e-12)
    assert torch.allclose(part, full, rtol=1e-6)  # the loss is taken in float32 either way
    for g, h in zip(grads, torch.autograd.grad(part, list(model.parameters()))):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-9)


def test_evaluation_at_labelled_positions_gives_the_same_numbers():
    torch.manual_seed(0)
    cfg = load_config({"model": {"mixer": "softmax", "n_layer": 2, "n_head": 1, "n_embd": 16, "mlp": False,
                                 "pos_emb": "rope"}, "task": TINY_TASK})
    model = GPT(cfg.model)
    data = make_mqar(MQARConfig(seq_len=16, num_kv_pairs=2, vocab_size=32, num_train=0, num_test=40))
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in (data.test_inputs, data.test_labels))
    off = torch.autocast("cpu", enabled=False)
    full = evaluate_task(model, x, y, batch=16, device="cpu", autocast=off)
    assert evaluate_task(model, x, y, batch=16, device="cpu", autocast=off, labels_per_row=2) == pytest.approx(full, rel=1e-6)


def test_task_training_steps_run_the_head_at_labelled_positions_only(tmp_path, monkeypatch):
    seen = []
    forward = GPT.forward

    def spy(self, idx, targets=None, cache=None, labels_per_row=None):
        seen.append(labels_per_row)
        return forward(self, idx, targets, cache, labels_per_row)

    monkeypatch.setattr(GPT, "forward", spy)
    trainer.train(tiny(tmp_path, max_iters=2))  # training steps and evaluations
    assert seen and set(seen) == {TINY_TASK["num_kv_pairs"]}


def test_example_sampler_is_seeded_and_covers_each_epoch():
    xs = np.arange(10)[:, None].repeat(3, 1)
    a, b = ExampleSampler(xs, xs, 5, seed=1), ExampleSampler(xs, xs, 5, seed=1)
    first = [a.next_step(1)[0][0][:, 0].tolist() for _ in range(5)]
    assert first == [b.next_step(1)[0][0][:, 0].tolist() for _ in range(5)]
    epoch = sum(first, [])[:10]
    assert sorted(epoch) == list(range(10))  # one epoch: every example once
    c = ExampleSampler(xs, xs, 5, seed=1)
    c.load_state_dict(a.state_dict())
    assert c.next_step(1)[0][0].tolist() == a.next_step(1)[0][0].tolist()


def test_streamed_training_examples_are_the_stored_split_in_order():
    cfg = MQARConfig(seq_len=32, num_kv_pairs=4, vocab_size=256, num_train=200, num_test=20)
    stored = make_mqar(cfg)
    x, y = train_examples(cfg, 57, 100)
    assert (x == stored.train_inputs[57:157]).all() and (y == stored.train_labels[57:157]).all()
    one = StreamSampler(replace(cfg, num_train=0), stored.test_inputs, batch_size=4)
    steps = [one.next_step(2) for _ in range(3)]  # 3 steps x 2 micro-batches x 4 examples
    got = torch.cat([xb for step in steps for xb, _ in step])
    assert got.tolist() == stored.train_inputs[:24].astype(np.int64).tolist()
    # two ranks together take what one process takes; a resumed sampler continues where it stopped
    ranks = [StreamSampler(replace(cfg, num_train=0), stored.test_inputs, 4) for _ in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    both = [ranks[r].next_step(1, world_size=2, rank=r)[0][0] for r in range(2)]
    assert torch.cat(both).tolist() == torch.cat([xb for xb, _ in one.next_step(2)]).tolist()
    with pytest.raises(AttnbenchError, match="stored train split"):
        one.load_state_dict(ExampleSampler(stored.train_inputs, stored.train_labels, 4, 0).state_dict())


def test_a_streamed_example_equal_to_a_test_example_trains_nothing():
    cfg = MQARConfig(seq_len=4, num_kv_pairs=1, vocab_size=8, num_train=0, num_test=5)  # 12 distinct examples
    test = make_mqar(cfg).test_inputs
    s = StreamSampler(cfg, test, batch_size=64)
    x, y = s.next_step(1)[0]
    in_test = rows_in(x.numpy(), test)
    assert in_test.any() and not in_test.all()
    assert (y[torch.from_numpy(in_test)] == IGNORE_INDEX).all()
    assert (y[torch.from_numpy(~in_test)] != IGNORE_INDEX).sum(1).eq(1).all()


def test_a_run_with_streamed_examples_trains(tmp_path):
    cfg = tiny(tmp_path, max_iters=6)
    cfg["task"]["num_train"] = 0
    s = trainer.train(cfg)
    assert s["steps"] == 6 and 0.0 <= s["best_val_accuracy"] <= 1.0
    data = next((tmp_path / "data").glob("mqar-*"))
    assert np.load(data / "train_inputs.npy").shape[0] == 0  # nothing stored for training


def test_early_stop_fires_and_the_summary_records_it(tmp_path, monkeypatch):
    accs = iter([0.0, 0.5, 0.995, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])

    def fake_eval(*a, **k):
        return 1.0, next(accs)

    monkeypatch.setattr(trainer, "evaluate_task", fake_eval)
    s = trainer.train(tiny(tmp_path, early_stop_accuracy=0.99))
    assert s["early_stopped_at"] == 10 and s["steps"] == 10 < 40
    assert s["best_val_accuracy"] == s["final_val_accuracy"] == 0.995
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in rows if "val_accuracy" in r] == [0.0, 0.5, 0.995]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["early_stopped_at"] == 10


def test_mqar_run_trains_and_reports(tmp_path):
    s = trainer.train(tiny(tmp_path, max_iters=10, early_stop_accuracy=0.99))
    assert s["task"] == "mqar" and 0.0 <= s["best_val_accuracy"] <= 1.0 and s["early_stopped_at"] is None
    report = build_report(tmp_path / "run", tmp_path / "report")
    text = report.read_text()
    assert "## Recall (MQAR)" in text and "## Bake-off" not in text
    assert "| 16 | 2 | softmax | 16 |" in text
    assert (tmp_path / "report" / "recall_vs_width.png").is_file()
    assert (tmp_path / "report" / "recall_vs_state.png").is_file()


@pytest.mark.parametrize("task, words", [
    ({"seq_len": 12, "num_kv_pairs": 4}, ["seq_len", "num_kv_pairs"]),
    ({"num_kv_pairs": 20, "vocab_size": 32, "seq_len": 128}, ["num_kv_pairs", "vocab_size"]),
    ({"vocab_size": 2**31 + 2}, ["vocab_size", "int32"]),
    ({"kind": "mqa"}, ["task.kind", "mqar"]),
])
def test_bad_task_settings_fail_before_anything_is_written(tmp_path, task, words):
    cfg = tiny(tmp_path)
    cfg["task"].update(task)
    with pytest.raises(ConfigError) as e:
        trainer.train(cfg)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_early_stop_needs_a_task_with_an_accuracy():
    with pytest.raises(ConfigError, match="early_stop_accuracy"):
        load_config({"train": {"early_stop_accuracy": 0.99}})


SWEEP = """
name = "g"
base_config = "mqar"
mixers = ["softmax", "deltanet"]
learning_rates = [1e-3, 3e-3]
head_dim = 16
[overrides]
"model.pos_emb" = "none"
"model.param_budget" = "none"
"task.vocab_size" = 64
[mixer_overrides.softmax]
"model.pos_emb" = "rope"
[grid]
"model.n_embd" = [16, 48]
[[points]]
"task.seq_len" = 16
"task.num_kv_pairs" = 2
[[points]]
"task.seq_len" = 32
"task.num_kv_pairs" = 4
"train.batch_size" = 4
"""


def test_grid_and_points_expand_into_runs_with_their_ids(tmp_path):
    (tmp_path / "g.toml").write_text(SWEEP)
    runs = plan(load_sweep(tmp_path / "g.toml"), tmp_path / "out", load_data=False)
    assert len(runs) == 2 * 2 * 2 * 2 and len({r.run_id for r in runs}) == 16
    r = next(r for r in runs if r.mixer == "deltanet" and r.point == "n_embd48-seq_len32-num_kv_pairs4-batch_size4")
    assert r.run_id.startswith("deltanet-n_embd48-seq_len32-num_kv_pairs4-batch_size4-lr0.001-s")
    m, t = r.config["model"], r.config["task"]
    assert (m["n_embd"], m["n_head"], m["block_size"], m["vocab_size"], m["pos_emb"]) == (48, 3, 32, 64, "none")
    assert (t["seq_len"], t["num_kv_pairs"], r.config["train"]["batch_size"]) == (32, 4, 4)
    assert {r.config["model"]["pos_emb"] for r in runs if r.mixer == "softmax"} == {"rope"}


def test_grid_errors_name_the_key(tmp_path):
    (tmp_path / "g.toml").write_text(SWEEP.replace('"model.n_embd" = [16, 48]', '"model.n_embed" = [16]'))
    with pytest.raises(ConfigError, match="model.n_embd"):
        load_sweep(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text(SWEEP.replace('"model.n_embd" = [16, 48]', '"optim.learning_rate" = [1.0]'))
    with pytest.raises(ConfigError, match="set by the sweep"):
        load_sweep(tmp_path / "g.toml")


def test_recall_presets_plan():
    assert len(plan(load_sweep("sweeps/recall"), "/tmp/unused", load_data=False)) == 60
    assert len(plan(load_sweep("sweeps/recall-full"), "/tmp/unused", load_data=False)) == 320


@pytest.mark.parametrize("preset", ["recall", "recall-full"])
def test_the_recall_presets_show_each_training_example_once(preset):
    """With fewer examples than its steps draw, the wider models memorise the training set (train loss near 0,
    test accuracy near 0.25) instead of learning recall: results/recall-h200-2026-12-03/README.md."""
    for run in plan(load_sweep(f"sweeps/{preset}"), "/tmp/unused", load_data=False):
        c = run.config
        streamed = c["task"]["num_train"] == 0
        assert streamed or c["task"]["num_train"] >= c["train"]["max_iters"] * c["train"]["batch_size"], run.run_id


@pytest.mark.parametrize("vocab, dtype", [(8192, np.int16), (32768, np.int16), (32769, np.int32)])
def test_task_examples_use_the_narrowest_dtype_that_holds_the_vocabulary(tmp_path, vocab, dtype):
    cfg = load_config(tiny(tmp_path) | {"task": dict(TINY_TASK, vocab_size=vocab)})
    assert np.dtype(task_config(cfg.task).dtype) == dtype


def test_language_model_run_ids_do_not_depend_on_the_task_keys():
    d = RunConfig().to_dict()
    old = {sec: {k: v for k, v in vals.items() if k not in ("mlp", "early_stop_accuracy")}
           for sec, vals in d.items() if sec != "task"}
    kept = {sec: {k: v for k, v in vals.items() if f"{sec}.{k}" not in ID_EXCLUDE} for sec, vals in old.items()}
    h = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]
    assert run_id_for(d).endswith(h)


@pytest.mark.slow  # about 400 steps of batch 128: tens of seconds on an idle 2-core CPU, minutes on a busy one
def test_recall_quick_preset_trains_softmax_to_high_accuracy(tmp_path):
    """The CPU preset's softmax run (L = 64, K = 4, width 64) passes 0.9 test accuracy within its steps."""
    run = next(r for r in plan(load_sweep("sweeps/recall-quick"), tmp_path / "out", data_dir=str(tmp_path / "data"))
               if r.mixer == "softmax")
    cfg = json.loads(json.dumps(run.config))
    cfg["train"]["early_stop_accuracy"] = 0.9  # stop at the claim: the rest of the run is not needed here
    s = trainer.train(cfg)
    assert s["best_val_accuracy"] > 0.9 and s["early_stopped_at"] is not None, s


# ---------------------------------------------------------------- recall runs at other lengths (attnbench eval)


def test_recall_run_evaluated_at_other_lengths(tmp_path):
    """`attnbench eval` on an MQAR run: at its training length the run's own test accuracy and loss; at other
    lengths proportionally more pairs; a figure per run and the report's subsection."""
    cfg = tiny(tmp_path, max_iters=10)
    cfg["task"]["num_train"] = 0
    s = trainer.train(cfg)
    run = tmp_path / "run"
    rows = {r["length"]: r for r in evaluate_path(run, [8, 16, 32, 64], checkpoint="latest", device="cpu")["run"]}
    assert [rows[n]["num_kv_pairs"] for n in (8, 16, 32, 64)] == [1, 2, 4, 8]
    assert all(r["status"] == "ok" and 0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    assert rows[16]["accuracy"] == pytest.approx(s["final_val_accuracy"], abs=1e-9)
    assert rows[16]["loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    assert (run / "eval" / "lengthgen.png").is_file()
    text = build_report(run, tmp_path / "report").read_text()
    assert "### Accuracy at other lengths" in text and (tmp_path / "report" / "recall_vs_length.png").is_file()
    assert "(K' 8)" in text  # the table: accuracy and pairs at each length


def test_recall_lengths_past_learned_positions_and_impossible_ones(tmp_path):
    cfg = tiny(tmp_path, max_iters=2)
    cfg["model"]["pos_emb"] = "learned"
    trainer.train(cfg)
    rows = evaluate_path(tmp_path / "run", [16, 32], checkpoint="latest", device="cpu")["run"]
    assert [r["status"] for r in rows] == ["ok", "not_defined"] and "block_size 16" in rows[1]["reason"]
    with pytest.raises(AttnbenchError, match=r"--lengths 17: .*17 tokens with 2 pairs.*must be even"):
        evaluate_path(tmp_path / "run", [17], checkpoint="latest", device="cpu")
