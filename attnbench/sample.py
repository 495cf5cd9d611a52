"""`attnbench sample`: text from a trained run's latest checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .checkpoint import best_checkpoint, load_checkpoint, resume_checkpoint
from .config import RunConfig
from .data import Corpus
from .resolve import load_config
from .errors import AttnbenchError, did_you_mean
from .model import GPT


CHECKPOINTS = ("latest", "best")


def load_run(out_dir: str | Path, device: str = "cpu") -> tuple[GPT, RunConfig]:
    """The model of a run folder, with the weights of its latest checkpoint, in eval mode."""
    model, cfg, _ = load_run_checkpoint(out_dir, "latest", device)
    return model, cfg


def load_run_checkpoint(out_dir: str | Path, which: str = "latest", device: str = "cpu"
                        ) -> tuple[GPT, RunConfig, Path]:
    """The model of a run folder in eval mode, with the weights of its newest intact checkpoint ("latest")
    or of its best validation loss ("best", ckpt/best.json), and that checkpoint's folder."""
    run = Path(out_dir)
    if which not in CHECKPOINTS:
        raise AttnbenchError(f"unknown checkpoint {which!r}: use one of {', '.join(CHECKPOINTS)}"
                             f"{did_you_mean(which, CHECKPOINTS)}")
    if not (run / "config.json").is_file():
        raise AttnbenchError(f"{run} is not a run folder (no config.json); pass the --out_dir of a training run")
    cfg = load_config(json.loads((run / "config.json").read_text()))
    if which == "best":
        ckpt = best_checkpoint(run)
        if ckpt is None:
            raise AttnbenchError(f"{run} has no best checkpoint (ckpt/best.json and the folder it names): it was "
                                 "trained by an attnbench that did not keep one, or not evaluated yet; use "
                                 "--checkpoint latest")
    else:
        ckpt = resume_checkpoint(run)  # the newest intact one; damaged folders stay, with a warning
        if ckpt is None:
            raise AttnbenchError(f"{run} has no checkpoint yet; train it first (attnbench train ...)")
    cfg.model.dropout = 0.0
    model = GPT(cfg.model)
    load_checkpoint(ckpt, model)
    return model.to(device).eval(), cfg, ckpt


def sample(out_dir: str, start: str = "\n", num_samples: int = 3, max_new_tokens: int = 500, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 1337, device: str = "auto", use_cache: bool = True) -> list[str]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, cfg = load_run(out_dir, device)
    corpus = Corpus.load(cfg.data.data_dir, cfg.data.dataset)
    if corpus.vocab_size != cfg.model.vocab_size:
        raise AttnbenchError(f"{corpus.folder / 'meta.json'} has {corpus.vocab_size} tokens but the run in {out_dir} was "
                             f"trained on {cfg.model.vocab_size}: the dataset was prepared again from another text or "
                             "tokenizer; prepare it again from the run's own source text")
    if start.startswith("FILE:"):
        start = Path(start[5:]).read_text()
    ids = corpus.encode(start)
    if not ids:
        raise AttnbenchError("--start is empty; give at least one character")
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache, generator=gen)
    return [corpus.decode(row.tolist()) for row in y]


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--out_dir", required=True, help="run folder written by `attnbench train`")
    p.add_argument("--start", default="\n", help='prompt text, or FILE:path.txt (default: a newline)')
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context per token (reference path)")

    def run(a: argparse.Namespace) -> int:
        for i, text in enumerate(sample(a.out_dir, a.start, a.num_samples, a.max_new_tokens, a.temperature,
                                        a.top_k, a.seed, a.device, not a.no_cache)):
            print(text)
            print("---------------")
        return 0

    p.set_defaults(func=run)
