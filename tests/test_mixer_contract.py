"""A new mixer needs one file: a toy mixer defined here, registered under a test-only name, passes the
model-level contract tests, the parameter matcher and the FLOP check without any other file changing.

The toy is a causal linear attention with a running mean: per head, S_t = sum_{s<=t} k_s v_s^T and
y_t = q_t S_t / (t + 1). Its full pass is the masked (T x T) form; its decode state is S and a device-side
position counter, updated in place (the contract in attnbench/mixers/base.py, the checklist in
docs/adding-a-mixer.md).
"""
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_logits_and_loss, check_prefill_then_decode_equals_forward, counted_forward_flops,
                     state_elements)

from attnbench import flops, mixers
from attnbench.bench.decode_graph import host_frozen_check
from attnbench.config import ModelConfig
from attnbench.errors import ConfigError
from attnbench.mixers import Mixer, MixerArgs, register
from attnbench.model import GPT
from attnbench.params import REQUIRED_TOL, SEARCHED_ARGS, match_shape
from attnbench.sweep import expand_mixers

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = "toy_linear_attention_for_tests"
T = 24


@dataclass
class ToyArgs(MixerArgs):
    head_dim: int | None = None  # None: n_embd // n_head; a SEARCHED_ARGS name, so the matcher varies it
    init_gain: float = 1.0  # the per-head output gain's initial value (set by reset_mixer_parameters)

    def validate(self, n_embd: int, n_head: int) -> None:
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"model.mixer_args.head_dim must be >= 1 or unset, got {self.head_dim}")
        if self.head_dim is None and n_embd % n_head:
            raise ConfigError(f"model.n_head = {n_head} does not divide model.n_embd = {n_embd}")


@dataclass
class ToyState:
    """S `[B, H, D, D]` (float32) and `pos` tokens seen; `pos_t` is the same count on the device
    (bookkeeping outside the dataclass fields: decode steps read it, so they are graph-safe)."""

    S: torch.Tensor
    pos: int = 0

    def __post_init__(self) -> None:
        self.pos_t = torch.full((1,), self.pos, dtype=torch.long, device=self.S.device)


# A mixer module decorates its class with @register("name"). Here the `toy` fixture applies the same
# decorator per test, so the toy never shows up in other test files' lists of registered mixers.
class ToyLinearAttention(Mixer):
    Args = ToyArgs
    encodes_position = False

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_head = cfg.n_head
        self.head_dim = self.args.head_dim or cfg.n_embd // cfg.n_head
        inner = self.n_head * self.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)
        self.o_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)  # the model's scaled init finds it by name
        self.gain = nn.Parameter(torch.empty(self.n_head, 1))
        self.gain._no_weight_decay = True

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.pos_emb == "rope":
            raise ConfigError("model.pos_emb='rope' does not apply to the toy mixer")

    def reset_mixer_parameters(self) -> None:
        nn.init.constant_(self.gain, self.args.init_gain)

    def forward(self, x, state: ToyState | None = None):
        B, L, _ = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, L, 3, H, D).unbind(2))  # [B, H, L, D]
        q = q * D ** -0.5
        if state is None:  # the full causal pass, masked (T x T) form
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            y = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) @ v
            count = torch.arange(1, L + 1, device=x.device)
        else:
            S0 = state.S.to(q.dtype)
            if L == 1:  # decode: in-place update, position from the device counter
                state.S.add_((k.transpose(-1, -2) @ v).to(state.S.dtype))
                y = q @ state.S.to(q.dtype)
                count = state.pos_t + 1
            else:  # prefill: what the state holds plus the new tokens' causal part
                mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
                y = q @ S0 + (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) @ v
                state.S.add_((k.transpose(-1, -2) @ v).to(state.S.dtype))
                count = torch.arange(state.pos + 1, state.pos + L + 1, device=x.device)
            state.pos += L
            state.pos_t += L
        y = y / count.view(1, 1, -1, 1).to(y.dtype) * self.gain.view(1, H, 1, 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, H * D)), state

    def init_state(self, batch, max_len, device, dtype) -> ToyState:
        return ToyState(torch.zeros(batch, self.n_head, self.head_dim, self.head_dim, device=device,
                                    dtype=torch.float32))

    @classmethod
    def _inner(cls, cfg) -> tuple[int, int]:
        a = cls.Args.from_dict(cfg.mixer_args, TOY)
        return cfg.n_head, a.head_dim or cfg.n_embd // cfg.n_head

    @classmethod
    def flops_per_token(cls, cfg, T: int) -> float:
        """qkv 2*d*3i and o_proj 2*i*d (i = heads * head_dim), plus QK^T and (QK^T)V at 2*T*i each."""
        H, D = cls._inner(cfg)
        return 2.0 * 4 * cfg.n_embd * H * D + 4.0 * T * H * D

    @classmethod
    def decode_state_elements(cls, cfg, T: int) -> int:
        H, D = cls._inner(cfg)
        return H * D * D


