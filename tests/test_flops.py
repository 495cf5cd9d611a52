"""Model-level FLOPs and state sizes (attnbench/flops.py) against FlopCounterMode and real caches.

The analytic counts come from each mixer class (`flops_per_token`, `decode_state_elements`); these tests check
the whole GPT at the 10.7M-parameter matched shapes (1-2 layers to stay fast).
"""
import dataclasses
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attnbench import flops, mixers
from attnbench.config import ModelConfig
from attnbench.mixers.base import Mixer
from attnbench.model import GPT
from attnbench.params import match_all

MIXERS = mixers.available()


def _lacks(name: str, method: str) -> bool:
    return getattr(mixers.get(name), method).__func__ is getattr(Mixer, method).__func__


def _skip_without(name: str, method: str) -> None:
    if _lacks(name, method):
        pytest.skip(f"mixer {name!r} does not implement {method} yet")


@pytest.fixture(scope="module")
def matches():
    return match_all("10.7M")


@pytest.fixture(scope="module")
def shapes(matches) -> dict[str, ModelConfig]:
    return {m.mixer: m.model_cfg for m in matches}


def counted_forward_flops(model: GPT, idx: torch.Tensor) -> int:
    # The CPU's fused SDPA kernel has no FlopCounterMode formula (it would count 0), so attention runs
    # on the math backend, whose QK^T and AV matmuls the counter sees at their full T x T size.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops()


@pytest.mark.parametrize("T", [64, 256, 1024])
@pytest.mark.parametrize("mixer", MIXERS)
def test_model_flops_match_flop_counter(mixer, T, shapes):
    """Formula x B x T vs FlopCounterMode on a forward of the whole GPT (torch backend, CPU, float32).

    NSA: its PyTorch path computes the selection and window branches as dense masked T x T attention,
    so the comparison uses `flops_per_token_torch` (torch_path=True); its `flops_per_token` is the
    sparse algorithm's (smaller) cost. The delta family's formulas include the chunked triangular
    solve, which the counter does not see (~1% here).
    """
    _skip_without(mixer, "flops_per_token")
    cfg = replace(shapes[mixer], n_layer=1, block_size=T, backend="torch", dropout=0.0)
    B = 2 if T == 64 else 1
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    measured = counted_forward_flops(model, torch.randint(0, cfg.vocab_size, (B, T)))
    predicted = flops.model_flops_per_token(cfg, T, torch_path=True)["total"] * B * T
    assert abs(predicted / measured - 1) < 0.05, (mixer, T, predicted, measured)


def test_parts_of_the_softmax_model():
    cfg = ModelConfig()  # the nanoGPT baseline: d=384, 6 layers, vocab 65, block 256
    d, L, V, T = 384, 6, 65, 256
    f = flops.model_flops_per_token(cfg)  # T defaults to block_size
    assert f["mixer"] == L * (8 * d * d + 4 * T * d)
    assert f["mlp"] == L * 16 * d * d and f["lm_head"] == 2 * d * V and f["embeddings"] == 0
    assert f["total"] == f["mixer"] + f["mlp"] + f["lm_head"]
    assert flops.train_flops_per_token(cfg) == 3 * f["total"]
    assert flops.train_flops_per_token(cfg, 1024) == 3 * flops.model_flops_per_token(cfg, 1024)["total"]
    assert flops.decode_state_elements(cfg, T) == L * 2 * T * d


def _numel(state) -> int:
    if torch.is_tensor(state):
        return state.numel()
    if dataclasses.is_dataclass(state):
        return sum(_numel(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (list, tuple)):
        return sum(_numel(s) for s in state)
    if isinstance(state, dict):
        return sum(_numel(s) for s in state.values())
    return 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_state_elements_equal_the_cache(mixer, shapes):
    """After a prefill of T tokens into a cache of exactly T, the states hold decode_state_elements(cfg, T)."""
    _skip_without(mixer, "decode_state_elements")
    cfg = replace(shapes[mixer], n_layer=2, block_size=64, backend="torch")
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    for T in (1, 40):
        cache = model.new_cache(1, T)
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, T)), cache=cache)
        assert sum(_numel(s) for s in cache.states) == flops.decode_state_elements(cfg, T), (mixer, T)


def test_crossover_is_where_a_mixer_stays_cheaper(shapes):
    soft = shapes["softmax"]
    assert flops.crossover_T(soft, soft) is None
    assert flops.crossover_T(replace(soft, n_embd=512, n_head=8), soft) is None  # always dearer
    found = 0
    for name, cfg in shapes.items():
        if name == "softmax" or _lacks(name, "flops_per_token"):
            continue
        for part in ("total", "mixer"):
            c = flops.crossover_T(cfg, soft, part=part)
            assert c is not None and c > 1, (name, part)
            cost = lambda T: flops.model_flops_per_token(cfg, T)[part] - flops.model_flops_per_token(soft, T)[part]  # noqa: E731
            assert cost(c - 1) >= 0, (name, part, c)
            assert all(cost(T) < 0 for T in range(c, c + 1500, 7)), (name, part, c)
            found += 1
    assert found or len(shapes) == 1


def test_flops_table_at_256_and_8192(matches):
    ms = matches
    rows = flops.flops_table(ms, Ts=(256, 8192))
    have = [m.mixer for m in ms if not _lacks(m.mixer, "flops_per_token")]
    assert [(r["mixer"], r["T"]) for r in rows] == [(n, T) for n in have for T in (256, 8192)]
    for r in rows:
        assert 0 < r["mixer_flops"] < r["total_flops"]
        if r["mixer"] == "softmax":
            assert r["vs_softmax"] == 1.0 and r["crossover_T"] is None
        elif r["T"] == 8192:  # every alternative is cheaper than softmax at long context
            assert r["vs_softmax"] < 1 and r["crossover_T"] <= 8192, r
    text = flops.format_flops_table(rows)
    assert "T=8192" in text and all(n in text for n in have)
