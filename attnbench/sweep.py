"""`attnbench sweep FILE`: many training runs from one TOML file, then the benchmarks, then the report.

A sweep file names a base run config, the mixers, learning rates and seeds, and the settings shared by
every run; the sweep resolves one RunConfig per (mixer, learning rate, seed), trains each in its own
process, benchmarks the mixers and writes the report. Example (configs/sweeps/seed.toml):

    name = "seed"
    base_config = "configs/shakespeare_char.toml"   # a run TOML: next to the sweep file, the cwd or the repo
    dataset = "shakespeare_char"                    # data.dataset (optional)
    param_budget = "10.7M"                          # shapes from attnbench.params.match_all (optional)
    mixers = ["softmax", "deltanet"]
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
    [bench]                                         # benchmarks after training (`attnbench bench all`)
    enabled = true
    benches = ["latency", "memory", "throughput"]
    options = { }                                   # extra `--key value` options for the bench command

Shapes: with `param_budget` every mixer gets the shape `params.match_all` finds for it (starting
from the base model section, plus `<base dir>/<mixer>.toml`'s model section when that file exists,
minus the mixer args the matcher searches, e.g. head_dim, unless [overrides] fix them); without it,
that model section (or the base) is used as is. Precedence, last wins: base config -> mixer config's
model section -> [overrides] -> `--set KEY=VALUE` -> [mixer_overrides.<mixer>] -> the sweep axes
(mixer, learning rate, seed) -> matched shape. Every resolved config is validated before anything
runs (unknown keys name the nearest valid one).

Runs on disk: `<out>/runs/<run-id>/` holds what `attnbench train` writes (config.json, metrics.jsonl,
ckpt/, summary.json last) plus run.json (the resolved config the sweep launched it with, its parameter
match and its launches: device and how many runs shared it, which matters for speed numbers). The run
id is `<mixer>-lr<lr>-s<seed>-<hash>`, the hash being 8 hex digits of the resolved config without the
settings that do not change what is computed (out_dir, progress, resume, logging, data_dir,
checkpoint retention, eval batch size, torch.compile). So re-running a sweep recognises its runs: a run with a valid
summary.json is done and skipped, one with a checkpoint is resumed from it (`train.resume`), one with
neither is started (files of an attempt killed before its first checkpoint are discarded first).
`<out>/sweep.json` (written atomically) is the manifest: the plan, every run's status and launches.

Processes: each run is a child process, `python -m attnbench.sweep RUN_DIR` (this module's own
entry point, reading RUN_DIR/run.json), so a crash of one run does not stop the sweep. Runs are
scheduled on slots: `--devices 0,1` gives one slot per GPU (CUDA_VISIBLE_DEVICES per child),
`--jobs_per_device N` N slots per GPU (small, launch-bound models share a GPU well; the concurrency
is recorded in run.json and the report flags speed numbers measured that way), `--nproc_per_node N`
runs each training under `python -m torch.distributed.run --standalone --nproc_per_node N` on a group
of N devices (DDP; train.gradient_accumulation_steps must be a multiple of N). A run across nodes:
`attnbench sweep FILE --dry_run` writes every run.json and prints the commands; start one under
torchrun on every node (`torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d
--rdzv_endpoint HOST:PORT -m attnbench.sweep OUT/runs/<id>`, shared filesystem), and the next
`attnbench sweep` finds it done.

Stopping: Ctrl-C (SIGINT) or SIGTERM is forwarded to the children, which stop at a step boundary
(their checkpoints stay); the sweep records them as interrupted and exits 130; run the same command
again to continue. A SIGKILL of the sweep kills its children too (PR_SET_PDEATHSIG), so a restart
loses at most the steps since each run's last checkpoint. A lock file keeps two sweeps out of one
folder.

After training: one `attnbench bench all --mixers M --no_match --set <trained shape> ...` child per
mixer writing `<out>/bench/<mixer>.jsonl` (skipped when present; alone on its device, after all
training; on the CPU with the training runs' thread count, because two OpenMP threads on a busy
2-core machine measure the neighbours, not the model; on a GPU each child starts before its turn,
the first while the runs train and each next one while the previous one measures, and waits with
`--wait_for` until the device is free, so its imports are off the critical path;
ATTNBENCH_BENCH_PRESTART=0 turns that off), then `attnbench.report.build_report(<out>)` writes
`<out>/report/report.md` and its figures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import SECTIONS, RunConfig
from .resolve import load_config
from .errors import AttnbenchError, ConfigError, did_you_mean
from .counts import parse_count
from .files import atomic_write_json, atomic_write_text, read_jsonl

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the repository (configs/ lives here)
RUN_FILE, MANIFEST, LOCK = "run.json", "sweep.json", ".sweep.lock"
BENCHES = ("latency", "memory", "throughput")

# Sweep-file keys, with what they mean (used for the "unknown key" message and `--help`).
SWEEP_KEYS = {
    "name": "sweep name (default: the file name); the default --out is out/<name>",
    "description": "free text",
    "base_config": "run TOML every run starts from",
    "dataset": "data.dataset of every run",
    "param_budget": "parameter budget, e.g. '10.7M': shapes from attnbench.params.match_all",
    "mixers": "list of registered mixer names",
    "learning_rates": "list of optim.learning_rate values",
    "seeds": "list of train.seed values",
    "min_lr_ratio": "optim.min_lr = ratio * learning rate (else the config's min_lr)",
    "jobs_per_device": "runs sharing one device at a time (CLI --jobs_per_device wins)",
    "devices": "'auto', 'cpu' or GPU indices '0,1' (CLI --devices wins)",
    "nproc_per_node": "processes (GPUs) per run under torchrun (CLI --nproc_per_node wins)",
    "cuda_mps": "true: runs sharing a GPU (jobs_per_device > 1) train under a private CUDA MPS daemon, so their "
                "kernels overlap instead of taking turns (attnbench/cuda_mps.py; CLI --cuda_mps / --no-cuda_mps wins)",
    "overrides": "table of RunConfig keys for every run",
    "mixer_overrides": "table of tables: RunConfig keys per mixer",
    "bench": "table: enabled, benches, options",
}
BENCH_KEYS = ("enabled", "benches", "options")
# Keys set by the sweep axes; setting them in [overrides] would silently lose to the axes.
_AXIS_KEYS = {"model.mixer": "mixers", "optim.learning_rate": "learning_rates", "train.seed": "seeds",
              "train.out_dir": "--out", "data.dataset": "dataset"}
# Settings that do not change what a run computes: left out of the run id so that changing them
# (another data folder, progress bars, logging) keeps the runs. Each is one the trainer lets a run
# resume with (trainer._RESUMABLE), plus out_dir (the folder itself).
ID_EXCLUDE = {"train.out_dir", "train.progress", "train.resume", "train.keep_checkpoints", "train.eval_batch_size",
              "train.log_interval", "train.compile", "train.compile_scope", "train.compile_mode", "train.cuda_graph", "data.data_dir", "log.wandb_log", "log.wandb_project",
              "log.wandb_run_name"}


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- the file


@dataclass
class BenchSpec:
    enabled: bool = True
    benches: list[str] = field(default_factory=lambda: list(BENCHES))
    options: dict[str, Any] = field(default_factory=dict)


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
    jobs_per_device: int = 1
    devices: str = "auto"
    nproc_per_node: int = 1
    cuda_mps: bool = False
    text: str = ""  # the file as written, kept in the manifest


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
    from .config import all_keys

    if key.split(".")[0] in SECTIONS:
        return key
    owners = [k for k in all_keys() if k.split(".", 1)[1] == key]
    return owners[0] if len(owners) == 1 else key


def find_config_file(name: str | Path, near: Path | None = None) -> Path | None:
    """A config path as written in a sweep file: absolute, or relative to the sweep file's folder,
    the current folder or the repository root (so "configs/x.toml" works from anywhere)."""
    p = Path(name)
    if p.is_absolute():
        return p if p.is_file() else None
    for root in ([near] if near else []) + [Path.cwd(), PACKAGE_ROOT]:
        if (root / p).is_file():
            return (root / p).resolve()
    return None


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
    """Parse and validate a sweep file: keys, mixers, base config. ConfigError names what is wrong."""
    from . import mixers as mixer_registry

    path = Path(path)
    if not path.is_file():
        found = find_config_file(path)
        if found is None:
            raise ConfigError(f"sweep file {str(path)!r} not found (presets: configs/sweeps/seed.toml, "
                              "configs/sweeps/quick.toml)")
        path = found
    text = path.read_text()
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for k in tree:
        if k not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown sweep key {k!r}{did_you_mean(k, list(SWEEP_KEYS), list_all=True)}")
    if "base_config" not in tree:
        raise ConfigError(f"{path}: base_config is missing: name the run TOML every run starts from, "
                          "e.g. base_config = \"configs/shakespeare_char.toml\"")
    base = find_config_file(tree["base_config"], path.parent)
    if base is None:
        raise ConfigError(f"{path}: base_config {tree['base_config']!r} not found (looked next to the sweep file, "
                          f"in {Path.cwd()} and in {PACKAGE_ROOT})")
    mixers = _list_of(tree, "mixers", str, path)
    if not mixers:
        raise ConfigError(f"{path}: mixers is missing: list the mixers to compare, e.g. mixers = [\"softmax\"] "
                          f"(available: {', '.join(mixer_registry.available())})")
    for m in mixers:
        mixer_registry.get(m)  # ConfigError with the nearest registered name
    sw = Sweep(name=str(tree.get("name", path.stem)), path=path, base_config=base, mixers=mixers, text=text,
               learning_rates=_list_of(tree, "learning_rates", float, path), seeds=_list_of(tree, "seeds", int, path))
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
    return sw


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


# ---------------------------------------------------------------------------------------- the plan


@dataclass
class PlannedRun:
    run_id: str
    mixer: str
    learning_rate: float
    seed: int
    config: dict[str, Any]  # the resolved RunConfig as a dict (out_dir set by the sweep)
    match: dict[str, Any] | None = None  # parameter match: n_params, budget, deviation


def run_id_for(config: RunConfig | dict[str, Any]) -> str:
    """`<mixer>-lr<lr>-s<seed>-<8 hex>`: the hash covers every setting that changes what is computed."""
    d = config.to_dict() if isinstance(config, RunConfig) else config
    kept = {sec: {k: v for k, v in vals.items() if f"{sec}.{k}" not in ID_EXCLUDE} for sec, vals in d.items()}
    h = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{d['model']['mixer']}-lr{d['optim']['learning_rate']:g}-s{d['train']['seed']}-{h}"


def _vocab_size(data_dir: str, dataset: str) -> int | None:
    from .data import Corpus

    return Corpus.load(data_dir, dataset).vocab_size


def plan(sweep: Sweep, out: str | Path, data_dir: str | None = None, load_data: bool = True) -> list[PlannedRun]:
    """Resolve and validate every run's config (before anything runs)."""
    out = Path(out)
    runs: list[PlannedRun] = []
    vocab: dict[tuple[str, str], int | None] = {}
    base_tree = tomllib.loads(sweep.base_config.read_text())
    for mixer in sweep.mixers:
        tree = json.loads(json.dumps(base_tree))
        model = tree.setdefault("model", {})
        if model.get("mixer", "softmax") != mixer:
            model.pop("mixer_args", None)  # the base mixer's own settings do not apply to another mixer
        # the mixer's own config next to the base (configs/<mixer>.toml): its model section
        mixer_cfg = find_config_file(f"{mixer}.toml", sweep.base_config.parent)
        if mixer_cfg is not None and mixer_cfg != sweep.base_config:
            mt = tomllib.loads(mixer_cfg.read_text()).get("model", {})
            if mt.get("mixer", mixer) == mixer:
                model.update(mt)
        model["mixer"] = mixer
        if sweep.param_budget is not None:  # the matcher searches these; the sweep's overrides may still fix them
            for k in _searched_args():
                model.get("mixer_args", {}).pop(k, None)
        ov = list(sweep.overrides) + list(sweep.mixer_overrides.get(mixer, []))
        if sweep.dataset:
            ov.append(("data.dataset", sweep.dataset))
        if data_dir is not None:
            ov.append(("data.data_dir", str(data_dir)))
        src = f"{sweep.path} (mixer {mixer})"
        try:
            mcfg = load_config(tree, dict(ov))
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
        key = (mcfg.data.data_dir, mcfg.data.dataset)
        if load_data and key not in vocab:
            vocab[key] = _vocab_size(*key)
        if vocab.get(key):
            mcfg.model.vocab_size = vocab[key]
        match = None
        if sweep.param_budget is not None:
            mcfg.model, match = _match_shape(sweep, mcfg, mixer)
        for lr in sweep.learning_rates or [mcfg.optim.learning_rate]:
            for seed in sweep.seeds or [mcfg.train.seed]:
                cfg = load_config(mcfg)
                cfg.optim.learning_rate = float(lr)
                if sweep.min_lr_ratio is not None:
                    cfg.optim.min_lr = float(lr) * sweep.min_lr_ratio
                cfg.train.seed = int(seed)
                cfg.train.progress = False
                cfg.train.resume = False
                try:
                    cfg = load_config(cfg)  # validate the combination (e.g. min_lr <= learning_rate)
                except ConfigError as e:
                    raise ConfigError(f"{src}, learning rate {lr:g}, seed {seed}: {e}") from None
                rid = run_id_for(cfg)
                cfg.train.out_dir = str(out / "runs" / rid)
                runs.append(PlannedRun(rid, mixer, float(lr), int(seed), cfg.to_dict(), match))
    return runs


