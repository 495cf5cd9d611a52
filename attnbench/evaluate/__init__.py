"""Length generalisation: trained runs evaluated far past their training context (`attnbench eval`).

    windows.py    the windows of a length (every non-overlapping one of the validation split), length checks
    positions.py  per-position losses averaged in power-of-two position buckets
    recall_lengths.py  MQAR runs at other lengths: test sets with proportionally more pairs
    run.py        finding and checking runs, one run's evaluation, its rows and figure
    cli.py        `attnbench eval`

The report's section is attnbench/report/lengthgen.py; docs/length-generalisation.md explains the method.
"""
from .cli import register_cli
from .positions import BucketSums, bucket_edges
from .run import ROWS, evaluate_path, evaluate_run, find_runs, not_defined_reason, read_rows
from .windows import eval_windows, parse_lengths

__all__ = ["ROWS", "BucketSums", "bucket_edges", "eval_windows", "evaluate_path", "evaluate_run", "find_runs",
           "not_defined_reason", "parse_lengths", "read_rows", "register_cli"]
