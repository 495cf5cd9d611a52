"""The sweep file (`attnbench sweep FILE`): many training runs from one TOML file, then the benchmarks,
then the report.

A sweep file names a base run config, the mixers, learning rates and seeds, and the settings shared by
every run; the sweep resolves one RunConfig per (mixer, learning rate, seed), trains each in its own
process, benchmarks the mixers and writes the report. Example (attnbench/configs/sweeps/bakeoff.toml):

    name = "bakeoff"
    base_config = "shakespeare_char"                # a run TOML: a path (from the sweep file's folder or
                                                    # the cwd) or a bundled config's name
    dataset = "shakespeare_char"                    # data.dataset (optional)
    param_budget = "10.7M"                          # shapes from attnbench.params.match_all (optional)
    mixers = ["softmax", "deltanet", "gated_deltanet*3+softmax"]   # registered names or layer patterns (hybrids)
    learning_rates = [1e-3]                         # optional: default the base config's
    seeds = [1337]                                  # optional: default the base config's train.seed
    min_lr_ratio = 0.1                              # optional: optim.min_lr = ratio * learning rate
    jobs_per_device = 5                             # optional defaults of the CLI options of the same name
    devices = "auto"
    nproc_per_node = 1
    cuda_mps = true                                 # optional: runs sharing a GPU train under a private MPS daemon

    [overrides]                                     # RunConfig keys for every run (dotted or nested)
    "train.max_iters" = 3000
    [mixer_overrides.nsa]                           # RunConfig keys for one mixer's runs
    "model.backend" = "torch"
    [grid]                                          # optional: more axes, every combination (grid.py)
    "model.n_embd" = [64, 128]
    [[points]]                                    # optional: coupled settings, one point each (grid.py)
    "task.seq_len" = 256
    "task.num_kv_pairs" = 16
    [mixer_overrides."gated_deltanet*3+softmax"]     # (a pattern's name is a quoted TOML key)
    "model.n_layer" = 8
    [bench]                                         # benchmarks after training (`attnbench bench all`)
    enabled = true
    benches = ["latency", "memory", "throughput"]
    options = { }                                   # extra `--key value` options for the bench command
    [eval]                                          # optional: `attnbench eval` of every finished run after
    lengths = [256, 1024, 4096, 16384]              # training (length generalisation, in the report)
    checkpoint = "best"                             # or "latest"
    batch_tokens = 65536                            # optional: tokens per forward batch

Variants: one mixer trained twice with different settings, each its own row in the report. A label in
`mixers` that is not a mixer names one in [variants], and [mixer_overrides.<label>] sets what differs:

    mixers = ["softmax", "softmax_nope"]
    [variants]
    softmax_nope = "softmax"                        # label = the mixer it trains
    [mixer_overrides.softmax_nope]
    "model.pos_emb" = "none"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import mixers as mixer_registry
from ..config import CONFIGS_DIR, SECTIONS, all_keys, find_config_file, read_toml
from ..counts import parse_count
from ..errors import ConfigError, did_you_mean
from .grid import check_disjoint, parse_grid, parse_points

BENCHES = ("latency", "memory", "throughput")

# Sweep-file keys, with what they mean (used for the "unknown key" message and `--help`).
SWEEP_KEYS = {
    "name": "sweep name (default: the file name); the default --out is out/<name>",
    "description": "free text",
    "base_config": "run TOML every run starts from",
    "dataset": "data.dataset of every run",
    "param_budget": "parameter budget, e.g. '10.7M': shapes from attnbench.params.match_all",
    "mixers": "list of registered mixer names, layer patterns such as 'gated_deltanet*3+softmax' (hybrids), labels of "
              "[variants], or 'all' (every registered mixer and the hybrids of attnbench.mixers.PATTERNS)",
    "learning_rates": "list of optim.learning_rate values",
    "seeds": "list of train.seed values",
    "min_lr_ratio": "optim.min_lr = ratio * learning rate (else the config's min_lr)",
    "jobs_per_device": "runs sharing one device at a time (CLI --jobs_per_device wins)",
    "devices": "'auto', 'cpu' or GPU indices '0,1' (CLI --devices wins)",
    "nproc_per_node": "processes (GPUs) per run under torchrun (CLI --nproc_per_node wins)",
    "cuda_mps": "true: runs sharing a GPU (jobs_per_device > 1) train under a private CUDA MPS daemon, so their "
                "kernels overlap instead of taking turns (attnbench/cuda_mps.py; CLI --cuda_mps / --no-cuda_mps wins)",
    "overrides": "table of RunConfig keys for every run",
    "mixer_overrides": "table of tables: RunConfig keys per mixer (or variant label)",
    "variants": "table label = mixer: a label listed in mixers that trains that mixer, with its own "
                "[mixer_overrides.<label>] (e.g. softmax_nope = \"softmax\" with model.pos_emb = \"none\")",
    "bench": "table: enabled, benches, options",
    "launcher": "table: type ('local' or 'slurm') and Slurm's job options (attnbench/sweep/launchers/slurm_options.py)",
    "grid": "table of dotted RunConfig keys -> lists of values: one run per combination (attnbench/sweep/grid.py)",
    "points": "array of tables [[points]], each a set of RunConfig keys that go together: one run per table",
    "head_dim": "model.n_head = max(1, n_embd // head_dim) for every run (sweeping widths with one head rule)",
    "eval": "table: lengths, checkpoint, batch_tokens: evaluate every finished run at these lengths after "
            "training (`attnbench eval`; the report's length-generalisation section)",
}
BENCH_KEYS = ("enabled", "benches", "options")
EVAL_KEYS = ("lengths", "checkpoint", "batch_tokens")
EVAL_CHECKPOINTS = ("best", "latest")
# Keys set by the sweep axes; setting them in [overrides] would silently lose to the axes.
_AXIS_KEYS = {"model.mixer": "mixers", "optim.learning_rate": "learning_rates", "train.seed": "seeds",
              "train.out_dir": "--out", "data.dataset": "dataset"}


@dataclass
class BenchSpec:
    enabled: bool = True
    benches: list[str] = field(default_factory=lambda: list(BENCHES))
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    lengths: list[int]
    checkpoint: str = "best"
    batch_tokens: int = 1 << 16


@dataclass
class Sweep:
    """A parsed, validated sweep file (the runs themselves come from `plan`)."""

    name: str
    path: Path
    base_config: Path
    mixers: list[str]
    learning_rates: list[float] | None = None
    seeds: list[int] | None = None
    dataset: str | None = None
    param_budget: str | None = None
    min_lr_ratio: float | None = None
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    mixer_overrides: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    bench: BenchSpec = field(default_factory=BenchSpec)
    grid: list[tuple[str, list[Any]]] = field(default_factory=list)
    points: list[list[tuple[str, Any]]] = field(default_factory=list)
    head_dim: int | None = None
    variants: dict[str, str] = field(default_factory=dict)  # label -> the mixer it trains
    eval: EvalSpec | None = None
    jobs_per_device: int = 1
    devices: str = "auto"
    nproc_per_node: int = 1
    cuda_mps: bool = False
    launcher: dict[str, Any] = field(default_factory=dict)  # [launcher]: checked by attnbench.sweep.launchers
    text: str = ""  # the file as written, kept in the manifest

    def mixer_of(self, label: str) -> str:
        """The mixer a label of `mixers` trains (itself, unless it is a variant)."""
        return self.variants.get(label, label)


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'train': {'max_iters': 3}, 'model.mixer_args': {'a': 1}} -> [('train.max_iters', 3), ('model.mixer_args.a', 1)]"""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (key in SECTIONS or key == "model.mixer_args"):
            out.extend(_flatten(v, f"{key}."))
        else:
            out.append((key, v))
    return out


