"""A nanoGPT-style GPT whose attention is a pluggable mixer (attnbench/mixers/).

Block = LayerNorm -> mixer -> dropout -> residual -> LayerNorm -> GELU MLP -> residual (model.mlp = false:
the block ends after the mixer's residual, as in the recall models of docs/recall.md).
Everything but the mixer is identical across mixers, so comparisons differ only in the mixer.
A hybrid (`mixer = "gated_deltanet*3+softmax"`) builds each block with its layer's mixer and arguments
(attnbench.mixers.layer_names / layer_config); decoding keeps one state per block, of that block's kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import mixers
from .config import ModelConfig


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mixer = mixers.get(cfg.mixer)(cfg, layer_idx)  # cfg: the layer's own (mixers.layer_config)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        y, state = self.mixer(self.ln_1(x), state)
        x = x + self.drop(y)
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x, state


@dataclass
class Cache:
    """Decoding state of a whole model: one mixer state per layer and the tokens seen so far."""

    states: list[Any]
    max_len: int
    pos: int = 0


def labelled_positions(targets: torch.Tensor, k: int) -> torch.Tensor:
    """The k labelled positions (target not -100) of each row of targets [B, T], in position order, as a
    [B, k] index of fixed shape: topk of the 0/1 mask, which a CUDA graph can capture where boolean
    indexing would need the count on the host. Rows must label exactly k positions."""
    return (targets != -100).float().topk(k, dim=1, sorted=False).indices.sort(dim=1).values


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        mixers.check_model(config)  # every mixer of the model: its arguments and check_config
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        names = mixers.layer_names(config.mixer, config.n_layer)
        self.blocks = nn.ModuleList([Block(mixers.layer_config(config, n), i) for i, n in enumerate(names)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("o_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # mixers re-initialise what the generic rule must not touch (gates, decays, convolutions)
        for block in self.blocks:
            reset = getattr(block.mixer, "reset_mixer_parameters", None)
            if reset is not None:
                reset()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Trainable parameters (tied embedding counted once); minus position embeddings if asked."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                labels_per_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position [B, T, vocab]; loss (mean cross-entropy) when targets are given,
        over the positions whose target is not -100 (a task's unlabelled positions).

        With a `cache`, `idx` continues the sequences the cache holds (prefill or decode) and the cache
        is updated in place.

        labels_per_row: for targets that label exactly this many positions in every row (MQAR labels its K
        queries), the head and the loss run at those positions only and the logits are [B, labels_per_row,
        vocab], in position order. The loss is the same; the head's matmul and the cross-entropy over the
        vocabulary, most of a small model's step, shrink by T / labels_per_row.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size and self.wpe is not None:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size} "
                             "(learned position embeddings); crop the input")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x, st = block(x, cache.states[i] if cache is not None else None)
            if cache is not None:
                cache.states[i] = st
        if cache is not None:
            cache.pos = start + T
        x = self.ln_f(x)
        if targets is not None and labels_per_row is not None:
            pos = labelled_positions(targets, labels_per_row)
            x = x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            targets = targets.gather(1, pos)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> Cache:
        max_len = max_len or self.config.block_size
        p = self.lm_head.weight
        device = device or p.device
        dtype = dtype or (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() and p.is_cuda else p.dtype)
        return Cache([b.mixer.init_state(batch, max_len, device, dtype) for b in self.blocks], max_len)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` [B, T]. temperature=0 is greedy.

        The context is cropped to the last block_size tokens, as nanoGPT does. With `use_cache` the
        prompt is prefilled once and each new token costs one decode step from the mixers' states;
        when the cache is full the cropped context is prefilled again, so both paths see the same
        tokens. `use_cache=False` recomputes the whole context every step (the reference path).
        """
        bs = self.config.block_size
        cache = None
        logits = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -bs:])[0][:, -1]
            elif cache is None or cache.pos >= cache.max_len:
                cache = self.new_cache(idx.shape[0], bs)
                logits = self(idx[:, -bs:], cache=cache)[0][:, -1]
            else:
                logits = self(idx[:, -1:], cache=cache)[0][:, -1]
            nxt = sample_next(logits, temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]; temperature 0 picks the argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
