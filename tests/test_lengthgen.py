"""Length generalisation (`attnbench eval`, attnbench/evaluate/): bucket losses are the model's own token
losses, the training length reproduces the trainer's validation loss, each mixer's long forward equals
its token-by-token decoding past the training length, learned positions give "not defined" rows,
impossible requests are named errors, the best checkpoint survives pruning, and the CPU preset runs
end to end into the report's section."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from attnbench import mixers
from attnbench.checkpoint import best_checkpoint, save_checkpoint
from attnbench.config import ModelConfig
from attnbench.data import Corpus, val_windows
from attnbench.errors import AttnbenchError, ConfigError
from attnbench.evaluate import bucket_edges, eval_windows, evaluate_path, parse_lengths
from attnbench.evaluate import run as eval_run
from attnbench.evaluate.run import evaluate_length
from attnbench.model import GPT
from attnbench.report import build_report
from attnbench.sweep import load_sweep
from attnbench.trainer import train
from conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(mixer: str, pos_emb: str, block: int = 16, dtype=torch.float32, n_layer: int = 2, **args) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, n_layer=n_layer, n_head=2, n_embd=32, block_size=block, vocab_size=23,
                      dropout=0.0, pos_emb=pos_emb, mixer_args=args)
    return GPT(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tiny softmax run with learned positions (block 32), keep_checkpoints=1."""
    out = tmp_path_factory.mktemp("runs") / "r"
    train(tiny_run_config(tiny_data, out, **{"train.keep_checkpoints": 1}))
    return out


def test_bucket_edges_cover_every_position_once():
    assert bucket_edges(16) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
    assert bucket_edges(20)[-1] == (16, 20)
    for n in (1, 7, 64, 100):
        covered = [p for lo, hi in bucket_edges(n) for p in range(lo, hi)]
        assert covered == list(range(n))


def test_position_curve_takes_each_bucket_from_the_shortest_windows_that_hold_it():
    """A causal model's loss at position t is the same quantity in windows of any length > t: the report's
    curve takes each bucket from the most numerous windows (the shortest that hold it), so the few longest
    windows' noisy early buckets neither draw the curve nor win "lowest loss"."""
    from attnbench.report.lengthgen import lowest_position, position_curve

    def row(length, windows, losses):
        return {"length": length, "status": "ok", "windows": windows,
                "buckets": [{"lo": lo, "hi": hi, "loss": v, "tokens": windows * (hi - lo)}
                            for (lo, hi), v in zip(bucket_edges(length), losses)]}

    short = row(8, 100, [3.0, 2.5, 2.0, 1.8])
    long_ = row(32, 2, [3.1, 0.5, 2.2, 1.7, 1.6, 1.9])  # position 1 of two windows: 0.5 by chance
    curve = position_curve([long_, {"length": 64, "status": "not_defined"}, short])
    assert [(b["lo"], b["loss"], b["length"]) for b in curve] == \
        [(0, 3.0, 8), (1, 2.5, 8), (2, 2.0, 8), (4, 1.8, 8), (8, 1.6, 32), (16, 1.9, 32)]
    assert lowest_position([short, long_]) == "8-15 of 32"


def test_bucket_losses_are_the_mean_of_the_models_token_losses():
    model = _tiny_model("softmax", "rope")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(23, (5, 48), generator=g), torch.randint(23, (5, 48), generator=g)
    sums, _ = evaluate_length(model, x, y, "cpu", batch_tokens=2 * 48)  # batches of 2, 2, 1 windows
    with torch.no_grad():
        logp = model(x)[0].double().log_softmax(-1)
    tok = -logp.gather(-1, y[..., None])[..., 0]  # [5, 48], by hand
    for b in sums.rows():
        want = tok[:, b["lo"]:b["hi"]].mean().item()
        assert b["loss"] == pytest.approx(want, rel=1e-5), b
        assert b["tokens"] == 5 * (b["hi"] - b["lo"])
        per_window = tok[:, b["lo"]:b["hi"]].mean(1)  # the spread over windows, by hand
        assert b["se"] == pytest.approx((per_window.std() / 5 ** 0.5).item(), rel=1e-4, abs=1e-9), b
    assert sums.mean() == pytest.approx(tok.mean().item(), rel=1e-5)
    assert sums.mean_se() == pytest.approx((tok.mean(1).std() / 5 ** 0.5).item(), rel=1e-4)