def _canonical_key(key: str) -> str:
    """'max_iters' -> 'train.max_iters' (bare keys are allowed where unique, as on the command line)."""
    if key.split(".")[0] in SECTIONS:
        return key
    owners = [k for k in all_keys() if k.split(".", 1)[1] == key]
    return owners[0] if len(owners) == 1 else key


def _list_of(tree: dict, key: str, typ: type, path: Path) -> list | None:
    if key not in tree:
        return None
    val = tree[key]
    if not isinstance(val, list):
        val = [val]
    if not val:
        raise ConfigError(f"{path}: {key} is empty; give at least one value")
    out = []
    for v in val:
        if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        elif typ is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ConfigError(f"{path}: {key} must be a list of {typ.__name__} values, got {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ConfigError(f"{path}: {key} lists a value twice ({out}); every run would be duplicated")
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file (a path, or a bundled one such as "sweeps/bakeoff"): keys, mixers,
    base config. ConfigError names what is wrong."""
    found = find_config_file(path)
    if found is None:
        bundled = ", ".join(sorted(f"sweeps/{f.stem}" for f in (CONFIGS_DIR / "sweeps").glob("*.toml")))
        raise ConfigError(f"sweep file {str(Path(path))!r} not found (bundled sweeps: {bundled})")
    path = found
    text, tree = read_toml(path, "sweep file")
    for k in tree:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown sweep key {k!r}{did_you_mean(k, list(SWEEP_KEYS), list_all=True)}")
    if "base_config" not in tree:
        raise ConfigError(f"{path}: base_config is missing: name the run TOML every run starts from, "
                          "e.g. base_config = \"shakespeare_char\"")
    for key in ("name", "base_config", "description"):
        if key in tree and not isinstance(tree[key], str):
            raise ConfigError(f"{path}: {key} must be a string, got {tree[key]!r}")
    base = find_config_file(tree["base_config"], path.parent)
    if base is None:
        raise ConfigError(f"{path}: base_config {tree['base_config']!r} not found (looked next to the sweep file, "
                          f"in {Path.cwd()} and among the bundled configs in {CONFIGS_DIR})")
    base = base.resolve()
    mixers = expand_mixers(_list_of(tree, "mixers", str, path) or [])
    if not mixers:
        raise ConfigError(f"{path}: mixers is missing: list the mixers to compare, e.g. mixers = [\"softmax\"] "
                          f"(available: {', '.join(mixer_registry.available())})")
    variants = _parse_variants(tree.get("variants", {}), mixers, path)
    for m in mixers:
        mixer_registry.parse_pattern(variants.get(m, m))  # ConfigError with the nearest registered name
    sw = Sweep(name=str(tree.get("name", path.stem)), path=path, base_config=base, mixers=mixers, text=text,
               learning_rates=_list_of(tree, "learning_rates", float, path), seeds=_list_of(tree, "seeds", int, path),
               variants=variants)
    for key in ("dataset", "param_budget", "devices"):
        if key in tree:
            if not isinstance(tree[key], (str, int, float)) or isinstance(tree[key], bool):
                raise ConfigError(f"{path}: {key} must be a string, got {tree[key]!r}")
            setattr(sw, key, str(tree[key]))
    if sw.param_budget is not None:
        _parse_budget(sw.param_budget, path)
    if "min_lr_ratio" in tree:
        r = tree["min_lr_ratio"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r <= 1:
            raise ConfigError(f"{path}: min_lr_ratio must be a number in [0, 1], got {r!r}")
        sw.min_lr_ratio = float(r)
    for key in ("jobs_per_device", "nproc_per_node"):
        if key in tree:
            v = tree[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{path}: {key} must be an integer >= 1, got {v!r}")
            setattr(sw, key, v)
    if "cuda_mps" in tree:
        if not isinstance(tree["cuda_mps"], bool):
            raise ConfigError(f"{path}: cuda_mps must be true or false, got {tree['cuda_mps']!r}")
        sw.cuda_mps = tree["cuda_mps"]
    ov = tree.get("overrides", {})
    if not isinstance(ov, dict):
        raise ConfigError(f"{path}: overrides must be a table of RunConfig keys, e.g. [overrides] \"train.max_iters\" = 100")
    sw.overrides = [(_canonical_key(k), v) for k, v in _flatten(ov)]
    mo = tree.get("mixer_overrides", {})
    if not isinstance(mo, dict) or not all(isinstance(v, dict) for v in mo.values()):
        raise ConfigError(f"{path}: mixer_overrides must hold one table per mixer, e.g. [mixer_overrides.nsa]")
    for m, table in mo.items():
        if m not in mixers:
            raise ConfigError(f"{path}: [mixer_overrides.{m}] names a mixer that is not in mixers{did_you_mean(m, mixers, list_all=True)}")
        sw.mixer_overrides[m] = [(_canonical_key(k), v) for k, v in _flatten(table)]
    for key, _ in sw.overrides + [kv for t in sw.mixer_overrides.values() for kv in t]:
        if key in _AXIS_KEYS:
            raise ConfigError(f"{path}: {key} is set by the sweep itself; use the sweep key {_AXIS_KEYS[key]!r} instead")
    sw.bench = _parse_bench(tree.get("bench", {}), path)
    if not isinstance(tree.get("launcher", {}), dict):
        raise ConfigError(f"{path}: launcher must be a table, e.g. [launcher] type = \"slurm\"")
    sw.launcher = dict(tree.get("launcher", {}))
    sw.grid = parse_grid(tree.get("grid", {}), path)
    sw.points = parse_points(tree["points"], path) if "points" in tree else []
    check_disjoint(sw.grid, sw.points, path)
    if "head_dim" in tree:
        h = tree["head_dim"]
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise ConfigError(f"{path}: head_dim must be an integer >= 1 (e.g. 64), got {h!r}")
        sw.head_dim = h
    if "eval" in tree:
        sw.eval = _parse_eval(tree["eval"], path)
    return sw


def _parse_variants(tree: Any, mixers: list[str], path: Path) -> dict[str, str]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: variants must be a table of label = mixer, e.g. [variants] softmax_nope = \"softmax\"")
    for label, mixer in tree.items():
        if not isinstance(mixer, str):
            raise ConfigError(f"{path}: variants.{label} must name a mixer, got {mixer!r}")
        if label in mixer_registry.available():
            raise ConfigError(f"{path}: variants.{label}: {label!r} is a mixer's own name; give the variant another label")
        if label not in mixers:
            raise ConfigError(f"{path}: variants.{label} is not listed in mixers; add {label!r} to mixers to train it")
        mixer_registry.get(mixer)
    return dict(tree)


def _parse_eval(tree: Any, path: Path) -> EvalSpec:
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: eval must be a table: [eval] lengths = [256, 1024]")
    for k in tree:
        if k not in EVAL_KEYS:
            raise ConfigError(f"{path}: unknown key eval.{k}{did_you_mean(k, EVAL_KEYS, list_all=True)}")
    lengths = tree.get("lengths")
    if not isinstance(lengths, list) or not lengths or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
        raise ConfigError(f"{path}: eval.lengths must be a non-empty list of positive token counts, got {lengths!r}")
    spec = EvalSpec(sorted(set(lengths)))
    ck = tree.get("checkpoint", spec.checkpoint)
    if ck not in EVAL_CHECKPOINTS:
        raise ConfigError(f"{path}: eval.checkpoint {ck!r} is not a checkpoint: use one of "
                          f"{', '.join(EVAL_CHECKPOINTS)}{did_you_mean(str(ck), EVAL_CHECKPOINTS)}")
    spec.checkpoint = ck
    bt = tree.get("batch_tokens", spec.batch_tokens)
    if not isinstance(bt, int) or isinstance(bt, bool) or bt < 1:
        raise ConfigError(f"{path}: eval.batch_tokens must be a positive integer, got {bt!r}")
    spec.batch_tokens = bt
    return spec


def expand_mixers(names: list[str]) -> list[str]:
    """A sweep's mixer list with `all` replaced by every registered mixer and the PATTERNS hybrids (a mixer
    added to attnbench/mixers/ joins every sweep that says `all` without an edit); each name once."""
    return list(dict.fromkeys(m for name in names for m in (mixer_registry.everything() if name == "all" else [name])))


def set_mixers(sweep: Sweep, items: list[str]) -> None:
    """`--mixers deltanet,softmax` (or `all`) on the command line: these mixers instead of the sweep file's;
    its [variants] and [mixer_overrides] apply to the labels still listed."""
    names = expand_mixers([m.strip() for item in items for m in item.split(",") if m.strip()])
    if not names:
        raise ConfigError("--mixers: give mixer names separated by commas, e.g. --mixers softmax,deltanet, or all")
    for m in names:
        try:
            mixer_registry.parse_pattern(sweep.variants.get(m, m))
        except ConfigError as e:  # names the nearest registered mixer
            raise ConfigError(f"--mixers {m}: {e}") from None
    sweep.mixers = names
    sweep.mixer_overrides = {k: v for k, v in sweep.mixer_overrides.items() if k in names}


def add_overrides(sweep: Sweep, items: list[str]) -> None:
    """`--set train.compile=false` on the command line: one more [overrides] entry for every run."""
    for item in items:
        key, eq, val = item.removeprefix("--").partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set train.compile=false")
        key = _canonical_key(key.strip())
        if key in _AXIS_KEYS:
            raise ConfigError(f"--set {key}: set by the sweep itself (sweep key {_AXIS_KEYS[key]!r})")
        sweep.overrides.append((key, val))


def _parse_bench(tree: Any, path: Path) -> BenchSpec:
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: bench must be a table: [bench] enabled = true")
    for k in tree:
        if k not in BENCH_KEYS:
            raise ConfigError(f"{path}: unknown key bench.{k}{did_you_mean(k, BENCH_KEYS, list_all=True)}")
    spec = BenchSpec()
    if "enabled" in tree:
        if not isinstance(tree["enabled"], bool):
            raise ConfigError(f"{path}: bench.enabled must be true or false, got {tree['enabled']!r}")
        spec.enabled = tree["enabled"]
    if "benches" in tree:
        b = tree["benches"]
        if not isinstance(b, list) or not b:
            raise ConfigError(f"{path}: bench.benches must be a non-empty list out of {list(BENCHES)}")
        for x in b:
            if x not in BENCHES:
                raise ConfigError(f"{path}: bench.benches: unknown benchmark {x!r}{did_you_mean(str(x), BENCHES, list_all=True)}")
        spec.benches = list(b)
    if "options" in tree:
        if not isinstance(tree["options"], dict):
            raise ConfigError(f"{path}: bench.options must be a table of `attnbench bench` options")
        spec.options = dict(tree["options"])
    return spec


def _parse_budget(budget: str, path: Path | str) -> int:
    try:
        return parse_count(budget, what="param_budget")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

