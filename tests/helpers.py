"""Test helpers shared by several test files."""
import contextlib
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attnbench.ops import fla_preload
from attnbench.ops.nsa import nsa_cache_means


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64; the absolute norm when ref is exactly zero (e.g. a gradient
    that is zero at T = 1)."""
    diff, norm = (a.double() - ref.double()).norm().item(), ref.double().norm().item()
    return diff / norm if norm > 0 else diff


def nsa_random_cache(L: int, T: int, device: str = "cpu", D: int = 64, block_size: int = 32, seed: int = 0):
    """A bf16 NSA decode cache of L positions (one sequence, one KV head), the first T random, and its block
    means: (kv `[2, 1, 1, L, D]`, kv_means `[2, 1, 1, ceil(L / BS), D]`)."""
    torch.manual_seed(seed)
    kv = torch.zeros(2, 1, 1, L, D, dtype=torch.bfloat16, device=device)
    kv[:, :, :, :T] = torch.randn(2, 1, 1, T, D, device=device).bfloat16()
    return kv, nsa_cache_means(kv, block_size)


def fla_selection(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int) -> torch.Tensor:
    """The block_indices FLA's `parallel_nsa` computes internally, by the same calls
    (fla/ops/nsa/parallel.py), so a reference can be fed FLA's own selection (GPU tests only)."""
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.nsa.parallel import parallel_nsa_topk
    from fla.ops.utils.pooling import mean_pooling

    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        k_cmp = mean_pooling(k, block_size)
        _, lse = parallel_nsa_compression(q, k_cmp, k_cmp, k.shape[1], block_size=block_size, scale=scale)
        return parallel_nsa_topk(q=q, k=k_cmp, TK=k.shape[1], lse=lse, block_counts=block_counts,
                                 block_size=block_size, scale=scale)


class OpLog(TorchDispatchMode):
    """(op, output shapes) of every aten call; host syncs and data-dependent shapes are errors."""

    FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique_dim", "_unique2",
                 "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        assert name not in self.FORBIDDEN, f"{name}: a host sync or a data-dependent shape"
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def out_and_grads(fn, inputs: list[torch.Tensor], do: torch.Tensor, **kw) -> tuple[torch.Tensor, tuple]:
    """fn(*inputs) and the gradients of sum(o * do) with respect to every input (fresh leaf copies)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = fn(*xs, **kw)
    grads = torch.autograd.grad((o * do).sum(), xs)
    return o.detach(), grads


def record_fla_captures(monkeypatch) -> list:
    """Replace ops.fla_preload.capturing by a recorder: the returned list gets (mixer, phase) on entering
    a capture and "left" on leaving it."""
    events: list = []

    @contextlib.contextmanager
    def capturing(mixer: str, phase: str):
        events.append((mixer, phase))
        yield
        events.append("left")

    monkeypatch.setattr(fla_preload, "capturing", capturing)
    return events


# ---------------------------------------------------------------- the model-level mixer contract
# Checks every mixer must pass, on a small GPT built around it (tests/test_model.py runs them for every
# registered mixer, tests/test_mixer_contract.py for a toy mixer defined in that file).


def check_logits_and_loss(model, T: int) -> None:
    """Logits [B, T, vocab]; a finite scalar loss when targets are given."""
    V = model.config.vocab_size
    x = torch.randint(0, V, (3, T))
    logits, loss = model(x)
    assert logits.shape == (3, T, V) and loss is None
    _, loss = model(x, x)
    assert loss.ndim == 0 and torch.isfinite(loss)


def check_causal(model, T: int) -> None:
    """Changing token t changes no logit before t, and changes some logit from t on."""
    V = model.config.vocab_size
    x = torch.randint(0, V, (2, T))
    ref = model(x)[0]
    for t in sorted({0, T // 4, T // 2 + 1, T - 1}):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out = model(y)[0]
        assert torch.equal(out[:, :t], ref[:, :t]), f"position < {t} changed"
        assert not torch.allclose(out[:, t:], ref[:, t:])


def check_batch_independent(model, T: int) -> None:
    """Perturbing sequence j leaves every other sequence's logits unchanged (no mixing across the batch)."""
    V = model.config.vocab_size
    x = torch.randint(0, V, (4, T))
    ref = model(x)[0]
    for j in range(4):
        y = x.clone()
        y[j] = torch.randint(0, V, (T,))
        out = model(y)[0]
        others = [i for i in range(4) if i != j]
        torch.testing.assert_close(out[others], ref[others], rtol=0, atol=1e-6)
        assert not torch.allclose(out[j], ref[j])


