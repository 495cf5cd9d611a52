"""Model-level FLOP and state-size accounting, built from each mixer class's own formulas.

Conventions (those of `torch.utils.flop_counter.FlopCounterMode`): forward FLOPs per token, a
multiply-add is 2 FLOPs, matrix products only. Attention-like mixing is counted at the full T x T
(no causal halving), as the kernels compute it; the delta family at its chunked algorithm (see each
mixer's `flops_per_token`).

Per layer: the mixer (`Mixer.flops_per_token(cfg, T)`; a hybrid sums each layer's own mixer) and the MLP (c_fc d->4d and c_proj 4d->d:
2 * 2 * d * 4d = 16 d^2). Once per token: the LM head (2 * d * vocab). Embedding lookups are gathers
(0 FLOPs). Left out: layer norms, GELU, residual adds, dropout and biases (elementwise, O(d) per token:
well under 1% at the shapes we train). Training is 3x forward (backward = 2x forward for matmuls).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from . import mixers as registry
from .config import ModelConfig
from .mixers.base import Mixer
from .params import Match, match_all, match_shape

__all__ = ["model_flops_per_token", "train_flops_per_token", "decode_state_elements", "flops_table", "crossover_T",
           "format_flops_table"]


CROSSOVER_WINDOW = 1024  # contexts checked one by one after a crossing (see crossover_T)


def _mixer_flops_fn(cls: type, torch_path: bool):
    if torch_path and hasattr(cls, "flops_per_token_torch"):
        return cls.flops_per_token_torch
    return cls.flops_per_token


def model_flops_per_token(model_cfg: ModelConfig, T: Optional[int] = None, *,
                          torch_path: bool = False) -> dict[str, float]:
    """Forward FLOPs per token of the whole GPT at context length T (default block_size), by part:
    {'mixer', 'mlp', 'lm_head', 'embeddings', 'total'}, each summed over layers.

    torch_path: use the mixer's `flops_per_token_torch` where it has one (what its PyTorch path
    computes when that differs from the algorithm's cost, e.g. NSA's dense masked branches).
    """
    T = int(T or model_cfg.block_size)
    d, L, V = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size
    # the sum over layers: each distinct mixer's FLOPs times its layers (all n_layer for a plain mixer)
    mixer = sum(layers * _mixer_flops_fn(registry.get(c.mixer), torch_path)(c, T)
                for c, layers in registry.layer_groups(model_cfg))
    parts = {
        "mixer": float(mixer),  # the sum over layers of each layer's own mixer
        "mlp": float(L * 2 * (2 * d * 4 * d)) if model_cfg.mlp else 0.0,  # model.mlp = false: blocks without one
        "lm_head": float(2 * d * V),
        "embeddings": 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_token(model_cfg: ModelConfig, T: Optional[int] = None) -> float:
    """Training FLOPs per token: 3 x the forward total at T (default block_size, the training context)."""
    return 3.0 * model_flops_per_token(model_cfg, T or model_cfg.block_size)["total"]


def decode_state_elements(model_cfg: ModelConfig, T: int) -> int:
    """Numbers one sequence keeps to continue decoding at context T, summed over layers (KV caches for
    attention, recurrent matrices and convolution tails for the delta family; a hybrid's layers each
    keep their own mixer's state)."""
    return int(sum(layers * registry.get(c.mixer).decode_state_elements(c, T)
                   for c, layers in registry.layer_groups(model_cfg)))


# ---------------------------------------------------------------- tables for the README / CLI


def _matches(budget_or_matches: Any, mixers_: Optional[Sequence[str]], n_layer: int,
             base: Optional[ModelConfig]) -> list:
    if isinstance(budget_or_matches, (list, tuple)) and all(isinstance(m, Match) for m in budget_or_matches):
        return list(budget_or_matches)
    return match_all(budget_or_matches, list(mixers_) if mixers_ else None, n_layer, base)


def flops_table(budget: Any, Ts: Sequence[int] = (256, 8192), mixers: Optional[Sequence[str]] = None,
                n_layer: int = 6, base: Optional[ModelConfig] = None) -> list[dict[str, Any]]:
    """Per-token forward FLOPs of every mixer at its matched shape for `budget` (or a list of
    params.Match), one row per (mixer, T): mixer and total FLOPs, total relative to softmax's, the
    decoding state (numbers per sequence, all layers) and the contexts from which the mixer is
    cheaper than softmax: `crossover_T` for the whole model, `crossover_T_mixer` for the mixers alone."""
    matches = _matches(budget, mixers, n_layer, base)
    soft = next((m.model_cfg for m in matches if m.mixer == "softmax"), None)
    rows = []
    for m in matches:
        classes = [registry.get(n) for n in registry.components(m.mixer)]
        if not all(getattr(cls, f).__func__ is not getattr(Mixer, f).__func__
                   for cls in classes for f in ("flops_per_token", "decode_state_elements")):
            continue  # a mixer without accounting yet: no row rather than no table
        cross = cross_mixer = None
        if m.mixer != "softmax":
            kw = dict(budget=m.budget, n_layer=m.model_cfg.n_layer, model_base=base)
            cross = crossover_T(m.model_cfg, soft or "softmax", part="total", **kw)
            cross_mixer = crossover_T(m.model_cfg, soft or "softmax", part="mixer", **kw)
        for T in Ts:
            f = model_flops_per_token(m.model_cfg, T)
            ref = model_flops_per_token(soft, T)["total"] if soft is not None else None
            rows.append({"mixer": m.mixer, "T": int(T), "mixer_flops": f["mixer"], "total_flops": f["total"],
                         "vs_softmax": f["total"] / ref if ref else None,
                         "decode_state_elements": decode_state_elements(m.model_cfg, T), "crossover_T": cross,
                         "crossover_T_mixer": cross_mixer})
    return rows


def _cfg(x: Union[str, ModelConfig], budget: Any, n_layer: int, base: Optional[ModelConfig]) -> ModelConfig:
    if isinstance(x, ModelConfig):
        return x
    return match_shape(x, budget, n_layer, base).model_cfg


def crossover_T(mixer: Union[str, ModelConfig], base: Union[str, ModelConfig] = "softmax", *,
                budget: Any = "10.7M", part: str = "total", t_max: int = 1 << 20, n_layer: int = 6,
                model_base: Optional[ModelConfig] = None) -> Optional[int]:
    """Smallest context T from which `mixer`'s forward FLOPs per token (`part`: 'total' or 'mixer')
    stay below `base`'s; None if it is not cheaper at t_max (1M). Names are first matched to
    `budget` (params.match_shape with n_layer and model_base); ModelConfigs are taken as they are.

    Chunk padding (delta family) and block flooring (NSA) make the costs saw-toothed in T, so "cheaper"
    can flip a few times near the crossing. A binary search finds a crossing; the CROSSOVER_WINDOW
    contexts after it are then checked one by one, and the answer moves past any that is not cheaper.
    Beyond that window softmax's linear growth in T outweighs any sawtooth."""
    a = _cfg(mixer, budget, n_layer, model_base)
    b = _cfg(base, budget, n_layer, model_base)

    def cheaper(T: int) -> bool:
        return model_flops_per_token(a, T)[part] < model_flops_per_token(b, T)[part]

    if not cheaper(t_max):
        return None
    lo, hi = 1, t_max
    while lo < hi:
        mid = (lo + hi) // 2
        if cheaper(mid):
            hi = mid
        else:
            lo = mid + 1
    while True:  # lo is cheaper and lo - 1 is not: move past later flips inside the window
        end = min(t_max, lo + CROSSOVER_WINDOW)
        bad = [T for T in range(lo + 1, end + 1) if not cheaper(T)]
        if not bad:
            return lo
        lo = bad[-1] + 1
        if lo > t_max:
            return None


def _fmt_flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_flops_table(rows: list[dict[str, Any]], matches: Optional[list] = None) -> str:
    """Text table of `flops_table` rows: per mixer, mixer/total FLOPs per token at each T, x softmax,
    and where its total drops below softmax's."""
    Ts = sorted({r["T"] for r in rows})
    names = list(dict.fromkeys(r["mixer"] for r in rows))
    by = {(r["mixer"], r["T"]): r for r in rows}
    head = ["mixer"]
    for T in Ts:
        head += [f"mixer/tok T={T}", f"total/tok T={T}", "x softmax"]
    head += [f"state T={T}" for T in Ts]
    head += ["cheaper than softmax from T (model / mixers)"]
    out = []
    for n in names:
        row = [n]
        for T in Ts:
            r = by[(n, T)]
            row += [_fmt_flops(r["mixer_flops"]), _fmt_flops(r["total_flops"]),
                    f"{r['vs_softmax']:.2f}" if r["vs_softmax"] is not None else "-"]
        row += [_fmt_flops(by[(n, T)]["decode_state_elements"]) for T in Ts]
        c, cm = (by[(n, Ts[0])][k] for k in ("crossover_T", "crossover_T_mixer"))
        show = lambda c: f"{c:,}" if c is not None else "never (<= 1M)"  # noqa: E731
        row.append("-" if n == "softmax" else f"{show(c)} / {show(cm)}")
        out.append(row)
    widths = [max(len(r[i]) for r in [head, *out]) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = ["Forward FLOPs per token at the matched shapes (multiply-add = 2; attention at full T x T; "
             "all layers; total = mixers + MLPs + LM head); state = numbers one sequence keeps for decoding:",
             fmt(head), fmt(["-" * w for w in widths]), *map(fmt, out)]
    return "\n".join(line.rstrip() for line in lines)
