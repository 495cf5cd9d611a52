"""Parameter matching: for a budget, find each mixer's GPT shape whose trainable parameter count is closest.

Fair by construction: every mixer gets the same n_layer, MLP, embeddings and head, and its width and
heads are searched so that `count_params` (an exact count of the built model) is as close to the budget
as the mixer's own constraints allow. Nothing here knows a particular mixer: the search space comes
from the model config (n_embd, n_head) and the fields the mixer's `Args` dataclass has, and validity
from the mixer itself (`Args.validate` / `check_config` / its constructor raising ConfigError).

count.py   exact parameter counts (count_params), budgets (parse_budget), the result of a match (Match)
search.py  the shape search: what is searched and how the winner is chosen
match.py   match_shape, match_all, resolve_match, softmax_width
table.py   the text table of matches

The `attnbench params` command is attnbench/params_cli.py (it also prints FLOPs, from attnbench.flops,
which sits above this package).
"""
from .count import REQUIRED_TOL, Match, count_params, parse_budget
from .match import match_all, match_shape, resolve_match, softmax_width
from .search import HEAD_DIM_VALUES, KV_HEAD_VALUES, MAX_N_HEAD, SEARCHED_ARGS, TARGET_HEAD_DIM
from .table import format_table

__all__ = ["REQUIRED_TOL", "Match", "count_params", "parse_budget", "match_all", "match_shape", "resolve_match",
           "softmax_width", "HEAD_DIM_VALUES", "KV_HEAD_VALUES", "MAX_N_HEAD", "SEARCHED_ARGS", "TARGET_HEAD_DIM",
           "format_table"]
