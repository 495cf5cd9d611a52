"""Typed run configuration: TOML files + nanoGPT-style `--key=value` overrides, validated up front.

A RunConfig has sections (data, model, optim, train, log, task). A key may be written bare when its name
is unique across sections (`--max_iters=2`) or dotted (`--model.n_layer=4`); a mixer's own settings
live under `model.mixer_args` (`--model.mixer_args.chunk_size=32`). Every problem is a ConfigError
naming the key and the nearest valid one, raised before any file is written. A config file is a path
or the name of one bundled in attnbench/configs/ (`find_config_file`).

Over 400 lines because every section's dataclass, its coercion and its cross-field checks sit together:
the key table users read (`all_keys`, README) and the checks that name those keys are one place.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from .counts import parse_count
from .errors import ConfigError, did_you_mean
from .files import atomic_write_text

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the bundled run configs; sweeps/ holds the presets
POS_EMBS = ("learned", "rope", "none")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_SCOPES = ("blocks", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TASK_KINDS = ("lm", "mqar")


@dataclass
class DataConfig:
    dataset: str = "shakespeare_char"  # folder name under data_dir (see `attnbench prepare`)
    data_dir: str = "data"


@dataclass
class ModelConfig:
    """The GPT's shape and its mixer. Also exported as `attnbench.GPTConfig`."""

    # a registered mixer, or a layer pattern (a hybrid) such as "gated_deltanet*3+softmax" (attnbench.mixers)
    mixer: str = "softmax"
    n_layer: int = 6
    n_head: int = 6
    n_embd: Union[int, str] = 384  # a width, or "match": searched for param_budget (attnbench/params.py)
    block_size: int = 256
    vocab_size: int = 65  # set from the dataset's metadata when training
    dropout: float = 0.0
    bias: bool = False
    pos_emb: str = "learned"  # learned | rope | none
    mlp: bool = True  # false: a block without its MLP (mixer only), as in Zoology's recall models
    # validated by the mixer's own Args dataclass; a hybrid holds one sub-table per mixer of its pattern
    mixer_args: dict = field(default_factory=dict)
    backend: str = "auto"  # op backend for the mixer: auto | torch | fla
    # parameter budget, e.g. "10.7M": with n_embd = "match" the width, n_head and the mixer's head args
    # are searched so the GPT's parameter count is closest to it (n_layer fixed); otherwise a record
    param_budget: Optional[Union[int, str]] = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


GPTConfig = ModelConfig


@dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # None: max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    batch_size: int = 64  # sequences per micro-batch (per process)
    gradient_accumulation_steps: int = 1  # global: split across processes under torchrun
    max_iters: int = 3000
    eval_interval: int = 250  # also the checkpoint interval
    eval_batch_size: int = 128  # windows per forward pass during evaluation
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False
    # "blocks": compile one transformer block and reuse it for every layer (regional compilation: the
    # layers share one graph, so compiling takes about a fifth of the time); "model": one graph for all
    compile_scope: str = "blocks"
    # torch.compile's mode: "reduce-overhead" adds CUDA graphs (fewer launches for these launch-bound
    # models), "max-autotune" tunes kernels too (slow to compile)
    compile_mode: str = "default"
    # capture the whole step (forward, backward, clipping, AdamW) in one CUDA graph after two eager steps
    # and replay it: one launch per step for these launch-bound models (attnbench/graphed_step.py)
    cuda_graph: bool = False
    progress: bool = True
    keep_checkpoints: int = 2
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    # stop once an evaluation's accuracy is strictly above this (tasks with an accuracy, e.g. MQAR;
    # Zoology stops at 0.99); None: train for max_iters
    early_stop_accuracy: Optional[float] = None


@dataclass
class LogConfig:
    wandb_log: bool = False
    wandb_project: str = "attnbench"
    wandb_run_name: Optional[str] = None


