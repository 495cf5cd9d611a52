"""The command-line options of `attnbench bench`, one dataclass per benchmark.

These dataclasses are the one description of the options: bench/cli.py builds its argparse parsers
from them, `check_options` checks a sweep file's [bench.options] against them before anything runs,
and `options_to_argv` turns those options into the flags of one bench command.

A field is one option: its default (None where the default depends on the device; the benchmark's
Options.defaults(device) fills it in, and the help says both) and, in its metadata, its help text and
how a value is read (`kind`):
  flag    a switch (--no_match); true or false in a sweep file
  int     a whole number        float   a number
  count   a count such as 4096, 64k or 1Mi (attnbench.counts.parse_count)
  counts  comma-separated counts (--prompt_lens 64,256); a list [64, 256] in a sweep file
  str     text, one of `choices` where given
  repeat  repeatable KEY=VALUE (--set); a list of strings in a sweep file

TargetArgs says which models run, on which device and where the rows go: whoever starts a benchmark
sets these (a sweep sets them to its trained shapes), so they are not options for check_options.
SharedArgs are options of every benchmark; LatencyArgs, MemoryArgs and ThroughputArgs each one's own.
`bench all` takes the three benchmarks' options except --batch (each runs with its default batch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..counts import parse_count
from ..errors import ConfigError, did_you_mean

DEFAULT_BUDGET = "10.7M"
DTYPES = ("auto", "float32", "bfloat16", "autocast")
BENCHES = ("latency", "memory", "throughput")  # `all` runs them in the order latency, throughput, memory
KINDS = ("flag", "int", "float", "count", "counts", "str", "repeat")


def option(default: Any, help: str, kind: str = "str", **extra: Any) -> Any:
    """A dataclass field that is a command-line option (extra: choices, metavar, nargs, const, from_bool,
    per_bench: not an option of `bench all`)."""
    assert kind in KINDS, kind
    meta = {"help": help, "kind": kind, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_counts(text: str | int | list | tuple | None) -> list[int] | None:
    """'128,1k,4096' -> [128, 1000, 4096]; a list of counts or one count as well; None stays None."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [parse_count(t) for t in text]
    if isinstance(text, int) and not isinstance(text, bool):
        return [parse_count(text)]
    return [parse_count(t) for t in str(text).split(",") if t.strip()]


_CUDA_GRAPH_HELP = ("CUDA graphs (auto: on for CUDA): latency captures the decode step (a mixer whose step is not "
                    "graph-safe gets cuda_graph=false and the reason); throughput captures the whole training step "
                    "as train.cuda_graph does")


def _cuda_graph() -> Any:
    return option("auto", _CUDA_GRAPH_HELP, choices=("auto", "on", "off"), nargs="?", const="on",
                  from_bool=("off", "on"))


@dataclass
class TargetArgs:
    """Which models, on which device, rows to which file (set by whoever starts the benchmark)."""

    mixers: str | None = option(None, "comma-separated mixers (default: every registered mixer)")
    device: str = option("auto", "default: cuda if available", choices=("auto", "cpu", "cuda"))
    json: str | None = option(None, "append one JSON row per measurement to FILE", metavar="FILE")
    budget: str = option(DEFAULT_BUDGET, "parameter budget for the matched shapes (attnbench.params), e.g. 10.7M")
    no_match: bool = option(False, "use configs/<mixer>.toml shapes instead of parameter matching", kind="flag")
    wait_for: str | None = option(
        None, "start up (imports, shapes, options; with CUDA also FLA's import), then wait until FILE exists before "
              "using the device: a sweep starts the next benchmark so while one measures", metavar="FILE")


@dataclass
class SharedArgs:
    """Options of every benchmark."""

    set: list[str] = option([], "override a model key for every mixer (n_layer=2) or one mixer's mixer_args "
                                "(nsa.block_size=16); repeatable", kind="repeat", metavar="KEY=VALUE")
    dtype: str = option("auto", "auto: float32 on the CPU; on CUDA bf16 weights for latency, bf16 autocast for "
                                "training", choices=DTYPES)