@pytest.fixture
def toy():
    """ToyLinearAttention in the registry for one test, removed afterwards."""
    mixers.available()  # the package's own mixers first, so the registry does not import them later
    register(TOY)(ToyLinearAttention)
    yield TOY
    del mixers._REGISTRY[TOY]


def toy_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(mixer=TOY, n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=T), **kw})
    return GPT(cfg).eval()


def test_registered_only_while_the_fixture_holds_it(toy):
    assert toy in mixers.available() and mixers.get(toy) is ToyLinearAttention
    with pytest.raises(ConfigError, match="unknown key model.mixer_args.head_dimm"):
        toy_model(mixer_args={"head_dimm": 16})
    with pytest.raises(ConfigError, match="rope"):
        toy_model(pos_emb="rope")


def test_a_registered_mixer_joins_every_sweep_that_says_all(toy):
    """`mixers = ["all"]` (bakeoff-all) and `--mixers all` (any preset) take a new mixer without an edit."""
    assert expand_mixers(["softmax", "all"]) == ["softmax"] + [m for m in mixers.everything() if m != "softmax"]
    assert toy in expand_mixers(["all"]) and set(mixers.PATTERNS) <= set(expand_mixers(["all"]))


def test_model_level_contract(toy):
    """The checks tests/test_model.py runs for every registered mixer."""
    m = toy_model()
    check_logits_and_loss(m, T)
    check_causal(m, T)
    check_batch_independent(m, T)
    check_prefill_then_decode_equals_forward(m, T)
    check_greedy_generate_same_with_and_without_cache(m, 40)


def test_init_hooks_and_graph_safe_decode(toy):
    m = toy_model(n_layer=4, mixer_args={"init_gain": 0.5})
    blk = m.blocks[0].mixer
    assert torch.equal(blk.gain, torch.full_like(blk.gain, 0.5))  # reset_mixer_parameters ran
    std = blk.o_proj.weight.std().item()  # GPT-2's scaled init: 0.02 / sqrt(2 * n_layer) ~ 0.0071
    assert 0.005 < std < 0.0095, std
    # the latency benchmark's model: no learned position table (the model indexes it by a host-side count)
    m = toy_model(pos_emb="none")
    cache = m.new_cache(1)
    with torch.no_grad():
        m(torch.randint(0, 50, (1, 6)), cache=cache)
    assert host_frozen_check(m, cache, torch.randint(0, 50, (4, 1, 1))) is None


def test_parameter_matcher(toy):
    base = ModelConfig(vocab_size=65, block_size=64)
    match = match_shape(toy, "200k", n_layer=2, base=base)
    assert abs(match.deviation) <= REQUIRED_TOL, match
    assert GPT(match.model_cfg).num_params() == match.n_params
    built = GPT(match.model_cfg).blocks[0].mixer  # the search reports the instance's head_dim / n_head
    assert (match.head_dim, match.heads) == (built.head_dim, built.n_head)
    assert match.model_cfg.mixer_args.get("head_dim") in (None, *SEARCHED_ARGS["head_dim"])


@pytest.mark.parametrize("T_", [32, 128])
def test_flops_and_state_size(toy, T_):
    """The analytic count against FlopCounterMode (as tests/test_flops.py), and decode_state_elements
    against a state prefilled with T tokens."""
    cfg = replace(toy_model().config, n_layer=1, block_size=T_, mixer_args={"head_dim": 8})
    model = GPT(cfg).eval()
    B = 2
    measured = counted_forward_flops(model, torch.randint(0, cfg.vocab_size, (B, T_)))
    predicted = flops.model_flops_per_token(cfg, T_, torch_path=True)["total"] * B * T_
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)
    cache = model.new_cache(1, T_)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, T_)), cache=cache)
    assert state_elements(cache.states) == cfg.n_layer * ToyLinearAttention.decode_state_elements(cfg, T_)


def test_the_toy_is_gone_after_its_tests():
    assert TOY not in mixers.available()
