"""Model-level contracts for every registered mixer: causality, batch independence, cached decoding.

The checks live in tests/helpers.py, so tests/test_mixer_contract.py runs the same ones on a toy mixer.
"""
import pytest
import torch
from helpers import (check_batch_independent, check_causal, check_greedy_generate_same_with_and_without_cache,
                     check_logits_and_loss, check_prefill_then_decode_equals_forward)

from attnbench import GPT, GPTConfig, mixers
from attnbench.errors import ConfigError
from attnbench.model import sample_next

T = 24  # the tiny models' block_size: 40 generated tokens run past it

# Small shapes that every mixer accepts on the CPU (mixer_args shrink NSA's blocks to fit T=24).
MIXER_ARGS = {
    "nsa": {"n_kv_head": 1, "block_size": 4, "block_counts": 2, "window_size": 8},
    "deltanet": {"chunk_size": 16},  # several chunks at T=24
    "gated_deltanet": {"chunk_size": 16},
    "gated_deltaproduct": {"num_householder": 3},  # interleaved length 72: two chunks of 64
    "swa": {"window": 8},  # the ring buffer wraps at T=24
    "mamba2": {"head_dim": 16, "d_state": 16, "chunk_size": 16},  # 4 heads, two chunks at T=24
    "gla": {"chunk_size": 16},  # several chunks at T=24
}


def tiny_model(mixer: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(mixer=mixer, n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=T,
                    mixer_args=MIXER_ARGS.get(mixer, {}), **kw)
    return GPT(cfg).eval()


@pytest.fixture(params=mixers.available())
def mixer(request):
    return request.param


def test_registry_lists_softmax():
    assert "softmax" in mixers.available()


def test_logits_shape_and_loss(mixer):
    check_logits_and_loss(tiny_model(mixer), T)


def test_causal(mixer):
    check_causal(tiny_model(mixer), T)


def test_batch_independent(mixer):
    check_batch_independent(tiny_model(mixer), T)


def test_prefill_then_decode_equals_forward(mixer):
    check_prefill_then_decode_equals_forward(tiny_model(mixer), T)


def test_greedy_generate_same_with_and_without_cache(mixer):
    check_greedy_generate_same_with_and_without_cache(tiny_model(mixer), 40)


@pytest.mark.parametrize("pos_emb", ["rope", "none"])
def test_position_variants_softmax(pos_emb):
    m = tiny_model("softmax", pos_emb=pos_emb)
    assert (m.wpe is None)
    x = torch.randint(0, 50, (2, 24))
    ref = m(x)[0]
    cache = m.new_cache(2)
    got = torch.cat([m(x[:, :10], cache=cache)[0]] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(10, 24)], 1)
    assert (got - ref).norm() / ref.norm() < 1e-4


def test_weight_tying_and_param_count():
    m = tiny_model("softmax")
    assert m.wte.weight is m.lm_head.weight
    assert m.num_params() == sum(p.numel() for p in m.parameters())


def test_sample_next_greedy_and_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert sample_next(logits, 0).flatten().tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, top_k=1, generator=g) for _ in range(20)], 1)
    assert (draws[0] == 1).all() and (draws[1] == 0).all()


def test_softmax_attn_dropout_setting():
    """mixer_args.attn_dropout: unset follows model.dropout (nanoGPT: attention probabilities dropped in
    training), 0 turns it off (as the mixers without an attention matrix) while model.dropout stays."""
    x = torch.randn(2, 16, 32)
    for attn_dropout, stochastic in ((None, True), (0.0, False)):
        args = {} if attn_dropout is None else {"attn_dropout": attn_dropout}
        cfg = GPTConfig(mixer="softmax", n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.5, mixer_args=args)
        mixer = GPT(cfg).blocks[0].mixer.train()
        a, b = mixer(x)[0], mixer(x)[0]
        assert (not torch.equal(a, b)) == stochastic, attn_dropout
    with pytest.raises(ConfigError, match="attn_dropout"):
        GPT(GPTConfig(mixer="softmax", n_layer=1, n_head=2, n_embd=32, block_size=16, mixer_args={"attn_dropout": 1.5}))
