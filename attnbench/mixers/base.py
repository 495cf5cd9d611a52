"""The mixer contract: the one extension point of attnbench, written down once.

A mixer is the sequence-mixing sublayer of every transformer block (`model.Block`: LayerNorm -> mixer
-> dropout -> residual -> LayerNorm -> MLP -> residual). Everything else in the model is shared, so a
comparison of two runs differs only in the mixer. A new mixer is one module in `attnbench/mixers/`
(plus its op in `attnbench/ops/`, if it has one); the registry imports every module of the package, so
nothing else has to be edited. docs/adding-a-mixer.md turns the rules below into a checklist, and
tests/test_mixer_contract.py defines a toy mixer in the test file itself and runs it through them.

Registration
    Decorate the class with `@register("name")` (`attnbench.mixers.register`); "name" is what
    `model.mixer` in a config, `--mixers` on the command line and the result tables call it. Modules
    whose name starts with "_" are helpers and are not imported as mixers.

Settings: `Args`
    A dataclass subclassing `MixerArgs`, set as the class attribute `Args`. Its fields are the
    mixer's own hyper-parameters, read from `[model.mixer_args]`; `MixerArgs.from_dict` rejects unknown
    keys (with a "did you mean") and coerces TOML/CLI values to the field types; `validate(n_embd,
    n_head)` raises `ConfigError` naming the key for settings the mixer cannot take. The constructor
    runs both, so a bad config fails when the model is built, before any training. The parameter
    search (`attnbench.params`) varies the fields named in `params.SEARCHED_ARGS` that the Args has and
    the config does not fix: `head_dim` (multiples of 16 in [32, 128]; a default of None adds "unset")
    and `n_kv_head` / `num_kv_heads` (1, 2, 4, 8). Give a field one of those names only if it means
    that; every other field is held at its configured value while the width and head count are
    searched.

Construction: `__init__(cfg, layer_idx)`
    `cfg` is the `ModelConfig` (n_embd, n_head, head_dim, bias, dropout, pos_emb, backend, mixer_args);
    in a hybrid (`model.mixer = "gated_deltanet*3+softmax"`) it is the layer's own, with `mixer` this
    mixer's name and `mixer_args` its sub-table, so a mixer needs nothing to take part in hybrids;
    call `super().__init__(cfg, layer_idx)` first, which sets `self.args`. The constructor must run on
    the meta device (the parameter search counts parameters there without allocating), so it creates
    parameters and buffers but never reads their values. The search reports a shape's head dim and heads from the
    first of these instance attributes the mixer has: `head_dim`/`head_k_dim`/`head_k`,
    `n_head`/`n_heads`/`num_heads`, `n_kv_head`/`n_kv_heads`/`num_kv_heads`.

Initialisation
    The model initialises every `nn.Linear` as GPT-2 does (normal, std 0.02, zero bias) and then
    scales the projections into the residual stream (std 0.02 / sqrt(2 * n_layer)) by parameter name:
    the mixer's output projection must therefore be an `nn.Linear` called `o_proj`. Parameters the
    generic rule must not touch (decay rates, convolutions, gains) are re-initialised by the optional
    hook `reset_mixer_parameters(self)`, which the model calls on every mixer after its own
    initialisation. Parameters that must not take weight decay carry `p._no_weight_decay = True`
    (the trainer's AdamW groups read it); matrices take weight decay otherwise, vectors never.

`forward(x, state=None) -> (y, state)`
    `x` and `y` are `(B, T, n_embd)`, and y at position t depends only on x at positions <= t of the
    same sequence (tests/test_model.py checks causality and batch independence for every mixer).
      * `state=None`: the full causal pass over T tokens (training, evaluation, the reference path of
        generation); return `(y, None)`.
      * a state from `init_state` holding P tokens, T > 1: a prefill (or continuation) of T tokens
        after those P; update the state in place and return it.
      * a state and T == 1: one decode step. It must give the same output as the full pass at that
        position (up to float rounding), and it is what the latency benchmark times and captures in a
        CUDA graph, so it must be graph-safe (below).
    The mixer is called through `nn.Module.__call__` with `x` as the first positional argument: the
    latency benchmark counts the tokens each decode call hands the mixers with forward pre-hooks.

Decode state: `init_state(batch, max_len, device, dtype)`
    An empty state for `batch` sequences of up to `max_len` tokens: any object (usually a dataclass)
    whose tensors the mixer updates. A decode step is graph-safe when it
      1. updates the state's tensors in place (`copy_`, `index_copy_`, `index_add_`, slicing
         assignment) and never rebinds, adds or drops one: a replayed graph reads fixed storage;
      2. takes its position from a device-side counter (a one-element long tensor such as `pos_t`,
         advanced in place with `pos_t += T`), not from a Python int: a replay re-runs kernels, not
         Python, so host-side counters stay at their value at capture time;
      3. never synchronises with the host (`.item()`, `.tolist()`, `nonzero`, data-dependent shapes)
         and keeps every shape static (e.g. attend over the whole preallocated cache with a mask rather
         than over `cache[:pos]`).
    A host-side count such as `pos` may be kept next to `pos_t` for prefills and for bookkeeping. The
    latency benchmark checks 1 and 2 on the CPU (its `host_frozen_check`), then captures;
    a mixer that fails gets an eager-only row with the reason, not a wrong number.

`check_config(cfg)` (classmethod, optional)
    Model-level combinations the mixer cannot take, raised as `ConfigError` (e.g. `pos_emb = "rope"`
    for a mixer without attention scores to rotate). `GPT.__init__` and the parameter search call it.
    `encodes_position = True` records that the mixer encodes order itself (recurrence, its own RoPE).

Analytic accounting (classmethods, both required: FLOP tables, MFU and the state table use them)
    `flops_per_token(cfg, T)`: forward FLOPs per token at context length T with the conventions of
    `torch.utils.flop_counter.FlopCounterMode` (multiply-add = 2, matrix products only, projections
    included, full T x T for attention-like products). tests/test_flops.py compares it with the
    counter on a real forward within 5%; a mixer whose PyTorch path computes more than its algorithm
    (e.g. dense masked branches) adds `flops_per_token_torch(cfg, T)` for that comparison.
    `decode_state_elements(cfg, T)`: how many numbers one sequence keeps in this mixer's decode state
    after T tokens (tensor elements, not bytes; device-side counters not included). It must equal the
    elements of a state from `init_state(1, T, ...)` after a prefill of T tokens.

Op backends
    An op with a GPU kernel takes `backend` ("auto" | "torch" | "fla", from `cfg.backend`) and calls
    `ops.backend.resolve(backend, x, op_name, unsupported)` to pick the kernel per call: "auto" takes
    FLA's kernel for CUDA tensors when it supports the call and falls back to the PyTorch version with
    a logged notice otherwise; "fla" raises where FLA cannot run. The PyTorch version is the reference
    and must run everywhere (CPU tests, float64 checks). `resolve` records which backend ran, and the
    trainer and benchmarks report it. A mixer without a kernel ignores `backend`.

Default shapes: `attnbench/configs/<mixer>.toml`
    The benchmarks (`attnbench bench ...`) take a mixer's model shape from the `[model]` section of
    the bundled config file named after it (softmax: shakespeare_char.toml), and a sweep lays that
    section over its base config for the mixer's runs; without the file both use the defaults,
    re-matched to the parameter budget with the mixer args held fixed. A new mixer that is to be
    trained or benchmarked at its own settings ships such a file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..config import coerce_value, field_types
from ..errors import ConfigError, did_you_mean


@dataclass
class MixerArgs:
    """Base of a mixer's own settings (`[model.mixer_args]`). Subclasses add dataclass fields with
    defaults and override `validate`; fields named in `attnbench.params.SEARCHED_ARGS` are varied by
    the parameter search unless the config fixes them."""

    def validate(self, n_embd: int, n_head: int) -> None:
        """Raise ConfigError naming the key (model.mixer_args.KEY) for settings the mixer cannot take."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, mixer: str) -> "MixerArgs":
        """The Args of `d` (a config's mixer_args): unknown keys are a ConfigError with a suggestion,
        values are coerced to the field types (one coercion rule for the whole config)."""
        d = dict(d or {})
        names = [f.name for f in fields(cls)]
        types = field_types(cls)
        kwargs = {}
        for key, val in d.items():
            if key not in names:
                hint = did_you_mean(key, names, prefix="mixer_args.", list_all=True)
                raise ConfigError(f"unknown key model.mixer_args.{key} for mixer {mixer!r}{hint}")
            kwargs[key] = coerce_value(val, types[key], f"model.mixer_args.{key}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Mixer(nn.Module):
    """Base class of every mixer; the module docstring states the contract.

    Required: `@register("name")`, `Args`, `forward`, `init_state`, `flops_per_token`,
    `decode_state_elements` and an output projection `o_proj`. Optional: `check_config`,
    `reset_mixer_parameters`, `flops_per_token_torch`, `encodes_position`.
    """

    Args: ClassVar[type[MixerArgs]] = MixerArgs
    name: ClassVar[str] = ""  # set by @register
    # True when the mixer needs no position embedding from the model (it encodes order itself,
    # e.g. recurrence or its own RoPE). The model still adds the configured one; this is information.
    encodes_position: ClassVar[bool] = False

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.args = self.Args.from_dict(cfg.mixer_args, self.name)
        self.args.validate(cfg.n_embd, cfg.n_head)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Model-level combinations this mixer cannot take (e.g. a position scheme); ConfigError."""

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """(B, T, C) -> (B, T, C), causal. No state: the full pass, (y, None). A state: continue from it
        (T > 1 a prefill, T == 1 a graph-safe decode step), update it in place and return it."""
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> Any:
        """An empty decode state for `batch` sequences of up to `max_len` tokens (static shapes, a
        device-side position counter)."""
        raise NotImplementedError

    # Analytic accounting, implemented by every mixer (attnbench.params and attnbench.flops use them).
    @classmethod
    def flops_per_token(cls, cfg: Any, T: int) -> float:
        """Forward FLOPs per token of this mixer (projections included) at context length T."""
        raise NotImplementedError

    @classmethod
    def decode_state_elements(cls, cfg: Any, T: int) -> int:
        """Elements (numbers, not bytes) one sequence keeps in this mixer's decode state after T tokens."""
        raise NotImplementedError