@dataclass
class LatencyArgs:
    prompt_lens: list[int] | None = option(None, "comma-separated (GPU default 128,1024,4096,16384; CPU 64,256,1024)",
                                           kind="counts")
    batch: int | None = option(None, "sequences decoded together (default 1)", kind="int", per_bench=True)
    decode_steps: int | None = option(None, "timed decode steps (GPU 100, CPU 20)", kind="int")
    decode_warmup: int | None = option(None, "untimed decode steps first (GPU 10, CPU 3)", kind="int")
    prefill_repeats: int | None = option(None, "timed prefills (GPU 5, CPU 3)", kind="int")
    recompute_steps: int | None = option(
        None, "timed tokens of the uncached decoding (each re-runs the whole context) for comparison; 0 skips it "
              "(default 3)", kind="int")
    cuda_graph: str = _cuda_graph()
    compile: bool = option(False, "torch.compile the decode step captured in the CUDA graph (compiles once per "
                                  "mixer and prompt length: slow to start)", kind="flag")


@dataclass
class MemoryArgs:
    batch: int | None = option(None, "sequences per training step (default 4)", kind="int", per_bench=True)
    start: int = option(256, "first context length (doubles from here)", kind="count")
    max_len: int | None = option(None, "largest context tried (GPU 1Mi, CPU 2048)", kind="count")
    tol: float = option(0.1, "bisect the threshold until first_oom/fits <= 1 + tol", kind="float")
    time_budget_s: float | None = option(
        None, "per mixer: stop growing the context once the steady step time spent plus the next step's would "
              "overrun it (GPU 60, CPU 300)", kind="float")
    simulate_oom_above: int | None = option(
        None, "raise torch.OutOfMemoryError inside the forward above this context (testing)", kind="count")
    no_isolate: bool = option(False, "CPU: measure in this process (peak RSS is then a process-lifetime maximum)",
                              kind="flag")


@dataclass
class ThroughputArgs:
    contexts: list[int] | None = option(None, "comma-separated context lengths (GPU 256..65536, CPU 64..512)",
                                        kind="counts")
    tokens_per_batch: int | None = option(None, "GPU 65536 (64 x 1024), CPU 2048", kind="count")
    steps: int | None = option(None, "timed training steps per context (GPU 5, CPU 2)", kind="int")
    warmup_steps: int | None = option(None, "untimed steps first (GPU 2, CPU 1)", kind="int")
    compile: bool = option(False, "torch.compile the model (in `bench all` also the CUDA-graph decode step of "
                                  "latency)", kind="flag")
    cuda_graph: str = _cuda_graph()


BENCH_ARGS: dict[str, type] = {"latency": LatencyArgs, "memory": MemoryArgs, "throughput": ThroughputArgs}


def groups(bench: str) -> list[tuple[str, list[dataclasses.Field]]]:
    """The options of `attnbench bench BENCH` (latency, memory, throughput or all) as (group title, fields),
    TargetArgs and SharedArgs first. In `all` an option several benchmarks share appears once, in the first
    benchmark's group, with the help of the last (the one that says what it does in `all`)."""
    if bench != "all" and bench not in BENCH_ARGS:
        raise ConfigError(f"unknown benchmark {bench!r}{did_you_mean(bench, [*BENCH_ARGS, 'all'], list_all=True)}")
    out = [("models and output", [*dataclasses.fields(TargetArgs), *dataclasses.fields(SharedArgs)])]
    if bench != "all":
        return out + [(bench, list(dataclasses.fields(BENCH_ARGS[bench])))]
    where: dict[str, int] = {}
    for name in BENCHES:
        out.append((name, []))
        for f in dataclasses.fields(BENCH_ARGS[name]):
            if f.metadata.get("per_bench"):
                continue
            if f.name in where:
                grp = out[where[f.name]][1]
                grp[[g.name for g in grp].index(f.name)] = f
            else:
                where[f.name] = len(out) - 1
                out[-1][1].append(f)
    return out