@dataclass
class TaskConfig:
    """What a run learns. "lm": next-token prediction on data.dataset. "mqar": multi-query associative
    recall (attnbench/tasks/mqar.py), prepared once into data.data_dir from these settings; the model's
    block_size and vocab_size follow seq_len and vocab_size. The other keys apply to "mqar" only."""

    kind: str = "lm"  # lm | mqar
    seq_len: int = 64  # L: tokens per example
    num_kv_pairs: int = 4  # K: key-value pairs (and queries) per example
    vocab_size: int = 8192  # keys from the lower half, values from the upper half
    power_a: float = 0.01  # query gaps drawn with weight (g+1)**(power_a-1), as Zoology
    num_train: int = 100_000  # stored training examples, reused each epoch; 0: a new one at every draw (streamed)
    num_test: int = 3_000
    data_seed: int = 0  # the examples' seed (train.seed orders and initialises, this one generates)
    random_non_queries: bool = False  # false: filler tokens are 0 (Zoology's published figure 2)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Parsed, not validated: attnbench.resolve.load_config validates and resolves shapes."""
        cfg = cls()
        _apply_tree(cfg, d, source="config")
        return cfg

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))


SECTIONS = [f.name for f in fields(RunConfig)]


# ---------------------------------------------------------------- value coercion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (its annotations are strings under postponed evaluation)."""
    return typing.get_type_hints(cls)


def coerce_value(val: Any, tp: Any, key: str) -> Any:
    """Coerce a TOML value or a CLI string to the field type `tp` (a resolved type, see field_types);
    ConfigError naming `key` if impossible."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if val is None or (isinstance(val, str) and val.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return coerce_value(val, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {val!r} ({type(val).__name__})")
    if tp is bool:
        if isinstance(val, bool):
            return val
        if isinstance(val, str) and val.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(val, str) and val.lower() in ("false", "0", "no", "off"):
            return False
        raise bad
    if tp is int:
        if isinstance(val, bool):
            raise bad
        if isinstance(val, int):
            return val
        if isinstance(val, float) and val.is_integer():
            return int(val)
        if isinstance(val, str):
            try:
                f = float(val)
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(val, bool):
            raise bad
        if isinstance(val, (int, float)):
            return float(val)
        if isinstance(val, str):
            try:
                return float(val)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(val, str):
            return val
        raise bad
    if tp is dict or origin is dict:
        if isinstance(val, dict):
            return dict(val)
        raise bad
    if tp is list or origin is list:
        if isinstance(val, list):
            return list(val)
        if isinstance(val, str):
            return [s.strip() for s in val.split(",") if s.strip()]
        raise bad
    return val


# ---------------------------------------------------------------- applying files and overrides


def all_keys() -> list[str]:
    """Every settable dotted key, e.g. 'train.max_iters'."""
    out = []
    for name, cls in _section_types().items():
        out.extend(f"{name}.{f.name}" for f in fields(cls))
    return out


def _section_types() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "log": LogConfig,
            "task": TaskConfig}


def _set(cfg: RunConfig, dotted: str, val: Any, source: str) -> None:
    parts = dotted.split(".")
    if parts[0] not in SECTIONS:
        # bare key: find the unique section holding it
        owners = [s for s, t in _section_types().items() if parts[0] in {f.name for f in fields(t)}]
        if len(owners) == 1:
            parts = [owners[0], *parts]
        elif len(owners) > 1:
            raise ConfigError(f"{source}: key {dotted!r} is ambiguous; write one of " + ", ".join(f"{o}.{dotted}" for o in owners))
        else:
            bare = [k.split(".", 1)[1] for k in all_keys()]
            raise ConfigError(f"{source}: unknown key {dotted!r}{did_you_mean(dotted, bare + all_keys())}")
    sec_name, rest = parts[0], parts[1:]
    section = getattr(cfg, sec_name)
    if not rest:
        raise ConfigError(f"{source}: {sec_name!r} is a section; set one of its keys, e.g. {sec_name}.{fields(section)[0].name}")
    names = {f.name: f for f in fields(section)}
    key = rest[0]
    if key not in names:
        raise ConfigError(f"{source}: unknown key {sec_name}.{key}{did_you_mean(key, list(names))}")
    if sec_name == "model" and key == "mixer_args" and len(rest) > 1:
        # mixer_args.<name>: raw value, coerced and checked by the mixer's Args dataclass in validate();
        # mixer_args.<mixer>.<name> (a hybrid's per-mixer sub-table) nests
        set_nested(section.mixer_args, rest[1:], val)
        return
    if len(rest) > 1:
        raise ConfigError(f"{source}: {sec_name}.{key} has no sub-keys")
    setattr(section, key, coerce_value(val, field_types(type(section))[key], f"{sec_name}.{key}"))


def set_nested(d: dict[str, Any], keys: list[str], val: Any) -> None:
    """d[k1][k2]... = val, creating tables on the way; a table value is merged into a table already there
    (so `[model.mixer_args.softmax]` and `--model.mixer_args.softmax.head_dim=64` combine)."""
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    last = keys[-1]
    if isinstance(val, dict):
        if not isinstance(d.get(last), dict):
            d[last] = {}
        for k, v in val.items():
            set_nested(d[last], [k], v)
    else:
        d[last] = val


def _apply_tree(cfg: RunConfig, d: dict[str, Any], source: str, prefix: str = "") -> None:
    for k, v in d.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and dotted in SECTIONS:
            _apply_tree(cfg, v, source, prefix=f"{dotted}.")
        elif isinstance(v, dict) and dotted == "model.mixer_args":
            for mk, mv in v.items():
                _set(cfg, f"model.mixer_args.{mk}", mv, source)
        else:
            _set(cfg, dotted, v, source)


def read_toml(path: Path, what: str) -> tuple[str, dict[str, Any]]:
    """The text and the table of a TOML file a user handed in; ConfigError naming the file when it is not
    UTF-8 text (a binary file given by mistake) or not valid TOML."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ConfigError(f"{what} {path} is a binary file, not TOML text (it holds NUL bytes); pass a .toml file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8: "
                          "pass a .toml file, or convert it (e.g. iconv -f latin1 -t utf-8)") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def parse_overrides(args: list[str] | dict[str, Any] | None) -> list[tuple[str, Any]]:
    """`['--max_iters=2', '--model.n_layer=4']` or `{'max_iters': 2}` -> [(key, value), ...]."""
    if not args:
        return []
    if isinstance(args, dict):
        return list(args.items())
    out = []
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"override {a!r} must look like --key=value (e.g. --max_iters=2 or --model.n_layer=4)")
        k, v = a[2:].split("=", 1)
        out.append((k.replace("-", "_") if k.count("-") and "." not in k else k, v))
    return out