def _searched_args() -> tuple[str, ...]:
    try:
        from .params import SEARCHED_ARGS
    except ImportError:
        return ()
    return tuple(SEARCHED_ARGS)


def _match_shape(sweep: Sweep, cfg: RunConfig, mixer: str) -> tuple[Any, dict[str, Any]]:
    """The mixer's shape at the sweep's parameter budget (attnbench.params), and the match record."""
    try:
        from . import params
    except ImportError:
        raise AttnbenchError(f"{sweep.path}: param_budget needs attnbench.params (parameter matching), which is not "
                             "installed in this version; remove param_budget to use the configs' shapes") from None
    m = params.match_all(params.parse_budget(sweep.param_budget), mixers=[mixer], n_layer=cfg.model.n_layer,
                         base=cfg.model)[0]
    row = {k: v for k, v in m.to_row().items() if isinstance(v, (int, float, str, bool, dict, type(None)))}
    model = load_config({**cfg.to_dict(), "model": dataclasses.asdict(m.model_cfg)}).model
    return model, {**row, "n_params": int(m.n_params)}


# ---------------------------------------------------------------------------------------- run state


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary when it is complete and readable, else None."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and isinstance(s.get("final_val_loss"), (int, float)) else None


def run_state(run_dir: Path) -> tuple[str, int | None]:
    """('done' | 'resume' | 'new' | 'stale', checkpoint step). 'stale': files of an attempt that died
    before its first checkpoint (nothing to resume from)."""
    from .checkpoint import latest_checkpoint

    if read_summary(run_dir) is not None:
        return "done", None
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        try:
            step = int(json.loads((run_dir / "ckpt" / "latest.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            step = int(ck.name.split("_")[1].split("-")[0]) if ck.name.startswith("step_") else None
        return "resume", step
    if any((run_dir / f).exists() for f in ("metrics.jsonl", "config.json", "summary.json", "ckpt")):
        return "stale", None
    return "new", None


def _clear_stale(run_dir: Path) -> None:
    for name in ("metrics.jsonl", "config.json", "summary.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)


# ---------------------------------------------------------------------------------------- devices


@dataclass
class Slot:
    """Where one run executes: a device (group) and the env that pins the child to it."""

    device: str  # "cpu" or "cuda:0" / "cuda:0,1"
    env: dict[str, str]
    nproc: int
    shared_by: int  # runs sharing this device at a time (jobs_per_device)
    busy: bool = False


def resolve_devices(devices: str) -> list[str]:
    """'auto' -> every visible GPU, else ['cpu']; 'cpu'; '0,1' -> ['0', '1']."""
    devices = str(devices).strip()
    if devices in ("", "auto"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [str(i) for i in range(n)] or ["cpu"]
    if devices == "cpu":
        return ["cpu"]
    ids = [d.strip().removeprefix("cuda:") for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise AttnbenchError(f"--devices {devices!r}: write 'auto', 'cpu' or GPU indices such as 0,1")
    if len(set(ids)) != len(ids):
        raise AttnbenchError(f"--devices {devices!r} lists a GPU twice")
    return ids


def make_slots(devices: list[str], jobs_per_device: int, nproc: int) -> list[Slot]:
    if jobs_per_device < 1 or nproc < 1:
        raise AttnbenchError("--jobs_per_device and --nproc_per_node must be >= 1")
    cores = os.cpu_count() or 1
    if devices == ["cpu"]:
        groups = [("cpu", "")]
    else:
        if len(devices) < nproc:
            raise AttnbenchError(f"--nproc_per_node {nproc} needs at least {nproc} GPUs; --devices gives {len(devices)}")
        n = len(devices) // nproc * nproc
        groups = [("cuda:" + ",".join(devices[i:i + nproc]), ",".join(devices[i:i + nproc])) for i in range(0, n, nproc)]
    total = len(groups) * jobs_per_device * nproc
    threads = str(max(1, cores // total))
    slots = []
    for _ in range(jobs_per_device):  # interleave so that runs spread over the devices first
        for dev, visible in groups:
            env = {"CUDA_VISIBLE_DEVICES": visible}
            if total > 1:  # share the CPU cores instead of oversubscribing them
                env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
                # torch.compile's workers too: five runs compiling at once on an H200 host otherwise start
                # 5 x (cores) compile workers, and everything else on the host (GPU tests) starves
                if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
                    env["TORCHINDUCTOR_COMPILE_THREADS"] = threads
            slots.append(Slot(dev, env, nproc, jobs_per_device))
    return slots


# ---------------------------------------------------------------------------------------- children


def child_command(run_dir: Path, nproc: int = 1) -> list[str]:
    """The command that trains one planned run (under torchrun when nproc > 1)."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "attnbench.sweep", str(run_dir)]
    return [sys.executable, "-m", "attnbench.sweep", str(run_dir)]


def _die_with_parent() -> None:
    """In a child: SIGINT handled (a shell may have started the sweep with it ignored, and an ignored
    signal stays ignored across exec), and on Linux SIGKILL when the parent dies, so a killed sweep
    leaves no orphan training runs."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n=== {_now()} {' '.join(cmd)}\n")
        log.flush()
        # own session: Ctrl-C in a terminal reaches the sweep only; the sweep forwards it (see _stop)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def _run_main(run_dir: str) -> int:
    """Child entry point: train the run described by RUN_DIR/run.json (resuming from its checkpoint)."""
    import attnbench
    from .checkpoint import latest_checkpoint

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C forwarded by the sweep: stop cleanly
    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        print(f"attnbench: error: {run_dir / RUN_FILE} is missing or unreadable ({e})", file=sys.stderr)
        return 2
    cfg = spec["config"]
    cfg["train"]["out_dir"] = str(run_dir)
    resume = latest_checkpoint(run_dir) is not None
    cfg["train"]["resume"] = resume
    try:
        attnbench.train(cfg)
    except AttnbenchError as e:
        print(f"attnbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------------------------- the sweep


class _Manifest:
    """<out>/sweep.json: the plan and every run's status, rewritten atomically on each change."""

    def __init__(self, out: Path, sweep: Sweep, runs: list[PlannedRun]):
        self.path = out / MANIFEST
        old = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(self.path.read_text())
        prev = old.get("runs", {}) if isinstance(old, dict) else {}
        self.data = {
            "name": sweep.name, "sweep_file": str(sweep.path), "sweep_text": sweep.text,
            "created": old.get("created", _now()) if isinstance(old, dict) else _now(), "updated": _now(),
            "mixers": sweep.mixers, "param_budget": sweep.param_budget,
            # what an earlier sweep recorded about a run (status, attempts, last pid) is kept
            "runs": {r.run_id: {"status": "pending", "attempts": 0, **prev.get(r.run_id, {}), "mixer": r.mixer,
                                "learning_rate": r.learning_rate, "seed": r.seed, "dir": f"runs/{r.run_id}",
                                "match": r.match} for r in runs},
            "bench": old.get("bench", {}) if isinstance(old, dict) else {},
        }

    def set(self, run_id: str, **kw: Any) -> None:
        self.data["runs"][run_id].update(kw)
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.path, self.data)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """One sweep per folder at a time (released by the OS when the process dies, even by SIGKILL)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise AttnbenchError(f"another sweep is running in {out} (lock {out / LOCK}); wait for it or stop it") from None
    try:
        yield
    finally:
        f.close()


def _tail_metrics(path: Path) -> dict[str, Any]:
    """Latest training row of a metrics file, reading only its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if "loss" in row:
                return row
    return {}


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


@dataclass
class _Running:
    run: PlannedRun
    slot: Slot
    proc: subprocess.Popen
    started: float


def _say(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_sweep(sweep: Sweep | str | Path, out: str | Path | None = None, devices: str | None = None,
              jobs_per_device: int | None = None, nproc_per_node: int | None = None, data_dir: str | None = None,
              bench: bool = True, report: bool = True, dry_run: bool = False, status_interval: float = 30.0,
              overrides: list[str] | None = None, cuda_mps: bool | None = None) -> dict:
    """Plan, train (resumably), benchmark and report. Returns the manifest (sweep.json's content).

    Raises KeyboardInterrupt after a clean stop on Ctrl-C/SIGTERM, AttnbenchError on bad input. Runs
    that fail are recorded as failed (their log's tail is printed); the other runs go on.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if overrides:
        add_overrides(sweep, overrides)
    out = Path(out or Path("out") / sweep.name)
    jobs = jobs_per_device or sweep.jobs_per_device
    nproc = nproc_per_node or sweep.nproc_per_node
    runs = plan(sweep, out, data_dir=data_dir)
    for r in runs:
        ga = r.config["train"]["gradient_accumulation_steps"]
        if nproc > 1 and ga % nproc:
            raise ConfigError(f"--nproc_per_node {nproc}: train.gradient_accumulation_steps={ga} must be a multiple of "
                              f"it (set it in [overrides]; accumulation is split across processes)")
    if bench:
        check_bench_options(sweep.bench, sweep.path)
    slots = make_slots(resolve_devices(devices or sweep.devices), jobs, nproc)
    graphed = any(r.config["train"].get("cuda_graph") for r in runs)
    if graphed and any(not str(sl.device).startswith("cuda") for sl in slots):
        raise ConfigError(f"{sweep.path}: train.cuda_graph = true needs CUDA GPUs, but the sweep would run on "
                          f"{', '.join(sorted({str(sl.device) for sl in slots}))}; pass --set train.cuda_graph=false "
                          f"(or, for `attnbench run`, --preset quick on a CPU)")
    if graphed and nproc > 1:
        raise ConfigError(f"{sweep.path}: train.cuda_graph = true does not run under torchrun (--nproc_per_node "
                          f"{nproc}); pass --set train.cuda_graph=false")
    if cuda_mps is not None:
        sweep.cuda_mps = cuda_mps
    with _folder_lock(out):
        return _execute(sweep, out, runs, slots, bench, report, dry_run, status_interval)


def _write_run_file(run_dir: Path, r: PlannedRun, sweep: Sweep, launches: list[dict] | None = None) -> None:
    old = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((run_dir / RUN_FILE).read_text())
    atomic_write_json(run_dir / RUN_FILE, {
        "run_id": r.run_id, "sweep": sweep.name, "mixer": r.mixer, "learning_rate": r.learning_rate, "seed": r.seed,
        "match": r.match, "config": r.config,
        "launches": launches if launches is not None else old.get("launches", []),
    })


def _execute(sweep: Sweep, out: Path, runs: list[PlannedRun], slots: list[Slot], bench: bool, report: bool,
             dry_run: bool, status_interval: float) -> dict:
    man = _Manifest(out, sweep, runs)
    atomic_write_text(out / "sweep.toml", sweep.text)  # the sweep file as run, next to its results
    todo: list[PlannedRun] = []
    states = {}
    for r in runs:
        rd = out / "runs" / r.run_id
        state, step = run_state(rd)
        states[r.run_id] = (state, step)
        if state == "done":
            man.data["runs"][r.run_id]["status"] = "done"
            continue
        if state == "stale" and not dry_run:
            _clear_stale(rd)
        rd.mkdir(parents=True, exist_ok=True)
        _write_run_file(rd, r, sweep)
        man.data["runs"][r.run_id]["status"] = "partial" if state == "resume" else "pending"
        todo.append(r)
    man.save()
    n_done = len(runs) - len(todo)
    _say(f"{sweep.name}: {len(runs)} runs ({len(sweep.mixers)} mixers x {len(runs) // len(sweep.mixers)}), "
         f"{n_done} done, {sum(states[r.run_id][0] == 'resume' for r in todo)} to resume, "
         f"{sum(states[r.run_id][0] != 'resume' for r in todo)} to start -> {out}")
    for r in runs:
        st, step = states[r.run_id]
        m = f", {r.match['n_params'] / 1e6:.2f}M params ({100 * r.match['deviation']:+.1f}%)" if r.match else ""
        what = {"done": "done", "resume": f"resume from step {step}", "new": "new", "stale": "restart (no checkpoint)"}[st]
        _say(f"  {r.run_id}: {what}{m}")
    if dry_run:
        for r in todo:
            rd = out / "runs" / r.run_id
            print(" ".join(child_command(rd, slots[0].nproc)))
        return man.data

    benches = _BenchPhase(sweep, out, runs, slots, man) if bench and sweep.bench.enabled else None
    with _interruptible():
        try:
            if benches is not None and todo and _bench_available():
                benches.prestart()  # the first bench child starts up while the runs train (on a GPU)
            with _training_env(sweep, out, slots, man, bool(todo)):
                failed = _train_all(sweep, out, todo, slots, man, status_interval, n_done, len(runs))
            if benches is not None:
                benches.run()
        finally:
            if benches is not None:
                benches.stop()
    if report:
        from .report import build_report

        path = build_report(out)
        man.data["report"] = str(path.relative_to(out)) if path.is_relative_to(out) else str(path)
        man.save()
        _say(f"report: {path}")
    if failed:
        _say(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {out / 'logs'}; "
             "run the sweep again to retry them")
    return man.data


def wants_mps(sweep: Sweep, slots: list[Slot]) -> bool:
    """MPS helps only where several runs share one GPU at a time."""
    return sweep.cuda_mps and any(s.device.startswith("cuda") and s.shared_by > 1 for s in slots)


@contextlib.contextmanager
def _training_env(sweep: Sweep, out: Path, slots: list[Slot], man: _Manifest, training: bool) -> Iterator[None]:
    """The training phase's extra environment: a private CUDA MPS daemon when the sweep asks for one
    and runs share a GPU (stopped again before the benchmarks, which run alone and outside MPS)."""
    if not (training and wants_mps(sweep, slots)):
        yield
        return
    from .cuda_mps import ENV_KEYS, mps_daemon

    # the probe opens a context where the first run will (a sweep's slots are all GPUs or all the CPU)
    with mps_daemon(out / "logs", _say, probe_env={"CUDA_VISIBLE_DEVICES": slots[0].env["CUDA_VISIBLE_DEVICES"]}) as env:
        man.data["cuda_mps"] = bool(env)
        man.save()
        for s in slots:
            s.env.update(env)
        try:
            yield
        finally:
            for s in slots:
                for k in ENV_KEYS:
                    s.env.pop(k, None)


def _train_all(sweep: Sweep, out: Path, todo: list[PlannedRun], slots: list[Slot], man: _Manifest,
               status_interval: float, n_done: int, n_total: int) -> list[str]:
    queue = list(todo)
    running: list[_Running] = []
    failed: list[str] = []
    last_status = time.monotonic()
    try:
        while queue or running:
            for slot in slots:
                if queue and not slot.busy:
                    r = queue.pop(0)
                    running.append(_launch(sweep, out, r, slot, man))
            time.sleep(0.1)
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                job.slot.busy = False
                rd = out / "runs" / job.run.run_id
                s = read_summary(rd)
                if rc == 0 and s is not None:
                    n_done += 1
                    man.set(job.run.run_id, status="done", returncode=0)
                    _say(f"[{n_done}/{n_total}] done {job.run.run_id}: best val loss "
                         f"{s.get('best_val_loss', float('nan')):.4f}, final {s['final_val_loss']:.4f} "
                         f"in {time.monotonic() - job.started:.0f} s")
                else:
                    failed.append(job.run.run_id)
                    man.set(job.run.run_id, status="failed", returncode=rc)
                    _say(f"FAILED {job.run.run_id} (exit code {rc}); last lines of {out / 'logs' / (job.run.run_id + '.log')}:\n"
                         f"{_log_tail(out / 'logs' / (job.run.run_id + '.log'))}")
            if running and time.monotonic() - last_status >= status_interval:
                last_status = time.monotonic()
                parts = []
                for job in running:
                    row = _tail_metrics(out / "runs" / job.run.run_id / "metrics.jsonl")
                    mi = job.run.config["train"]["max_iters"]
                    parts.append(f"{job.run.run_id} step {row.get('step', 0)}/{mi}"
                                 + (f" loss {row['loss']:.3f}" if "loss" in row else ""))
                _say(f"{n_done}/{n_total} done; running: " + " | ".join(parts))
    except KeyboardInterrupt:
        _stop(running, man)
        _say(f"interrupted; checkpoints are kept. Continue with the same command (attnbench sweep {sweep.path} --out {out})")
        raise
    return failed


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, and Ctrl-C works even when a shell started us with SIGINT ignored."""
    prev = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread: leave the handlers alone
        prev = {}
    try:
        yield
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


def _still_training(pid: Any, run_dir: Path) -> bool:
    """Is an earlier child (e.g. of a sweep killed a moment ago) still training this run?"""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, TypeError, IndexError):
        return False
    return state != "Z" and str(run_dir) in cmdline


def _launch(sweep: Sweep, out: Path, r: PlannedRun, slot: Slot, man: _Manifest) -> _Running:
    rd = out / "runs" / r.run_id
    old_pid = man.data["runs"][r.run_id].get("pid")
    deadline = time.monotonic() + 30
    while old_pid and _still_training(old_pid, rd):  # it dies with its parent (PDEATHSIG): wait for that
        if time.monotonic() > deadline:
            raise AttnbenchError(f"run {r.run_id} is still being trained by process {old_pid} (from an earlier sweep); "
                                 f"stop it first (kill {old_pid})")
        time.sleep(0.2)
    state, step = run_state(rd)
    if state == "stale":
        _clear_stale(rd)
    cmd = child_command(rd, slot.nproc)
    old = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((rd / RUN_FILE).read_text())
    launches = old.get("launches", []) + [{
        "started": _now(), "device": slot.device, "nproc_per_node": slot.nproc, "jobs_per_device": slot.shared_by,
        "cuda_mps": "CUDA_MPS_PIPE_DIRECTORY" in slot.env, "resumed_from_step": step, "command": cmd}]
    _write_run_file(rd, r, sweep, launches)
    proc = _spawn(cmd, _child_env(slot.env), out / "logs" / f"{r.run_id}.log")
    slot.busy = True
    attempts = man.data["runs"][r.run_id].get("attempts", 0) + 1
    man.set(r.run_id, status="running", attempts=attempts, device=slot.device, jobs_per_device=slot.shared_by,
            pid=proc.pid)
    _say(f"start {r.run_id} on {slot.device}" + (f" (resume from step {step})" if step is not None else ""))
    return _Running(r, slot, proc, time.monotonic())


def _stop(running: list[_Running], man: _Manifest, grace_s: float = 60.0) -> None:
    """Forward the interrupt: SIGINT to each child's process group, then wait; SIGKILL stragglers."""
    for job in running:
        _signal_group(job.proc, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while True:  # Ctrl-C again while waiting just goes on waiting (the children are stopping)
        try:
            for job in running:
                job.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            break
        except subprocess.TimeoutExpired:
            for job in running:
                _signal_group(job.proc, signal.SIGKILL)
                job.proc.wait()
            break
        except KeyboardInterrupt:
            continue
    for job in running:
        job.slot.busy = False
        st = "done" if read_summary(Path(job.run.config["train"]["out_dir"])) else "interrupted"
        man.set(job.run.run_id, status=st, returncode=job.proc.returncode)


# ---------------------------------------------------------------------------------------- benchmarks

# Options the sweep sets itself on the bench command line.
_BENCH_RESERVED = {"mixers", "device", "json", "budget", "no_match", "wait_for", "h", "help"}


def bench_option_names() -> dict[str, set[str]]:
    """{subcommand: its option names} of `attnbench bench`, read from its own parser."""
    from .bench import cli as bench_cli

    root = argparse.ArgumentParser()
    bench_cli.register_cli(root.add_subparsers())
    bench = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o.lstrip("-") for a in q._actions for o in a.option_strings} for name, q in sub.choices.items()}


def bench_tasks(spec: BenchSpec) -> list[str]:
    """`all` when every benchmark is wanted (one process per mixer), else each one listed."""
    return ["all"] if set(spec.benches) == set(BENCHES) else list(spec.benches)


def check_bench_options(spec: BenchSpec, path: Path | str) -> None:
    """Unknown or reserved bench options are errors before anything runs."""
    if not spec.enabled or not _bench_available():
        return
    names = bench_option_names()
    known = set().union(*(names[t] for t in bench_tasks(spec)))
    for k in spec.options:
        if k in _BENCH_RESERVED:
            raise ConfigError(f"{path}: bench.options.{k} is set by the sweep (the trained shapes, the device, the "
                              "output file); remove it")
        if k not in known:
            raise ConfigError(f"{path}: unknown option bench.options.{k} for `attnbench bench "
                              f"{'/'.join(bench_tasks(spec))}`{did_you_mean(k, sorted(known - _BENCH_RESERVED), list_all=True)}")


def _shape_sets(model: dict[str, Any]) -> list[str]:
    """`--set` arguments that make the bench build exactly the trained model shape."""
    out = []
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pos_emb", "backend"):
        out += ["--set", f"{k}={model[k]}"]
    for k, v in sorted((model.get("mixer_args") or {}).items()):
        if v is not None:
            out += ["--set", f"{model['mixer']}.{k}={v}"]
    return out


def bench_command(model: dict[str, Any], task: str, device: str, json_path: Path, spec: BenchSpec) -> list[str]:
    """`python -m attnbench bench TASK --mixers M --no_match --set <trained shape> --device D --json FILE [options]`."""
    names = bench_option_names()[task] if spec.options else set()
    cmd = [sys.executable, "-m", "attnbench", "bench", task, "--mixers", model["mixer"], "--device", device,
           "--json", str(json_path), "--no_match", *_shape_sets(model)]
    for k, v in spec.options.items():
        if k not in names:  # an option of another benchmark (bench.benches lists several)
            continue
        if isinstance(v, bool):
            cmd += [f"--{k}"] if v else []
        elif k == "set":
            for item in v if isinstance(v, list) else [v]:
                cmd += ["--set", str(item)]
        else:
            cmd += [f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return cmd


def _bench_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("attnbench.bench") is not None


def prestarts_bench(device: str) -> bool:
    """Start a benchmark process before its turn (it imports, then waits)? On a GPU, yes: that start-up is
    CPU work, and the GPU stays the measuring process's alone. On the CPU, no: the imports would take cores
    from the measurement. ATTNBENCH_BENCH_PRESTART=0/1 decides instead."""
    env = os.environ.get("ATTNBENCH_BENCH_PRESTART")
    if env is not None:
        return env.lower() not in ("0", "off", "false", "no")
    return device != "cpu"


@dataclass
class _BenchJob:
    label: str
    final: Path  # bench/<mixer>.jsonl, written (renamed from tmp) only when the child succeeds
    tmp: Path
    proc: subprocess.Popen
    device: str
    go: Path | None  # the file a prestarted child waits for (None: started at once)
    started: float = 0.0


class _BenchPhase:
    """One bench child per (mixer, benchmark) with the mixer's trained shape, alone on its device; a
    result file is written only when the child succeeds, and a present one is not redone.

    On a GPU a child is started before its turn and waits for a go file (`bench --wait_for`): the first
    one while the runs train, each next one while the previous one measures. Its start-up (imports:
    10-16 s per process on the H200 host) is then off the critical path, and it never shares the GPU
    with a measurement."""

    def __init__(self, sweep: Sweep, out: Path, runs: list[PlannedRun], slots: list[Slot], man: _Manifest):
        self.sweep, self.out, self.slots, self.man = sweep, out, slots, man
        self.devices = sorted({s.device.split(",")[0] for s in slots})
        self.queue: list[tuple[str, dict, str, Path]] = []
        for mixer in sweep.mixers:
            model = next(r.config["model"] for r in runs if r.mixer == mixer)
            for task in bench_tasks(sweep.bench):
                final = out / "bench" / (f"{mixer}.jsonl" if task == "all" else f"{mixer}-{task}.jsonl")
                if not final.is_file():
                    self.queue.append((f"{mixer}" + ("" if task == "all" else f" {task}"), model, task, final))
        self.running: list[_BenchJob] = []
        self.waiting: dict[str, _BenchJob] = {}  # device -> the prestarted child waiting for it

    def _spawn(self, item: tuple, dev: str, wait: bool) -> _BenchJob:
        label, model, task, final = item
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp, go = final.with_name(f".{final.name}.tmp"), (final.with_name(f".{final.stem}.go") if wait else None)
        for f in (tmp, go) if go is not None else (tmp,):  # leftovers of an interrupted sweep
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        env = {"CUDA_VISIBLE_DEVICES": "" if dev == "cpu" else dev.removeprefix("cuda:")}
        if dev == "cpu":  # CPU timings with the training runs' thread count (see the module doc)
            env.update({k: v for k, v in self.slots[0].env.items() if k.endswith("_NUM_THREADS")})
        cmd = bench_command(model, task, "cpu" if dev == "cpu" else "cuda", tmp, self.sweep.bench)
        if go is not None:
            cmd += ["--wait_for", str(go)]
        log = self.out / "logs" / f"bench-{final.stem}.log"
        return _BenchJob(label, final, tmp, _spawn(cmd, _child_env(env), log), dev, go)

    def prestart(self, devices: list[str] | None = None) -> None:
        """Start the next child, waiting, on each of these devices (default: each one) that has none."""
        for dev in devices if devices is not None else self.devices:
            if self.queue and dev not in self.waiting and prestarts_bench(dev):
                self.waiting[dev] = self._spawn(self.queue.pop(0), dev, wait=True)

    def run(self) -> None:
        if not _bench_available():
            _say("benchmarks skipped: attnbench.bench is not available in this version")
            self.man.data["bench"] = {"status": "unavailable"}
            self.man.save()
            return
        if not self.queue and not self.waiting:
            _say("benchmarks: done before, skipped")
            return
        labels = [j.label for j in self.waiting.values()] + [q[0] for q in self.queue]
        _say(f"benchmarks: {', '.join(labels)} on {', '.join(self.devices)}")
        status = self.man.data.setdefault("bench", {})
        free = list(self.devices)
        while self.queue or self.running or self.waiting:
            for dev in list(free):
                if dev in self.waiting:
                    job, how = self.waiting.pop(dev), " (started up before its turn)"
                    job.go.touch()
                elif self.queue:
                    job, how = self._spawn(self.queue.pop(0), dev, wait=False), ""
                else:
                    continue
                job.started = time.monotonic()
                _say(f"bench {job.label} on {dev}{how}")
                free.remove(dev)
                self.running.append(job)
            self.prestart([job.device for job in self.running])
            time.sleep(0.2)
            for job in list(self.running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                self.running.remove(job)
                free.append(job.device)
                if job.go is not None:
                    with contextlib.suppress(FileNotFoundError):
                        job.go.unlink()
                if rc == 0 and job.tmp.is_file():
                    os.replace(job.tmp, job.final)
                    status[job.final.stem] = "done"
                    _say(f"bench {job.label}: {len(read_jsonl(job.final))} rows in "
                         f"{time.monotonic() - job.started:.0f} s -> {job.final}")
                else:
                    status[job.final.stem] = f"failed (exit code {rc})"
                    log = self.out / "logs" / f"bench-{job.final.stem}.log"
                    _say(f"bench {job.label} FAILED (exit code {rc}); last lines of {log}:\n{_log_tail(log)}")
                self.man.save()

    def stop(self) -> None:
        """Stop every child still running or waiting (Ctrl-C, or training interrupted); remove go files."""
        children = self.running + list(self.waiting.values())
        for job in children:
            _signal_group(job.proc, signal.SIGINT)
        for job in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.proc.wait(timeout=30)
            _signal_group(job.proc, signal.SIGKILL)
            job.proc.wait()
            if job.go is not None:
                with contextlib.suppress(FileNotFoundError):
                    job.go.unlink()
        self.running, self.waiting = [], {}


# ---------------------------------------------------------------------------------------- CLI


def add_launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default=None, help="'auto' (every visible GPU, else the CPU), 'cpu', or GPU indices "
                                                    "such as 0,1: one run per GPU at a time (default: the sweep file's, else auto)")
    p.add_argument("--jobs_per_device", type=int, default=None,
                   help="runs sharing one device at a time (small models; speed numbers then come from the benchmarks)")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="run each training under torchrun with this many processes (GPUs) per run")
    p.add_argument("--data_dir", default=None, help="folder of prepared datasets (default: the configs' data.data_dir)")
    p.add_argument("--cuda_mps", action=argparse.BooleanOptionalAction, default=None,
                   help="runs sharing a GPU train under a private CUDA MPS daemon (default: the sweep file's "
                        "cuda_mps, else off)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides_set",
                   help="a RunConfig setting for every run, after the sweep file's [overrides] "
                        "(e.g. --set train.compile=false); repeatable")


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="train every run of a sweep file, then benchmark and report (resumable)",
                              description=__doc__.split("\nShapes:")[0] + "\nRe-run the same command to "
                              "continue an interrupted sweep (see attnbench/sweep.py for the rest).",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="sweep TOML, e.g. configs/sweeps/quick.toml")
    p.add_argument("--out", default=None, help="results folder (default: out/<sweep name>)")
    add_launch_options(p)
    p.add_argument("--no_bench", action="store_true", help="skip the benchmarks")
    p.add_argument("--no_report", action="store_true", help="skip the report")
    p.add_argument("--dry_run", action="store_true", help="resolve and write the plan, print the commands, train nothing")
    p.add_argument("--status_interval", type=float, default=30.0, help="seconds between progress lines")

    def run(a: argparse.Namespace) -> int:
        man = run_sweep(a.config, out=a.out, devices=a.devices, jobs_per_device=a.jobs_per_device,
                        nproc_per_node=a.nproc_per_node, data_dir=a.data_dir, bench=not a.no_bench,
                        report=not a.no_report, dry_run=a.dry_run, status_interval=a.status_interval,
                        overrides=a.overrides_set, cuda_mps=a.cuda_mps)
        bad = [k for k, v in man["runs"].items() if v["status"] == "failed"]
        return 1 if bad else 0

    p.set_defaults(func=run)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m attnbench.sweep",
                                description="train one planned sweep run (the sweep's child process)")
    p.add_argument("run_dir", help="run folder holding run.json")  # positional: torchrun would eat an option
    return _run_main(p.parse_args(argv).run_dir)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
