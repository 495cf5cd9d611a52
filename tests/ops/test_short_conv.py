"""Short causal convolution on the CPU: the literal definition, state continuation, causality, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnbench.errors import AttnbenchError
from attnbench.ops.short_conv import causal_conv1d

B, D = 2, 6


def literal(x, weight, bias, activation, state):
    """y_t[d] = act(sum_w weight[d, w] x_{t-W+1+w}[d] + bias[d]); positions before 0 come from the state."""
    Bx, T, Dx = x.shape
    W = weight.shape[1]
    hist = state.transpose(1, 2) if state is not None else x.new_zeros(Bx, W - 1, Dx)
    xs = torch.cat([hist, x], 1)  # xs[:, W-1+t] = x_t
    y = torch.zeros_like(x)
    for t in range(T):
        for w in range(W):
            y[:, t] += weight[:, w] * xs[:, t + w]
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation else y


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_matches_literal_definition(W, T):
    torch.manual_seed(W * 100 + T)
    x = torch.randn(B, T, D, dtype=torch.float64)
    weight, bias = torch.randn(D, W, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    state = torch.randn(B, D, W - 1, dtype=torch.float64)
    for act in ("silu", None):
        for b in (bias, None):
            for s in (state, None):
                y, new = causal_conv1d(x, weight, b, activation=act, state=s, output_final_state=True)
                assert torch.allclose(y, literal(x, weight, b, act, s), rtol=1e-12, atol=1e-12)
                # the new state is the last W-1 raw inputs (history included when T < W-1)
                hist = s if s is not None else torch.zeros_like(state)
                assert torch.equal(new, torch.cat([hist, x.transpose(1, 2)], -1)[..., T + W - 1 - (W - 1):])
    y, new = causal_conv1d(x, weight, bias)
    assert new is None and y.shape == x.shape


def test_state_continuation_prefill_then_steps():
    torch.manual_seed(0)
    W, T, T0 = 4, 20, 2  # a prefill shorter than W-1 must still carry the history correctly
    x = torch.randn(B, T, D, dtype=torch.float64)
    weight, bias = torch.randn(D, W, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    s0 = torch.randn(B, D, W - 1, dtype=torch.float64)
    y_full, s_full = causal_conv1d(x, weight, bias, state=s0, output_final_state=True)
    y_pre, s = causal_conv1d(x[:, :T0], weight, bias, state=s0, output_final_state=True)
    outs = [y_pre]
    for t in range(T0, T):
        y_t, s = causal_conv1d(x[:, t:t + 1], weight, bias, state=s, output_final_state=True)
        outs.append(y_t)
    assert torch.allclose(torch.cat(outs, 1), y_full, rtol=1e-12, atol=1e-12)
    assert torch.equal(s, s_full)


def test_causality_and_batch_independence():
    torch.manual_seed(1)
    W, T, t0 = 4, 12, 5
    x = torch.randn(3, T, D)
    weight = torch.randn(D, W)
    y0, _ = causal_conv1d(x, weight)
    x2 = x.clone()
    x2[1, t0] += 1.0
    y1, _ = causal_conv1d(x2, weight)
    assert torch.equal(y1[:, :t0], y0[:, :t0])          # nothing before t0 sees x_t0
    assert not torch.equal(y1[1, t0], y0[1, t0])        # t0 itself does
    assert torch.equal(y1[[0, 2]], y0[[0, 2]])          # other sequences are untouched
    assert torch.equal(y1[1, t0 + W:], y0[1, t0 + W:])  # the receptive field ends after W tokens


def test_gradients_including_state():
    torch.manual_seed(2)
    x = torch.randn(B, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, s):
        y, new = causal_conv1d(x, w, b, state=s, output_final_state=True)
        return y, new

    assert torch.autograd.gradcheck(f, (x, w, b, s))


def test_dtypes_and_errors():
    x = torch.randn(B, 4, D, dtype=torch.bfloat16)
    w = torch.randn(D, 4)  # float32 parameters with bf16 activations
    y, s = causal_conv1d(x, w, torch.randn(D), output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    with pytest.raises(AttnbenchError, match="CUDA"):
        causal_conv1d(x, w, backend="fla")
    with pytest.raises(AttnbenchError, match="bogus"):
        causal_conv1d(x, w, backend="bogus")
    with pytest.raises(AttnbenchError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(AttnbenchError, match="state"):
        causal_conv1d(x, w, state=torch.zeros(B, D, 4))
