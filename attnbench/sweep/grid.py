"""Axes of a sweep beyond mixers, learning rates and seeds: `[grid]` and `[[points]]`.

Zoology describes a sweep as a list of configs; these two tables produce that list from a sweep file:

    [grid]                                   # dotted RunConfig keys -> lists: every combination
    "model.n_embd" = [64, 128, 256]

    [[points]]                             # each a table of settings that go together
    "task.seq_len" = 64
    "task.num_kv_pairs" = 4
    [[points]]
    "task.seq_len" = 256
    "task.num_kv_pairs" = 16
    "train.batch_size" = 256

The points are the cartesian product of the grid's lists and the [[points]] tables (either may be absent; with
neither there is one empty point). Each point is a list of overrides applied after [overrides] and
[mixer_overrides] (attnbench/sweep/plan.py) and is named in the run id by its values (`point_label`).
`head_dim = 64` (a sweep key) sets each run's model.n_head to max(1, n_embd // head_dim), so widths can be
swept directly with one rule for every mixer.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..config import all_keys, parse_config
from ..errors import ConfigError, did_you_mean

# keys the sweep's own axes set (mixers, learning_rates, seeds, --out, dataset)
AXIS_KEYS = ("model.mixer", "optim.learning_rate", "train.seed", "train.out_dir", "data.dataset")


def _check_key(key: Any, where: str, path: Path) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"{path}: {where}: keys must be dotted RunConfig keys such as \"model.n_embd\", got {key!r}")
    if not (key.startswith("model.mixer_args.") or key in all_keys()):
        raise ConfigError(f"{path}: {where}: unknown key {key!r}{did_you_mean(key, all_keys())} "
                          "(write the dotted key, e.g. \"model.n_embd\")")
    if key in AXIS_KEYS:
        raise ConfigError(f"{path}: {where}: {key} is set by the sweep itself (mixers, learning_rates, seeds, "
                          "dataset, --out)")
    return key


def _scalar(v: Any, key: str, where: str, path: Path) -> Any:
    if isinstance(v, (dict, list)):
        raise ConfigError(f"{path}: {where}: {key} must be a single value (a number, string or boolean), got {v!r}")
    return v


def parse_grid(tree: Any, path: Path) -> list[tuple[str, list[Any]]]:
    """`[grid]`: key -> non-empty list of distinct values."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: grid must be a table of dotted keys -> lists, e.g. [grid] \"model.n_embd\" = [64, 128]")
    out = []
    for key, vals in tree.items():
        key = _check_key(key, "[grid]", path)
        if isinstance(vals, dict):
            raise ConfigError(f"{path}: [grid]: {key!r} is a table; quote dotted keys, e.g. \"model.n_embd\" = [64, 128]")
        vals = vals if isinstance(vals, list) else [vals]
        if not vals:
            raise ConfigError(f"{path}: [grid]: {key} is empty; give at least one value")
        vals = [_scalar(v, key, "[grid]", path) for v in vals]
        if len({repr(v) for v in vals}) != len(vals):
            raise ConfigError(f"{path}: [grid]: {key} lists a value twice ({vals}); every run would be duplicated")
        out.append((key, vals))
    return out


def parse_points(tree: Any, path: Path) -> list[list[tuple[str, Any]]]:
    """`[[points]]`: a list of tables of coupled overrides, no two alike."""
    if not isinstance(tree, list) or not all(isinstance(t, dict) for t in tree):
        raise ConfigError(f"{path}: points must be an array of tables: [[points]] \"task.seq_len\" = 256 ...")
    if not tree:
        raise ConfigError(f"{path}: points is empty; give at least one [[points]] table or leave it out")
    out, seen = [], set()
    for i, table in enumerate(tree):
        if not table:
            raise ConfigError(f"{path}: [[points]] number {i + 1} is empty")
        where = f"[[points]] number {i + 1}"
        items = [(_check_key(k, where, path), _scalar(v, k, where, path)) for k, v in table.items()]
        sig = repr(sorted(items, key=lambda kv: kv[0]))
        if sig in seen:
            raise ConfigError(f"{path}: {where} repeats an earlier variant; every run would be duplicated")
        seen.add(sig)
        out.append(items)
    return out


def check_disjoint(grid: list[tuple[str, list]], tables: list[list[tuple[str, Any]]], path: Path) -> None:
    """A key in both the grid and a variant would be set twice per run: refuse it."""
    both = {k for k, _ in grid} & {k for v in tables for k, _ in v}
    if both:
        raise ConfigError(f"{path}: {', '.join(sorted(both))} is set in both [grid] and [[points]]; keep it in one")


def expand(grid: list[tuple[str, list]], tables: list[list[tuple[str, Any]]]) -> list[list[tuple[str, Any]]]:
    """Every combination of the grid's values with each variant (one empty point when there are neither)."""
    combos = [list(zip([k for k, _ in grid], vals)) for vals in itertools.product(*[v for _, v in grid])]
    return [c + list(v) for v in (tables or [[]]) for c in combos]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def point_label(point: list[tuple[str, Any]]) -> str:
    """A readable name for a point in run ids: `n_embd64-seq_len256-num_kv_pairs16` (last key parts)."""
    parts = []
    for k, v in point:
        s = f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
        parts.append(_short(k) + "".join(c if c.isalnum() or c in "._" else "_" for c in s))
    return "-".join(parts)


def head_count(n_embd: Any, head_dim: int | None) -> int | None:
    """model.n_head under the sweep's head_dim rule, or None when there is no rule or no integer width."""
    if head_dim is None or not isinstance(n_embd, int) or isinstance(n_embd, bool):
        return None
    return max(1, n_embd // head_dim)


def task_kinds(base_config: Path, overrides: list[tuple[str, Any]], grid: list[tuple[str, list]],
               tables: list[list[tuple[str, Any]]]) -> set[str]:
    """The task kinds (task.kind) a sweep's runs train on, e.g. {"lm"} or {"mqar"}."""
    kinds = {parse_config(base_config, dict(overrides)).task.kind}
    kinds |= {str(v) for k, vals in grid if k == "task.kind" for v in vals}
    kinds |= {str(v) for var in tables for k, v in var if k == "task.kind"}
    return kinds


def apply_head_rule(cfg_tree: dict, ov: list[tuple[str, Any]], head_dim: int | None) -> list[tuple[str, Any]]:
    """`ov` plus model.n_head from the head_dim rule for the width these settings give."""
    if head_dim is None:
        return ov
    n = head_count(parse_config(cfg_tree, dict(ov)).model.n_embd, head_dim)
    return ov + [("model.n_head", n)] if n is not None else ov