# small windows and blocks, so that 64 tokens run past them
SMALL_ARGS = {"nsa": {"block_size": 4, "block_counts": 2, "window_size": 8, "head_dim": 16}, "swa": {"window": 8}}


def _long_cases() -> list:
    """Every registered mixer and hybrid pattern without position embeddings (a registered mixer joins
    without an edit here), and softmax with RoPE."""
    cases = []
    for m in mixers.everything():
        if mixers.is_hybrid(m):
            args = {c: SMALL_ARGS[c] for c in mixers.components(m) if c in SMALL_ARGS}
        else:
            args = SMALL_ARGS.get(m, {})
        cases.append((m, "none", args))
    return cases + [("softmax", "rope", {})]


@pytest.mark.parametrize("mixer,pos_emb,args", _long_cases())
def test_long_forward_equals_token_by_token_decoding_past_the_training_length(mixer, pos_emb, args):
    """Trained at 16 (block_size), run at 64: the full forward (the path `attnbench eval` takes) and one
    decode step per token from the mixers' states give the same logits."""
    model = _tiny_model(mixer, pos_emb, block=16, dtype=torch.float64, n_layer=max(2, mixers.pattern_length(mixer)),
                        **args)
    x = torch.randint(23, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)[0]
        cache = model.new_cache(2, max_len=64, dtype=torch.float64)
        steps = torch.cat([model(x[:, t:t + 1], cache=cache)[0] for t in range(64)], dim=1)
    assert torch.allclose(full, steps, atol=1e-9, rtol=1e-7), (full - steps).abs().max()


