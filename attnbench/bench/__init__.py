"""Speed and memory benchmarks: `attnbench bench latency|memory|throughput|all`.

latency.py     prefill time, then decode time per token from the mixer's state (optionally a CUDA graph)
memory.py      peak memory of one training step per context length, up to the out-of-memory threshold
throughput.py  training tokens/s per context length at a fixed batch of tokens; crossovers vs softmax
common.py      shapes (parameter-matched), models, timing, JSON rows, tables
cli.py         the command line

Every measurement is one JSON row (see common.base_row for the fields).
"""