def find_config_file(name: str | Path, near: Path | None = None) -> Path | None:
    """A config file named on a command line or in a sweep file: the path itself when it is a file
    (relative to `near`, then to the current folder), else the bundled file in attnbench/configs/ of that
    name, so "shakespeare_char", "shakespeare_char.toml", "configs/shakespeare_char.toml" and
    "sweeps/bakeoff" work from any folder. None when there is neither."""
    p = Path(name)
    for cand in ([near / p] if near is not None and not p.is_absolute() else []) + [p]:
        if cand.is_file():
            return cand
    if p.is_absolute():
        return None
    parts = p.parts
    if "configs" in parts:  # "configs/x.toml" or "attnbench/configs/x.toml": the part below configs/
        parts = parts[len(parts) - parts[::-1].index("configs"):]
    if not parts:
        return None
    bundled = CONFIGS_DIR.joinpath(*parts)
    if bundled.suffix != ".toml":
        bundled = bundled.with_name(bundled.name + ".toml")
    return bundled if bundled.is_file() else None


def parse_config(path: str | Path | dict | RunConfig | None = None,
                 overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from a TOML file (or dict, or RunConfig) plus overrides: keys and types checked, values
    not yet validated and `n_embd = "match"` not yet resolved (that needs the mixers: attnbench.resolve)."""
    if isinstance(path, RunConfig):
        cfg = RunConfig()
        _apply_tree(cfg, path.to_dict(), source="config")
    else:
        cfg = RunConfig()
        if isinstance(path, dict):
            _apply_tree(cfg, path, source="config")
        elif path is not None:
            p = find_config_file(path)
            if p is None:
                bundled = ", ".join(sorted(f.stem for f in CONFIGS_DIR.glob("*.toml")))
                raise ConfigError(f"config file {str(Path(path))!r} not found; pass a TOML file or a bundled config "
                                  f"({bundled})")
            _, tree = read_toml(p, "config file")
            _apply_tree(cfg, tree, source=str(p))
    for k, v in parse_overrides(overrides):
        _set(cfg, k, v, source=f"override --{k}")
    return cfg


# ---------------------------------------------------------------- validation


def _nearest_divisor(n: int, target: int) -> int:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return min(divs, key=lambda d: (abs(d - target), -d))


def validate(cfg: RunConfig) -> None:
    """Impossible values and combinations, each reported with the key and a valid suggestion. The
    mixer's own arguments are checked by its Args dataclass (attnbench.resolve)."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    check_match_request(m)
    if isinstance(m.n_embd, str):
        raise ConfigError("model.n_embd = 'match' must be resolved before validation (attnbench.resolve.load_config)")
    for key, val in [("model.n_layer", m.n_layer), ("model.n_head", m.n_head), ("model.n_embd", m.n_embd),
                     ("model.block_size", m.block_size), ("model.vocab_size", m.vocab_size),
                     ("train.batch_size", t.batch_size), ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                     ("train.eval_interval", t.eval_interval), ("train.eval_batch_size", t.eval_batch_size),
                     ("train.log_interval", t.log_interval), ("train.keep_checkpoints", t.keep_checkpoints)]:
        if val < 1:
            raise ConfigError(f"{key} must be >= 1, got {val}")
    if t.max_iters < 0:
        raise ConfigError(f"train.max_iters must be >= 0, got {t.max_iters}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"nearest valid n_head is {_nearest_divisor(m.n_embd, m.n_head)} "
                          f"(or n_embd={round(m.n_embd / m.n_head) * m.n_head})")
    for key, val, allowed in [("model.pos_emb", m.pos_emb, POS_EMBS), ("train.device", t.device, DEVICES),
                              ("train.dtype", t.dtype, DTYPES), ("model.backend", m.backend, ("auto", "torch", "fla")),
                              ("train.compile_scope", t.compile_scope, COMPILE_SCOPES),
                              ("train.compile_mode", t.compile_mode, COMPILE_MODES),
                              ("task.kind", cfg.task.kind, TASK_KINDS)]:
        if val not in allowed:
            raise ConfigError(f"{key}={val!r} is not one of {allowed}{did_you_mean(val, list(allowed))}")
    if t.cuda_graph and t.dtype == "float16":
        raise ConfigError("train.cuda_graph=true cannot capture float16's loss scaling (its overflow check reads the GPU "
                          "from the host every step); use train.dtype='bfloat16' (or 'auto') or train.cuda_graph=false")
    if t.cuda_graph and t.compile and t.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(f"train.cuda_graph=true already captures the step; train.compile_mode={t.compile_mode!r} would "
                          "capture CUDA graphs inside it. Use compile_mode='default' or "
                          "'max-autotune-no-cudagraphs' with cuda_graph, or cuda_graph=false")
    if t.early_stop_accuracy is not None and not 0.0 < t.early_stop_accuracy <= 1.0:
        raise ConfigError(f"train.early_stop_accuracy must be in (0, 1] (e.g. 0.99, as Zoology) or none, "
                          f"got {t.early_stop_accuracy}")
    if t.early_stop_accuracy is not None and cfg.task.kind == "lm":
        raise ConfigError("train.early_stop_accuracy needs a task with an accuracy (task.kind = 'mqar'); "
                          "language modelling reports a loss only")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if o.learning_rate <= 0 or o.min_lr < 0 or o.min_lr > o.learning_rate:
        raise ConfigError(f"optim.learning_rate ({o.learning_rate}) must be > 0 and optim.min_lr ({o.min_lr}) in [0, learning_rate]")
    if o.warmup_iters < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_iters, optim.grad_clip and optim.weight_decay must be >= 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ConfigError(f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")


def check_match_request(m: ModelConfig) -> None:
    """A readable param_budget, and `n_embd = "match"` only with one (the search itself is
    attnbench.params.resolve_match)."""
    if m.param_budget is not None:
        parse_count(m.param_budget, what="model.param_budget")
    if not isinstance(m.n_embd, str):
        return
    if m.n_embd != "match":
        raise ConfigError(f"model.n_embd must be a width (an integer) or 'match', got {m.n_embd!r}")
    if m.param_budget is None:
        raise ConfigError("model.n_embd = 'match' needs model.param_budget (e.g. param_budget = \"10.7M\"); "
                          "or set model.n_embd to a width such as 384")
    for key in ("n_layer", "block_size", "vocab_size"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