def check_prefill_then_decode_equals_forward(model, T: int, splits=(1, 7, 16), tol: float = 1e-4) -> None:
    """A prefill of `split` tokens into a fresh cache, then one decode step per token: the same logits
    as the full pass."""
    x = torch.randint(0, model.config.vocab_size, (2, T))
    ref = model(x)[0]
    for split in splits:
        cache = model.new_cache(2)
        outs = [model(x[:, :split], cache=cache)[0]]
        for t in range(split, T):
            outs.append(model(x[:, t:t + 1], cache=cache)[0])
        err = rel_err(torch.cat(outs, dim=1), ref)
        assert err < tol, f"split {split}: rel err {err:.2e}"


def check_greedy_generate_same_with_and_without_cache(model, new_tokens: int) -> None:
    """Greedy generation past block_size (so the cached path also re-prefills a cropped window) gives the
    same tokens from the decode states as from recomputing the whole context."""
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    a = model.generate(x, new_tokens, temperature=0, use_cache=True)
    b = model.generate(x, new_tokens, temperature=0, use_cache=False)
    assert a.shape == (2, 5 + new_tokens)
    assert torch.equal(a, b)


def state_elements(state) -> int:
    """Elements of every tensor in the dataclass fields of a decode state (lists, tuples and dicts
    followed); bookkeeping kept outside the fields, such as a device-side position counter, is not counted."""
    if torch.is_tensor(state):
        return state.numel()
    if dataclasses.is_dataclass(state):
        return sum(state_elements(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (list, tuple)):
        return sum(state_elements(s) for s in state)
    if isinstance(state, dict):
        return sum(state_elements(s) for s in state.values())
    return 0


def counted_forward_flops(model, idx: torch.Tensor) -> int:
    """FLOPs torch.utils.flop_counter.FlopCounterMode counts in a forward of `model` on `idx`."""
    # The CPU's fused SDPA kernel has no FlopCounterMode formula (it would count 0), so attention runs
    # on the math backend, whose QK^T and AV matmuls the counter sees at their full T x T size.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops()


def cuda_inputs(B: int, D: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixer GPU test's input x [B, T, D] (float32) and output gradient dy (float64), seeded."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(B, T, D, device="cuda", generator=g),
            torch.randn(B, T, D, device="cuda", generator=g, dtype=torch.float64))


def bf16_tolerance(tol: float, floor: float) -> float:
    """A bf16 kernel's error bound: the family's tolerance, or 1.5 x the error of the same computation in
    PyTorch under bf16 autocast (the floor bf16 itself sets), whichever is larger."""
    return max(tol, 1.5 * floor)


def fwd_bwd(m, x: torch.Tensor, dy: torch.Tensor, autocast: bool):
    """A mixer's output and its input gradient for the upstream gradient dy (CUDA; bf16 autocast or not)."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)[0]
    (gx,) = torch.autograd.grad((y.double() * dy).sum(), [x])
    return y.detach(), gx


def check_state_continuation_and_decode(run, x: dict, split: int = 37, prefill: int = 5) -> None:
    """A recurrent op family's state is all it carries: for its `recurrent` and `chunked` forms, two calls
    split at `split` (the second starting from the first's final state) equal one call; through its
    `dispatch` entry, a prefill then one-token decode steps equal one full forward at every position.
    `run(form, inputs, chunk_size=..., backend=...)` -> (outputs [B, T, ...], final state); inputs hold
    [B, T, ...] tensors and `initial_state`."""
    T = next(t for n, t in x.items() if n != "initial_state").shape[1]

    def part(lo, hi, h0):
        return {n: (h0 if n == "initial_state" else t[:, lo:hi]) for n, t in x.items()}

    for form in ("recurrent", "chunked"):
        o_full, S_full = run(form, x, chunk_size=16)
        o_a, S_a = run(form, part(0, split, x["initial_state"]), chunk_size=16)
        o_b, S_b = run(form, part(split, T, S_a), chunk_size=16)
        assert rel_err(torch.cat([o_a, o_b], 1), o_full) < 1e-10, form
        assert rel_err(S_b, S_full) < 1e-10, form
    o_full, S_full = run("dispatch", x, backend="torch")
    o_pre, S = run("dispatch", part(0, prefill, x["initial_state"]), backend="torch")
    outs = [o_pre]
    for t in range(prefill, T):
        o_t, S = run("dispatch", part(t, t + 1, S), backend="torch")
        outs.append(o_t)
    o_steps = torch.cat(outs, 1)
    assert max(rel_err(o_steps[:, t], o_full[:, t]) for t in range(T)) < 1e-10
    assert rel_err(S, S_full) < 1e-10


def check_recomputes_instead_of_storing(monkeypatch, op_module, grads) -> None:
    """From `op_module.RECOMPUTE_FROM` tokens an op family's PyTorch path keeps only its inputs for the
    backward: identical outputs and gradients, a fraction of the saved activations. `grads()` -> (outputs,
    final state, {input: gradient}) of one call long enough (160 tokens) to cross a threshold of 64."""
    def measured(threshold):
        monkeypatch.setattr(op_module, "RECOMPUTE_FROM", threshold)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o, S, g = grads()
        return o, S, g, saved[0]

    o_full, S_full, g_full, stored = measured(10**9)
    o_lean, S_lean, g_lean, lean = measured(64)
    assert torch.equal(o_full, o_lean) and torch.equal(S_full, S_lean)
    for name in g_full:
        assert torch.allclose(g_full[name], g_lean[name], rtol=1e-6, atol=1e-7), name
    assert lean * 4 < stored, (lean, stored)


def check_cuda_decode_equals_forward(fla, ref, floor_model, B: int, D: int, tol: float, label: str,
                                     T: int = 100, T0: int = 70) -> None:
    """bf16 autocast on CUDA: a prefill of T0 tokens then single-token steps of the mixer `fla` equal its own
    forward, and the float64 `ref` (same weights) within the bf16 floor that `floor_model` (the float32
    PyTorch path under autocast) sets. Both sides round to bf16 on different paths (chunk vs recurrent op),
    so the decoded positions are compared as a whole: one position of 2 x 256 numbers is a noisy statistic."""
    x, _ = cuda_inputs(B, D, T, seed=2)
    with torch.no_grad():
        y_ref = ref(x.double())[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            floor = rel_err(floor_model(x)[0], y_ref)
            y_full = fla(x)[0]
            st = fla.init_state(B, T, "cuda", torch.bfloat16)
            outs = [fla(x[:, :T0], st)[0]]
            for t in range(T0, T):
                outs.append(fla(x[:, t:t + 1], st)[0])
    assert st.pos == T and st.recurrent.dtype == torch.float32
    y = torch.cat(outs, 1)
    steps = rel_err(y[:, T0:], y_full[:, T0:])
    worst = max(rel_err(y[:, t], y_full[:, t]) for t in range(T))
    err = rel_err(y, y_ref)
    print(f"{label} decode: steps vs FLA forward {steps:.2e} (worst position {worst:.2e}), all vs float64 "
          f"{err:.2e} (bf16 floor {floor:.2e})")
    assert steps <= tol and err <= bf16_tolerance(tol, floor)
