"""Parameter matching: for a budget, find each mixer's GPT shape whose trainable parameter count is closest.

Fair by construction: every mixer gets the same n_layer, MLP, embeddings and head, and its width and
heads are searched so that `count_params` (an exact count of the built model) is as close to the budget
as the mixer's own constraints allow. Nothing here knows a particular mixer: the search space comes
from the model config (n_embd, n_head) and the fields the mixer's `Args` dataclass has, and validity
from the mixer itself (`Args.validate` / `check_config` / its constructor raising ConfigError).

What is searched, per mixer
- n_embd: even widths (the config also needs n_head | n_embd);
- n_head: 1..32 (for every mixer that takes its heads from model.n_head; `num_heads` args are left
  unset, so they follow n_head);
- mixer args named in SEARCHED_ARGS when the mixer's Args has them and the caller did not fix them:
  `head_dim` (multiples of 16 in [32, 128], or unset where unset is allowed) and `n_kv_head` /
  `num_kv_heads` (1, 2, 4, 8).

How the winner is chosen (lexicographic):
1. within the band (`tol`, default 1%: |deviation| <= 1%) before anything outside it;
2. shapes the GPU kernels accept before those they do not: a candidate is built once more with
   backend='fla', and a mixer that refuses that (e.g. NSA's group size for FLA) marks it kernel-less;
3. head dim nearest to `head_dim` (64, the softmax baseline's);
4. width nearest to the softmax width of the same budget (`softmax_width`);
5. the smallest |deviation|.
Inside the band, comparable shapes come before closeness: a 2-head model 0.3% from the budget is a
different model from a 6-head one 0.8% from it, and both are parameter-matched.
With nothing inside 1%, the closest shape wins. n_layer is never changed.

Speed: for fixed heads and mixer args ("a family") the count is a quadratic polynomial in the width
(every weight is d x something, d x d or independent of d), so each family costs three meta-device
builds of one block plus a fitted polynomial; families whose best possible head dim is already beaten
are not built at all. The final count is always exact: the winner is rebuilt as a whole GPT by
`count_params`, and a family whose polynomial does not reproduce exact counts is searched by direct
builds instead.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Optional

import torch

from . import mixers
from .config import ModelConfig
from .counts import parse_count
from .errors import ConfigError

TARGET_HEAD_DIM = 64  # the softmax baseline's head dim (nanoGPT shakespeare_char: 384 / 6)
REQUIRED_TOL = 0.01  # the band every mixer must reach (and the default search band)
MAX_N_HEAD = 32
HEAD_DIM_VALUES = (32, 48, 64, 80, 96, 112, 128)  # multiples of 16: tl.dot tiles and FLA's head-dim limits
KV_HEAD_VALUES = (1, 2, 4, 8)
# Args fields the search varies -> candidate values (None is added when the field's default is None).
SEARCHED_ARGS: dict[str, tuple[int, ...]] = {
    "head_dim": HEAD_DIM_VALUES,
    "n_kv_head": KV_HEAD_VALUES,
    "num_kv_heads": KV_HEAD_VALUES,
}
_CHECK_ERRORS = (ConfigError, ValueError, ZeroDivisionError)


# ---------------------------------------------------------------- budgets and exact counts


def parse_budget(value: str | int | float) -> int:
    """A parameter budget such as '10.7M' (attnbench.counts.parse_count)."""
    return parse_count(value, what="parameter budget")


def count_params(model_cfg: ModelConfig) -> int:
    """Trainable parameters of `GPT(model_cfg)`, tied weights once: the model is built on the meta
    device (no memory, no init cost) and `p.numel()` summed over `parameters()`, which yields a shared
    tensor once. Equal to `sum(p.numel() for p in GPT(cfg).parameters())` by construction. Built with
    backend='torch' (parameters never depend on the backend) so that kernel notices stay quiet."""
    from .model import GPT

    cfg = replace(model_cfg, backend="torch")
    try:
        with torch.device("meta"):
            model = GPT(cfg)
    except (NotImplementedError, RuntimeError):  # a mixer init that needs real data: build it for real
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the result


@dataclass
class Match:
    """One mixer's matched shape. `deviation` = n_params / budget - 1 (signed)."""

    mixer: str
    model_cfg: ModelConfig
    n_params: int
    deviation: float
    head_dim: int
    heads: int = 0  # the mixer's (query) heads
    kv_heads: Optional[int] = None  # where the mixer has its own KV heads
    budget: int = 0
    kernel_ok: bool = True  # the mixer accepted this shape with backend='fla'

    @property
    def within(self) -> bool:
        return abs(self.deviation) <= REQUIRED_TOL

    def to_row(self) -> dict[str, Any]:
        c = self.model_cfg
        return {"mixer": self.mixer, "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "mixer_args": dict(c.mixer_args), "params": self.n_params, "budget": self.budget,
                "deviation": self.deviation, "kernel_ok": self.kernel_ok}


