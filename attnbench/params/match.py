"""Matching shapes to a budget: one mixer (match_shape), every mixer (match_all), a config whose
n_embd is 'match' (resolve_match), and the softmax reference width (softmax_width)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from .. import mixers as registry
from ..config import ModelConfig
from ..errors import ConfigError
from .count import REQUIRED_TOL, Match, count_params, parse_budget
from .search import TARGET_HEAD_DIM, _Family, _quadratic, _Search, _solve


def _base_cfg(base: Optional[ModelConfig]) -> ModelConfig:
    base = replace(base) if base is not None else ModelConfig()
    if not isinstance(base.n_embd, int):  # 'match': the search sets it
        base = replace(base, n_embd=384)
    return base


def softmax_width(budget: int | str, n_layer: int = 6, base: Optional[ModelConfig] = None) -> float:
    """The real-valued width at which the softmax GPT (same n_layer, vocab, block size, position
    embedding, bias) has exactly `budget` parameters: the reference width of the preferences."""
    budget = parse_budget(budget)
    base = _base_cfg(base)
    s = _Search("softmax", budget, n_layer, base, {}, REQUIRED_TOL, TARGET_HEAD_DIM, 384.0)
    fam = _Family(1)
    pts = [64, 256, 512]
    return _solve(_quadratic(pts, [s.estimate(fam, p) for p in pts]), budget, 2.0, 1e6)


def match_shape(mixer: str, budget: int | str, n_layer: int = 6, base: Optional[ModelConfig] = None,
                mixer_args: Optional[dict[str, Any]] = None, *, tol: float = REQUIRED_TOL,
                head_dim: int = TARGET_HEAD_DIM) -> Match:
    """The shape of `mixer` whose GPT parameter count is closest to `budget` (see the module doc for
    the search space and preferences). `base` supplies everything not searched (vocab_size,
    block_size, pos_emb, bias, dropout, backend); `mixer_args` are held fixed (default: base's when
    base.mixer == mixer); the searched args it names are not varied. n_params is exact."""
    budget = parse_budget(budget)
    if n_layer < 1:
        raise ConfigError(f"model.n_layer must be >= 1 for parameter matching, got {n_layer}")
    base = _base_cfg(base)
    if mixer_args is None:
        mixer_args = dict(base.mixer_args) if base.mixer == mixer else {}
    registry.layer_names(mixer, n_layer)  # unknown names (with a suggestion), n_layer not fitting a pattern
    d_ref = softmax_width(budget, n_layer, base)
    search = _Search(mixer, budget, n_layer, base, mixer_args, tol, head_dim, d_ref)
    ranked = search.run()
    if not ranked:
        why = f": {search.errors.most_common(1)[0][0]}" if search.errors else ""
        raise ConfigError(f"no valid shape of mixer {mixer!r} near {budget:,} parameters "
                          f"(n_layer={n_layer}, mixer_args={mixer_args}){why}")
    # the reported count is exact: rebuild the leader as a whole GPT (and a few more if it disagrees)
    for c in ranked[:10]:
        exact = count_params(search.cfg(c.fam, c.d))
        if exact == c.count:
            break
        c.count = exact
        c.key = search.rank_key(c)
    top = sorted(ranked[:10], key=lambda c: c.key)[0]
    cfg = search.cfg(top.fam, top.d)
    if cfg.param_budget is None:  # record what the shape was matched to
        cfg = replace(cfg, param_budget=budget)
    n = count_params(cfg)
    return Match(mixer=mixer, model_cfg=cfg, n_params=n, deviation=n / budget - 1,
                 head_dim=top.head_dim, heads=top.heads, kv_heads=top.kv_heads, budget=budget,
                 kernel_ok=top.kernel_ok, per_mixer=top.per_mixer)


def match_all(budget: int | str, mixers: Optional[list[str]] = None, n_layer: int = 6,
              base: Optional[ModelConfig] = None, **kw: Any) -> list[Match]:
    """`match_shape` for each mixer (default: every registered one, softmax first); kw go to match_shape."""
    names = mixers if mixers is not None else sorted(registry.available(), key=lambda n: (n != "softmax", n))
    return [match_shape(m, budget, n_layer, base, **kw) for m in names]


def resolve_match(model_cfg: ModelConfig) -> ModelConfig:
    """A ModelConfig with n_embd = 'match' -> the matched one (concrete n_embd, n_head, mixer_args).
    Called by attnbench.resolve; the mixer args already in model_cfg are held fixed."""
    if model_cfg.param_budget is None:
        raise ConfigError("model.n_embd = 'match' needs model.param_budget (e.g. param_budget = '10.7M'); "
                          "or set model.n_embd to a width")
    try:
        budget = parse_budget(model_cfg.param_budget)
    except ConfigError as e:
        raise ConfigError(f"model.param_budget: {e}") from None
    m = match_shape(model_cfg.mixer, budget, model_cfg.n_layer, model_cfg, dict(model_cfg.mixer_args))
    return m.model_cfg
