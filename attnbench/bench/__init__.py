"""Speed and memory benchmarks: `attnbench bench latency|memory|throughput|all`.

options.py        the command-line options of each benchmark (dataclasses); check_options and
                  options_to_argv for options written in a sweep file
shapes.py         the models: one parameter-matched shape per mixer, its benchmark variant, its construction
timing.py         device, precision, timed calls, out-of-memory errors
training_step.py  one training step as the trainer takes it, on random tokens
rows.py           one JSON row per measurement (see rows.base_row for the fields), text tables
latency.py        prefill time, then decode time per token from the mixer's state (optionally a CUDA graph)
memory.py         peak memory of one training step per context length, up to the out-of-memory threshold
throughput.py     training tokens/s per context length at a fixed batch of tokens; crossovers vs softmax
cli.py            the command line
"""
from .options import check_options, options_to_argv

__all__ = ["check_options", "options_to_argv"]