# ---------------------------------------------------------------- the search


@dataclass(frozen=True)
class _Family:
    """Everything but the width: n_head and the searched mixer-arg values."""

    n_head: int
    knobs: tuple[tuple[str, Any], ...] = ()


@dataclass
class _Cand:
    fam: _Family
    d: int
    count: int
    head_dim: int = 0
    heads: int = 0
    kv_heads: Optional[int] = None
    kernel_ok: bool = True
    key: tuple = field(default=(), compare=False)


def _searched_fields(cls: type, fixed: dict[str, Any]) -> dict[str, tuple]:
    """Searched Args fields of this mixer with their candidate values (fields fixed by the caller excluded)."""
    out = {}
    for f in fields(cls.Args):
        if f.name in SEARCHED_ARGS and f.name not in fixed:
            vals = tuple(SEARCHED_ARGS[f.name])
            if f.default is None:
                vals = (None, *vals)
            out[f.name] = vals
    return out


class _Search:
    def __init__(self, mixer: str, budget: int, n_layer: int, base: ModelConfig, fixed: dict[str, Any],
                 tol: float, head_dim: int, d_ref: float):
        self.name, self.cls = mixer, mixers.get(mixer)
        self.budget, self.n_layer, self.tol, self.target_hd, self.d_ref = budget, n_layer, tol, head_dim, d_ref
        self.base = replace(base, mixer=mixer, n_layer=n_layer, mixer_args={})
        parsed = self.cls.Args.from_dict(fixed, mixer)  # coerces CLI strings; unknown keys: ConfigError
        self.fixed = {k: getattr(parsed, k) for k in fixed}
        self._rest: dict[int, int] = {}  # width -> params outside the mixers (embeddings, norms, MLPs, head)
        self._mixer_counts: dict[tuple, Optional[int]] = {}
        self.errors: Counter[str] = Counter()  # why candidates were refused (for the error message)

    # -- configs and validity (no builds)

    def cfg(self, fam: _Family, d: int, backend: Optional[str] = None) -> ModelConfig:
        return replace(self.base, n_embd=d, n_head=fam.n_head,
                       mixer_args={**self.fixed, **{k: v for k, v in fam.knobs if v is not None}},
                       backend=backend or self.base.backend)

    def valid(self, fam: _Family, d: int) -> bool:
        if d < 2 or d % fam.n_head:
            return False
        cfg = self.cfg(fam, d)
        try:
            self.cls.Args.from_dict(cfg.mixer_args, self.name).validate(d, fam.n_head)
            self.cls.check_config(cfg)
        except _CHECK_ERRORS as e:
            self.errors[str(e)] += 1
            return False
        return True

    def step(self, fam: _Family) -> int:
        return math.lcm(2, fam.n_head)

    def valid_near(self, fam: _Family, x: float, direction: int, limit: float) -> Optional[int]:
        """The first valid width from x going in `direction` (+1/-1), within `limit` widths."""
        s = self.step(fam)
        d = (math.floor(x / s) * s) if direction < 0 else (math.ceil(x / s) * s)
        for _ in range(int(limit / s) + 1):
            if d >= 2 and self.valid(fam, d):
                return d
            d += direction * s
        return None

    # -- counts (meta-device builds)

    def rest(self, d: int) -> int:
        """Everything but the mixers at width d: a GPT without blocks plus n_layer blocks' norms and MLP."""
        if d not in self._rest:
            from .model import Block

            cfg = replace(self.base, n_embd=d, n_head=1, mixer="softmax", mixer_args={}, backend="torch")
            with torch.device("meta"):
                blk = Block(cfg, 0)
            per_block = sum(p.numel() for n, p in blk.named_parameters() if not n.startswith("mixer."))
            self._rest[d] = count_params(replace(cfg, n_layer=0)) + self.n_layer * per_block
        return self._rest[d]

    def mixer_params(self, fam: _Family, d: int) -> Optional[int]:
        key = (fam, d)
        if key not in self._mixer_counts:
            try:
                with torch.device("meta"):
                    m = self.cls(self.cfg(fam, d, backend="torch"), 0)
                self._mixer_counts[key] = sum(p.numel() for p in m.parameters() if p.requires_grad)
            except _CHECK_ERRORS:
                self._mixer_counts[key] = None
        return self._mixer_counts[key]

    def estimate(self, fam: _Family, d: int) -> Optional[int]:
        """GPT count assuming every layer's mixer is the same size (checked on the winner by count_params)."""
        m = self.mixer_params(fam, d)
        return None if m is None else self.rest(d) + self.n_layer * m

    def describe(self, c: _Cand) -> _Cand:
        """Head dim, heads and kernel acceptance of a candidate (one or two mixer builds)."""
        cfg = self.cfg(c.fam, c.d, backend="fla")
        try:
            with torch.device("meta"):
                m = self.cls(cfg, 0)
            c.kernel_ok = True
        except Exception:  # noqa: BLE001 (any refusal of the kernel backend; the torch build below must work)
            c.kernel_ok = False
            cfg = self.cfg(c.fam, c.d, backend="torch")
            with torch.device("meta"):
                m = self.cls(cfg, 0)
        c.head_dim = _first_int(m, ("head_dim", "head_k_dim", "head_k"), cfg.n_embd // cfg.n_head)
        c.heads = _first_int(m, ("n_head", "n_heads", "num_heads"), cfg.n_head)
        c.kv_heads = _first_int(m, ("n_kv_head", "n_kv_heads", "num_kv_heads"), None)
        return c

    # -- one family

    def family_candidates(self, fam: _Family) -> list[_Cand]:
        """Widths of this family around the budget: every one within the required band, plus the
        nearest on each side of the exact solution (so the closest shape is always among them)."""
        span = 4 * self.d_ref
        pts = [self.valid_near(fam, x * self.d_ref, +1, span) for x in (0.6, 1.0, 1.5)]
        pts = sorted({p for p in pts if p is not None})
        counts = [self.estimate(fam, p) for p in pts]
        if len(pts) < 3 or any(c is None for c in counts):
            return self._scan(fam)
        poly = _quadratic(pts, counts)
        lo_w, hi_w = 2.0, 16.0 * self.d_ref
        root = _solve(poly, self.budget, lo_w, hi_w)
        lo = _solve(poly, self.budget * (1 - self.tol), lo_w, hi_w)
        hi = _solve(poly, self.budget * (1 + self.tol), lo_w, hi_w)
        widths = set()
        below = self.valid_near(fam, root, -1, span)
        above = self.valid_near(fam, root, +1, span)
        widths.update(w for w in (below, above) if w is not None)
        s = self.step(fam)
        d = math.ceil(lo / s) * s
        while d <= hi:
            if self.valid(fam, d):
                widths.add(d)
            d += s
        out = []
        for w in sorted(widths):
            est = _eval(poly, w)
            out.append(_Cand(fam, w, est))
        # the polynomial must reproduce a real count; otherwise count every width directly
        probe = out[len(out) // 2] if out else None
        if probe is not None and self.estimate(fam, probe.d) != probe.count:
            return self._scan(fam)
        return out

    def _scan(self, fam: _Family) -> list[_Cand]:
        """Direct search for families the polynomial does not describe (slower, exact): bisection over
        the valid widths in [d_ref / 8, 4 d_ref] for the budget, then the neighbours inside the band."""
        s = self.step(fam)
        ws = [d for d in range(s * max(1, int(self.d_ref / 8 / s)), int(4 * self.d_ref) + s, s) if self.valid(fam, d)]
        est = lambda i: self.estimate(fam, ws[i])  # noqa: E731  (None: the constructor refused it)
        lo, hi = 0, len(ws) - 1
        while lo < hi:  # first width whose count reaches the budget (counts grow with width)
            mid = (lo + hi) // 2
            e = est(mid)
            if e is not None and e < self.budget:
                lo = mid + 1
            else:
                hi = mid
        out = []
        for rng in (range(lo, len(ws)), range(lo - 1, -1, -1)):  # upwards, then downwards
            for n, i in enumerate(rng):
                c = est(i)
                if c is None:
                    continue
                if n > 0 and abs(c / self.budget - 1) > self.tol:
                    break
                out.append(_Cand(fam, ws[i], c))
        return out

    # -- all families

    def families(self) -> list[_Family]:
        searched = _searched_fields(self.cls, self.fixed)
        names = list(searched)
        fams = []
        for h in range(1, MAX_N_HEAD + 1):
            for combo in _product([searched[n] for n in names]):
                fams.append(_Family(h, tuple(zip(names, combo))))
        return fams

    def head_dim_bound(self, fam: _Family) -> float:
        """A lower bound of |head dim - target| for the family, before building anything: the
        head_dim arg where set, else n_embd / n_head for widths in [d_ref / 2, 2 d_ref]."""
        hd = dict(fam.knobs).get("head_dim", self.fixed.get("head_dim"))
        if hd is not None:
            return abs(hd - self.target_hd)
        lo, hi = self.d_ref / 2 / fam.n_head, 2 * self.d_ref / fam.n_head
        return 0.0 if lo <= self.target_hd <= hi else min(abs(lo - self.target_hd), abs(hi - self.target_hd))

    def rank_key(self, c: _Cand) -> tuple:
        dev = abs(c.count / self.budget - 1)
        tiebreak = (c.fam.n_head, repr(c.fam.knobs), c.d)
        if dev > self.tol:
            return (1, dev, not c.kernel_ok, abs(c.head_dim - self.target_hd), abs(c.d - self.d_ref), tiebreak)
        return (0, not c.kernel_ok, abs(c.head_dim - self.target_hd), abs(c.d - self.d_ref), dev, tiebreak)

    def run(self) -> list[_Cand]:
        """Candidates ranked best first. Families are visited in order of their head-dim bound and the
        visit stops once an in-band, kernel-ready candidate has a better head dim than any later family
        can have; candidates outside the band are only described when nothing is inside it."""
        fams = sorted(self.families(), key=self.head_dim_bound)
        inside: list[_Cand] = []
        outside: list[_Cand] = []
        best = None
        for fam in fams:
            if best is not None and not best.key[1] and self.head_dim_bound(fam) > best.key[2]:
                break  # every later family has a worse head dim than an in-band, kernel-ready winner
            if not self._any_valid(fam):
                continue
            for c in self.family_candidates(fam):
                if abs(c.count / self.budget - 1) > self.tol:
                    outside.append(c)
                    continue
                self.describe(c)
                c.key = self.rank_key(c)
                inside.append(c)
                if best is None or c.key < best.key:
                    best = c
        ranked = inside
        if not ranked:
            for c in outside:
                self.describe(c)
                c.key = self.rank_key(c)
            ranked = outside
        ranked.sort(key=lambda c: c.key)
        return ranked

    def _any_valid(self, fam: _Family) -> bool:
        """Whether some width in [d_ref / 2, 2 d_ref] is valid, probing a few (validity rarely depends
        on the exact width, and a full scan of every family would dominate the search time)."""
        s = self.step(fam)
        for x in (1.0, 0.8, 1.25, 0.6, 1.6, 0.5, 2.0):
            base = round(x * self.d_ref / s) * s
            for d in (base, base + s, base - s, base + 2 * s):
                if self.valid(fam, d):
                    return True
        return False


def _first_int(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _product(lists: list[tuple]) -> list[tuple]:
    out: list[tuple] = [()]
    for vals in lists:
        out = [o + (v,) for o in out for v in vals]
    return out


def _quadratic(xs: list[int], ys: list[int]) -> tuple[Fraction, Fraction, Fraction]:
    """Exact coefficients (a, b, c) of a*x^2 + b*x + c through three points (Lagrange, in fractions)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    a = b = c = Fraction(0)
    for xi, yi, xj, xk in ((x0, y0, x1, x2), (x1, y1, x0, x2), (x2, y2, x0, x1)):
        den = Fraction((xi - xj) * (xi - xk))
        a += yi / den
        b += -yi * (xj + xk) / den
        c += yi * xj * xk / den
    return a, b, c


def _eval(poly: tuple[Fraction, Fraction, Fraction], x: float) -> int:
    a, b, c = poly
    v = a * x * x + b * x + c
    return int(round(v))


def _solve(poly: tuple[Fraction, Fraction, Fraction], target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with poly(x) = target by bisection (counts grow with width); clamps at the ends."""
    a, b, c = (float(t) for t in poly)
    f = lambda x: a * x * x + b * x + c - target  # noqa: E731
    if f(lo) >= 0:
        return lo
    if f(hi) <= 0:
        return hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


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
    mixers.get(mixer)  # unknown names: ConfigError with a suggestion
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
                 kernel_ok=top.kernel_ok)


def match_all(budget: int | str, mixers: Optional[list[str]] = None, n_layer: int = 6,
              base: Optional[ModelConfig] = None, **kw: Any) -> list[Match]:
    """`match_shape` for each mixer (default: every registered one, softmax first); kw go to match_shape."""
    from . import mixers as registry

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


# ---------------------------------------------------------------- output


def format_table(matches: list[Match]) -> str:
    head = ["mixer", "n_layer", "n_embd", "heads", "head dim", "parameters", "deviation", "mixer args"]
    rows = []
    for m in matches:
        c = m.model_cfg
        heads = f"{m.heads}" + (f" (kv {m.kv_heads})" if m.kv_heads is not None else "")
        args = ", ".join(f"{k}={v}" for k, v in sorted(c.mixer_args.items())) or "-"
        if not m.kernel_ok:
            args += "  [no FLA kernel]"
        rows.append([m.mixer, str(c.n_layer), str(c.n_embd), heads, str(m.head_dim), f"{m.n_params:,}",
                     f"{m.deviation:+.2%}", args])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {1, 2, 4, 5, 6}
    fmt = lambda r: "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(line.rstrip() for line in lines)


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params", help="match every mixer's shape to a parameter budget",
        description="Find, for each mixer, the GPT shape (width, heads, head dim) whose trainable parameter "
                    "count is closest to --budget, with n_layer fixed. Prints a table; --json writes rows "
                    "(to stdout, or to FILE; with --flops an object {matches, flops}); --flops adds per-token "
                    "forward FLOPs at the matched shapes, the decoding state sizes and the context length from "
                    "which each mixer is cheaper than softmax. Exit status 1 when a mixer misses the band.")
    p.add_argument("--budget", default="10.7M", help="parameters, e.g. 10.7M, 850k, 1.5e7 (default 10.7M)")
    p.add_argument("--mixers", default=None, help="comma-separated mixer names (default: all registered)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=65)
    p.add_argument("--pos_emb", default="learned", choices=["learned", "rope", "none"])
    p.add_argument("--tol", type=float, default=REQUIRED_TOL, help="band around the budget as a fraction (default 0.01)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="emit JSON rows instead of the table: to stdout, or to FILE")
    p.add_argument("--flops", action="store_true", help="also print per-token FLOPs and softmax crossovers")
    p.add_argument("--T", default="256,8192", help="context lengths for --flops (default 256,8192)")
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> int:
    from . import flops

    base = ModelConfig(n_layer=a.n_layer, block_size=a.block_size, vocab_size=a.vocab_size, pos_emb=a.pos_emb)
    names = [n.strip() for n in a.mixers.split(",") if n.strip()] if a.mixers else None
    matches = match_all(a.budget, names, a.n_layer, base, tol=a.tol)
    Ts = tuple(int(float(t)) for t in a.T.split(",") if t.strip())
    table = flops.flops_table(matches, Ts) if a.flops else None
    if a.json is not None:
        out: Any = [m.to_row() for m in matches]
        if table is not None:
            out = {"matches": out, "flops": table}
        text = json.dumps(out, indent=2)
        if a.json == "-":
            print(text)
        else:
            from .files import atomic_write_text

            atomic_write_text(a.json, text + "\n")
            print(f"wrote {a.json}", file=sys.stderr)
        return 0
    budget = parse_budget(a.budget)
    print(f"parameter budget {budget:,} (n_layer={a.n_layer}, block_size={a.block_size}, vocab_size={a.vocab_size}); "
          f"band {a.tol:.1%}")
    print(format_table(matches))
    bad = [m.mixer for m in matches if not m.within]
    if bad:
        print(f"outside {REQUIRED_TOL:.0%}: {', '.join(bad)}")
    if table is not None:
        print()
        print(flops.format_flops_table(table, matches))
    return 1 if bad else 0