def option_fields(bench: str) -> dict[str, dataclasses.Field]:
    """{name: field} of the options `attnbench bench BENCH` takes, TargetArgs excluded."""
    target = {f.name for f in dataclasses.fields(TargetArgs)}
    return {f.name: f for _, fs in groups(bench) for f in fs if f.name not in target}


def from_namespace(cls: type, ns: Any) -> Any:
    """The `cls` dataclass from parsed arguments (an option the subcommand lacks keeps its default)."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


# ------------------------------------------------------------------ options from a sweep file


def check_options(options: dict[str, Any], benches: list[str], where: str) -> None:
    """Raise ConfigError (naming `where` and the key) unless every key of `options` is an option of one of
    `benches` (latency, memory, throughput, all) and its value has that option's type. Keys of TargetArgs
    are refused: whoever starts the benchmark sets them."""
    known: dict[str, dataclasses.Field] = {}
    for b in benches:
        try:
            known.update(option_fields(b))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    for key, value in options.items():
        f = known.get(key) or _refuse(key, known, where, benches)
        _check_value(f, value, f"{where}: {key}")


def options_to_argv(options: dict[str, Any], bench: str) -> list[str]:
    """The command-line flags of `attnbench bench BENCH` for the keys of `options` it takes (options of the
    other benchmarks are left out): lists become comma-separated ('--prompt_lens 64,256'), true flags
    '--no_isolate' (false ones nothing), 'set' one '--set ITEM' per item, cuda_graph = true/false
    '--cuda_graph on/off', anything else '--KEY str(value)'. A key that is no benchmark's option raises
    ConfigError."""
    own = option_fields(bench)
    every = {k: f for b in BENCHES for k, f in option_fields(b).items()}
    argv: list[str] = []
    for key, value in options.items():
        if key not in own:
            if key not in every:
                _refuse(key, every, "bench options", [bench])
            continue
        meta = own[key].metadata
        if meta["kind"] == "flag":
            argv += [f"--{key}"] if value else []
        elif meta["kind"] == "repeat":
            for item in [value] if isinstance(value, str) else value:
                argv += [f"--{key}", str(item)]
        elif isinstance(value, bool) and "from_bool" in meta:
            argv += [f"--{key}", meta["from_bool"][value]]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", ",".join(map(str, value))]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _refuse(key: str, known: dict[str, Any], where: str, benches: list[str]) -> Any:
    if key in {f.name for f in dataclasses.fields(TargetArgs)}:
        raise ConfigError(f"{where}: {key} is not a benchmark option: it picks the models, the device or the output "
                          "file, which whoever starts the benchmark sets (a sweep: its trained shapes); remove it")
    raise ConfigError(f"{where}: unknown option {key!r} for `attnbench bench {'/'.join(benches)}`"
                      f"{did_you_mean(key, sorted(known), list_all=True)}")


_EXPECTED = {"flag": "true or false", "int": "a whole number", "float": "a number",
             "count": "a count such as 4096, '64k' or '1Mi'",
             "counts": "a list of counts such as [64, 256] (or '64,1k')",
             "str": "a string", "repeat": "a list of 'KEY=VALUE' strings"}


def _check_value(f: dataclasses.Field, value: Any, where: str) -> None:
    kind, meta = f.metadata["kind"], f.metadata
    ok = True
    try:
        if kind == "flag":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind == "count":
            ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
            if ok:
                parse_count(value, what=f.name)
        elif kind == "counts":
            items = value if isinstance(value, (list, tuple)) else [value]
            ok = bool(items) and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in items)
            if ok:
                parse_counts(value)
        elif kind == "repeat":
            items = [value] if isinstance(value, str) else value
            ok = isinstance(items, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in items)
        elif kind == "str":
            if isinstance(value, bool) and "from_bool" in meta:
                return
            ok = isinstance(value, str) and ("choices" not in meta or value in meta["choices"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not ok:
        expected = _EXPECTED[kind]
        if "choices" in meta:
            expected = "one of " + ", ".join(map(repr, meta["choices"])) + (" (or true/false)" if "from_bool" in meta else "")
        raise ConfigError(f"{where} = {value!r}: expected {expected}")