def test_training_length_reproduces_the_recorded_validation_loss(trained, tiny_data):
    summary = json.loads((trained / "summary.json").read_text())
    corpus = Corpus.load(tiny_data, "tiny")
    for a, b in zip(eval_windows(corpus.val, 32), val_windows(corpus.val, 32)):  # the trainer's windows
        assert torch.equal(a, b)
    best = evaluate_path(trained, [32], "best", "cpu", batch_tokens=7 * 32)[trained.name][0]
    assert best["status"] == "ok" and best["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5)
    latest = evaluate_path(trained, [32], "latest", "cpu")[trained.name][0]
    assert latest["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert latest["windows"] == (len(corpus.val) - 1) // 32 and latest["tokens"] == latest["windows"] * 32
    rows = [json.loads(x) for x in (trained / "eval" / "lengthgen.jsonl").read_text().splitlines()]
    assert {(r["checkpoint"], r["length"]) for r in rows} == {("best", 32), ("latest", 32)}
    assert (trained / "eval" / "lengthgen.png").is_file()


def test_learned_positions_past_block_size_are_not_defined(trained):
    rows = evaluate_path(trained, [32, 128], "best", "cpu")[trained.name]
    by = {r["length"]: r for r in rows}
    assert by[32]["status"] == "ok"
    assert by[128]["status"] == "not_defined" and "block_size 32" in by[128]["reason"]
    assert "loss" not in by[128] and "windows" not in by[128]  # nothing truncated, nothing computed
    md = build_report(trained.parent).read_text()
    assert "## Length generalisation" in md and "not defined" in md


def test_best_checkpoint_is_kept_by_pruning(tmp_path):
    model = torch.nn.Linear(2, 2)
    first = save_checkpoint(tmp_path, 1, model, {}, keep=1, best_val=2.0)
    save_checkpoint(tmp_path, 2, model, {}, keep=1)
    third = save_checkpoint(tmp_path, 3, model, {}, keep=1)
    assert first.is_dir() and best_checkpoint(tmp_path) == first  # older than keep allows, still there
    assert {p.name for p in (tmp_path / "ckpt").glob("step_*")} == {first.name, third.name}
    fourth = save_checkpoint(tmp_path, 4, model, {}, keep=1, best_val=1.0)
    assert best_checkpoint(tmp_path) == fourth and not first.exists()  # the old best goes once replaced


def test_impossible_requests_are_named_errors_before_any_work(trained, tmp_path):
    n_val = len(Corpus.load(json.loads((trained / "config.json").read_text())["data"]["data_dir"], "tiny").val)
    before = (trained / "eval" / "lengthgen.jsonl").read_text() if (trained / "eval").exists() else None
    with pytest.raises(AttnbenchError, match=f"length {n_val} is longer than the validation split"):
        evaluate_path(trained, [32, n_val], "best", "cpu")
    with pytest.raises(AttnbenchError, match="unknown checkpoint 'bets'.*did you mean 'best'"):
        evaluate_path(trained, [32], "bets", "cpu")
    with pytest.raises(AttnbenchError, match="neither a run folder"):
        evaluate_path(tmp_path, [32], "best", "cpu")
    with pytest.raises(AttnbenchError, match="'x' is not a whole number"):
        parse_lengths("32,x")
    after = (trained / "eval" / "lengthgen.jsonl").read_text() if (trained / "eval").exists() else None
    assert before == after
    no_best = tmp_path / "old"
    no_best.mkdir()
    for f in ("config.json", "summary.json"):
        (no_best / f).write_text((trained / f).read_text())
    with pytest.raises(AttnbenchError, match="no best checkpoint"):
        evaluate_path(no_best, [32], "best", "cpu")


def test_out_of_memory_halves_the_batch_then_reports_the_length(monkeypatch):
    model = _tiny_model("deltanet", "none")
    x = y = torch.randint(23, (8, 32), generator=torch.Generator().manual_seed(3))
    real = eval_run._losses
    seen = []

    def tight(model, xb, yb, *rest):
        seen.append(len(xb))
        if len(xb) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, xb, yb, *rest)

    monkeypatch.setattr(eval_run, "_losses", tight)
    sums, batch = evaluate_length(model, x, y, "cpu", batch_tokens=8 * 32)
    assert batch == 2 and sums.windows == 8 and seen[:3] == [8, 4, 2]
    ref, _ = evaluate_length(model, x, y, "cpu", batch_tokens=2 * 32)
    assert sums.mean() == pytest.approx(ref.mean(), rel=1e-6)

    def never(*a):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(eval_run, "_losses", never)
    assert evaluate_length(model, x, y, "cpu", batch_tokens=8 * 32) == (None, 1)


def test_sweep_variants_and_eval_table(tmp_path):
    base = 'base_config = "cpu_tiny"\nmixers = ["softmax", "softmax_nope"]\n'
    good = base + '[variants]\nsoftmax_nope = "softmax"\n[mixer_overrides.softmax_nope]\n"model.pos_emb" = "none"\n' \
                  '[eval]\nlengths = [64, 256]\ncheckpoint = "latest"\n'
    (tmp_path / "s.toml").write_text(good)
    sw = load_sweep(tmp_path / "s.toml")
    assert sw.mixer_of("softmax_nope") == "softmax" and sw.eval.lengths == [64, 256]
    for text, err in [(base, "unknown mixer|not a registered|softmax_nope"),
                      (base + '[variants]\nsoftmax_nope = "sofmax"\n', "sofmax"),
                      (good.replace('checkpoint = "latest"', 'checkpoint = "final"'), "eval.checkpoint 'final'"),
                      (good.replace("lengths = [64, 256]", "lengths = []"), "eval.lengths")]:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=err):
            load_sweep(tmp_path / "bad.toml")


@pytest.mark.slow
def test_lengthgen_quick_preset_end_to_end(tmp_path):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "lord", "my", "and", "thou", "art", "love"]
    (tmp_path / "input.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)))
    cmd = [sys.executable, "-m", "attnbench", "run", "--preset", "lengthgen-quick", "--out", "res", "--input",
           str(tmp_path / "input.txt"), "--status_interval", "30", "--jobs_per_device", "3"]
    for kv in ("train.max_iters=4", "train.eval_interval=2", "train.log_interval=2", "optim.warmup_iters=1",
               "optim.lr_decay_iters=4"):
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k != "ATTNBENCH_DATA"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (tmp_path / "res" / "report" / "report.md").read_text()
    section = md.split("## Length generalisation", 1)[1].split("\n## ", 1)[0]
    for label in ("softmax", "softmax_nope", "deltanet", "gated_deltanet", "gated_deltaproduct", "nsa"):
        assert f"| {label} |" in section
    assert "64x (1024)" in section and (tmp_path / "res" / "report" / "loss_vs_position.png").is_file()
    rows = [json.loads(x) for f in (tmp_path / "res" / "runs").glob("*/eval/lengthgen.jsonl")
            for x in f.read_text().splitlines()]
    assert len(rows) == 6 * 4 and all(r["status"] == "ok" for r in rows)
    assert all(b["se"] is not None and b["se"] >= 0 for r in rows for b in r["buckets"])
    assert "2 standard errors" in section and " ± " in section
