"""The shape search behind match_shape.

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

Hybrids ("gated_deltanet*3+softmax"): one n_embd and n_head for the whole model, and each mixer of the
pattern searches its own SEARCHED_ARGS (knobs named "<mixer>.<arg>") under its own validity rules; the
count sums each mixer's layers; the head-dim preference takes the mixer furthest from the target, and
the reported head dim and heads are the first mixer's (Match.per_mixer has each one's).

Speed: for fixed heads and mixer args ("a family") the count is a quadratic polynomial in the width
(every weight is d x something, d x d or independent of d), so each family costs three meta-device
builds of one block plus a fitted polynomial; families whose best possible head dim is already beaten
are not built at all. The final count is always exact: the winner is rebuilt as a whole GPT by
`count_params`, and a family whose polynomial does not reproduce exact counts is searched by direct
builds instead.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Optional

import torch

from .. import mixers as registry
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import Block
from .count import count_params

TARGET_HEAD_DIM = 64  # the softmax baseline's head dim (nanoGPT shakespeare_char: 384 / 6)
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
    hd_dev: int = 0  # |head dim - target|, the largest over a hybrid's mixers
    per_mixer: Optional[dict] = None  # a hybrid's head dim, heads and kv heads per mixer


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
        self.name, self.hybrid = mixer, registry.is_hybrid(mixer)
        self.budget, self.n_layer, self.tol, self.target_hd, self.d_ref = budget, n_layer, tol, head_dim, d_ref
        self.base = replace(base, mixer=mixer, n_layer=n_layer, mixer_args={})
        names = registry.layer_names(mixer, n_layer)  # unknown mixers, n_layer not fitting: ConfigError
        self.parts = [(n, registry.get(n), names.count(n)) for n in dict.fromkeys(names)]  # (mixer, class, layers)
        registry.check_mixer_args(mixer, fixed)
        # the caller's fixed args per mixer, coerced (CLI strings); unknown keys: ConfigError
        self.fixed: dict[str, dict[str, Any]] = {}
        for n, cls, _ in self.parts:
            given = dict(fixed.get(n) or {}) if self.hybrid else dict(fixed)
            parsed = cls.Args.from_dict(given, n)
            self.fixed[n] = {k: getattr(parsed, k) for k in given}
        self._rest: dict[int, int] = {}  # width -> params outside the mixers (embeddings, norms, MLPs, head)
        self._mixer_counts: dict[tuple, Optional[int]] = {}
        self.errors: Counter[str] = Counter()  # why candidates were refused (for the error message)

    # -- configs and validity (no builds)

    def knob(self, mixer: str, arg: str) -> str:
        """A searched arg's name in a family: the arg itself, or "<mixer>.<arg>" in a hybrid."""
        return f"{mixer}.{arg}" if self.hybrid else arg

    def cfg(self, fam: _Family, d: int, backend: Optional[str] = None) -> ModelConfig:
        knobs = dict(fam.knobs)
        args = {n: {**self.fixed[n], **{a: v for a in SEARCHED_ARGS
                                        if (v := knobs.get(self.knob(n, a))) is not None}}
                for n, _, _ in self.parts}
        return replace(self.base, n_embd=d, n_head=fam.n_head, mixer_args=args if self.hybrid else args[self.name],
                       backend=backend or self.base.backend)

    def valid(self, fam: _Family, d: int) -> bool:
        if d < 2 or d % fam.n_head:
            return False
        cfg = self.cfg(fam, d)
        try:
            for n, cls, _ in self.parts:
                lc = registry.layer_config(cfg, n)
                cls.Args.from_dict(lc.mixer_args, n).validate(d, fam.n_head)
                cls.check_config(lc)
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
            cfg = replace(self.base, n_embd=d, n_head=1, mixer="softmax", mixer_args={}, backend="torch")
            with torch.device("meta"):
                blk = Block(cfg, 0)
            per_block = sum(p.numel() for n, p in blk.named_parameters() if not n.startswith("mixer."))
            self._rest[d] = count_params(replace(cfg, n_layer=0)) + self.n_layer * per_block
        return self._rest[d]

    def mixer_params(self, fam: _Family, d: int) -> Optional[int]:
        """Parameters of all the mixers of the model (each mixer's layers: equal in size)."""
        key = (fam, d)
        if key not in self._mixer_counts:
            try:
                cfg = self.cfg(fam, d, backend="torch")
                total = 0
                for n, cls, layers in self.parts:
                    with torch.device("meta"):
                        m = cls(registry.layer_config(cfg, n), 0)
                    total += layers * sum(p.numel() for p in m.parameters() if p.requires_grad)
                self._mixer_counts[key] = total
            except _CHECK_ERRORS:
                self._mixer_counts[key] = None
        return self._mixer_counts[key]

    def estimate(self, fam: _Family, d: int) -> Optional[int]:
        """GPT count from one build of each mixer (checked on the winner by count_params)."""
        m = self.mixer_params(fam, d)
        return None if m is None else self.rest(d) + m

    def describe(self, c: _Cand) -> _Cand:
        """Head dim, heads and kernel acceptance of a candidate (one or two builds of each mixer)."""
        per = {}
        c.kernel_ok = True
        for n, cls, _ in self.parts:
            cfg = registry.layer_config(self.cfg(c.fam, c.d, backend="fla"), n)
            try:
                with torch.device("meta"):
                    m = cls(cfg, 0)
            except Exception:  # noqa: BLE001 (any refusal of the kernel backend; the torch build below must work)
                c.kernel_ok = False
                cfg = registry.layer_config(self.cfg(c.fam, c.d, backend="torch"), n)
                with torch.device("meta"):
                    m = cls(cfg, 0)
            per[n] = {"head_dim": _first_int(m, ("head_dim", "head_k_dim", "head_k"), cfg.n_embd // cfg.n_head),
                      "heads": _first_int(m, ("n_head", "n_heads", "num_heads"), cfg.n_head),
                      "kv_heads": _first_int(m, ("n_kv_head", "n_kv_heads", "num_kv_heads"), None)}
        first = per[self.parts[0][0]]
        c.head_dim, c.heads, c.kv_heads = first["head_dim"], first["heads"], first["kv_heads"]
        c.hd_dev = max(abs(p["head_dim"] - self.target_hd) for p in per.values())
        c.per_mixer = per if self.hybrid else None
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
        searched = {self.knob(n, a): vals for n, cls, _ in self.parts
                    for a, vals in _searched_fields(cls, self.fixed[n]).items()}
        names = list(searched)
        fams = []
        for h in range(1, MAX_N_HEAD + 1):
            for combo in _product([searched[n] for n in names]):
                fams.append(_Family(h, tuple(zip(names, combo))))
        return fams

    def head_dim_bound(self, fam: _Family) -> float:
        """A lower bound of |head dim - target| for the family, before building anything: the
        head_dim arg where set, else n_embd / n_head for widths in [d_ref / 2, 2 d_ref]."""
        lo, hi = self.d_ref / 2 / fam.n_head, 2 * self.d_ref / fam.n_head
        free = 0.0 if lo <= self.target_hd <= hi else min(abs(lo - self.target_hd), abs(hi - self.target_hd))
        knobs, bounds = dict(fam.knobs), []
        for n, _, _ in self.parts:  # a hybrid: the bound of its mixer furthest from the target
            hd = knobs.get(self.knob(n, "head_dim"), self.fixed[n].get("head_dim"))
            bounds.append(abs(hd - self.target_hd) if hd is not None else free)
        return max(bounds)

    def rank_key(self, c: _Cand) -> tuple:
        dev = abs(c.count / self.budget - 1)
        tiebreak = (c.fam.n_head, repr(c.fam.knobs), c.d)
        if dev > self.tol:
            return (1, dev, not c.kernel_ok, c.hd_dev, abs(c.d - self.d_ref), tiebreak)
        return (0, not c.kernel_ok, c.hd_dev, abs(c.d - self.d_ref), dev, tiebreak)

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
