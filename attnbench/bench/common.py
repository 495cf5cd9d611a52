"""Pieces the three benchmarks share: model shapes, model building, timing, backend recording, rows.

Shapes are the trained ones: `configs/<mixer>.toml`'s [model] section (softmax: shakespeare_char.toml),
whose widths are parameter-matched (n_embd = "match", resolved by attnbench.params). For another
--budget, `attnbench.params.match_shape` re-matches with the config's mixer args held fixed. Without
a config file: the ModelConfig defaults. `--set key=value` overrides apply on top (tests use them for
tiny shapes).

Position embeddings: benchmark models use pos_emb='none' where the config says 'learned'. The learned
table costs one lookup and add per token (negligible time) but its parameters grow with the context
(1M tokens x 384 = 384M parameters, which would dominate a memory measurement), and its host-side
position index would keep a decode step out of a CUDA graph. Every row says which pos_emb ran.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import ModelConfig, coerce_value, field_types
from ..counts import parse_count
from ..errors import ConfigError, did_you_mean

log = logging.getLogger("attnbench.bench")

DEFAULT_BUDGET = "10.7M"


# ------------------------------------------------------------------ sizes and lists


def parse_int_list(text: str | None) -> list[int] | None:
    """'128,1k,4096' -> [128, 1000, 4096]; None stays None."""
    if text is None:
        return None
    return [parse_count(t) for t in str(text).split(",") if t.strip()]


def doubling(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


# ------------------------------------------------------------------ shapes


@dataclass
class BenchShape:
    """One mixer's model for benchmarking: its config and where the shape came from."""

    mixer: str
    cfg: ModelConfig
    source: str  # e.g. "configs/deltanet.toml (matched to 10.7M)", "ModelConfig defaults"
    n_params_matched: int | None = None  # params.count_params of the trained shape (learned pos table included)


def _configs_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[2] / "configs"
    return [Path.cwd() / "configs", here]


def _config_file_shape(mixer: str) -> tuple[ModelConfig, str]:
    from ..resolve import load_config

    names = [f"{mixer}.toml"] + (["shakespeare_char.toml"] if mixer == "softmax" else [])
    for d in _configs_dirs():
        for name in names:
            p = d / name
            if p.is_file():
                cfg = load_config(p).model
                if cfg.mixer == mixer:
                    return cfg, f"configs/{name}"
    return ModelConfig(mixer=mixer), "ModelConfig defaults"


def _match(mixer: str, budget: int, budget_text: str, cfg: ModelConfig, source: str
           ) -> tuple[ModelConfig, int, str] | None:
    """The trained shape at `budget`: the config file's own when it was matched to that budget, else
    params.match_shape with the config's mixer args held fixed. None when attnbench.params is absent
    or the search fails (logged): the config file's shape is used then."""
    try:
        from .. import params  # the parameter-matching issue's module
    except ModuleNotFoundError as e:
        if e.name not in ("attnbench.params",):
            raise
        return None
    try:
        if cfg.param_budget is not None and parse_count(cfg.param_budget) == budget:
            return cfg, params.count_params(cfg), f"{source} (matched to {cfg.param_budget})"
        m = params.match_shape(mixer, budget, cfg.n_layer, base=cfg)
        return m.model_cfg, int(m.n_params), f"params.match_shape({budget_text}, mixer_args of {source})"
    except Exception as e:  # noqa: BLE001 - one mixer's search must not stop the benchmark
        log.warning("parameter matching failed for %s (%s); using %s", mixer, e, source)
        return None


def parse_sets(items: list[str] | None, mixers: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`--set n_layer=2 --set nsa.block_size=4` -> ({'n_layer': 2}, {'nsa': {'block_size': '4'}}).

    Bare keys are ModelConfig fields (coerced to the field's type); `<mixer>.<key>` goes to that
    mixer's mixer_args (the mixer's Args validates it when the model is built).
    """
    model_fields = field_types(ModelConfig)
    glob: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set n_layer=2 or --set nsa.block_size=16")
        key, val = item.split("=", 1)
        key = key.strip().removeprefix("model.")
        if "." in key:
            mixer, arg = key.split(".", 1)
            arg = arg.removeprefix("mixer_args.")
            if mixer not in mixers:
                raise ConfigError(f"--set {item!r}: {mixer!r} is not one of the benchmarked mixers {mixers}")
            per.setdefault(mixer, {})[arg] = _literal(val)
        elif key in model_fields and key not in ("mixer", "mixer_args"):
            glob[key] = coerce_value(val, model_fields[key], f"--set {key}")
        else:
            hint = did_you_mean(key, model_fields)
            raise ConfigError(f"--set {item!r}: unknown model key {key!r}{hint} (use MIXER.ARG for mixer_args)")
    return glob, per


def _literal(val: str) -> Any:
    """TOML-ish scalar from a CLI string (the mixer's Args coerces it to the field type anyway)."""
    low = val.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(val)
        except ValueError:
            pass
    return val


def resolve_shapes(mixers: list[str] | None = None, budget: str | int = DEFAULT_BUDGET, match: bool = True,
                   sets: list[str] | None = None) -> list[BenchShape]:
    """The models to benchmark, one per mixer (default: every registered mixer)."""
    from .. import mixers as registry

    names = list(mixers) if mixers else registry.available()
    for n in names:
        registry.get(n)  # ConfigError naming the nearest mixer for a typo
    budget_n = parse_count(budget)
    glob, per = parse_sets(sets, names)
    shapes = []
    for n in names:
        cfg, source = _config_file_shape(n)
        n_matched = None
        got = _match(n, budget_n, str(budget), cfg, source) if match else None
        if got is not None:
            cfg, n_matched, source = got
        if glob or n in per:
            args = {**cfg.mixer_args, **per.get(n, {})}
            cfg = dataclasses.replace(cfg, **glob, mixer_args=args)
            source += " + --set"
        shapes.append(BenchShape(n, dataclasses.replace(cfg, dropout=0.0), source, n_matched))
    return shapes


def bench_config(cfg: ModelConfig, block_size: int) -> ModelConfig:
    """The benchmark variant of a config: no dropout; learned position table dropped (see module doc)."""
    pos = "none" if cfg.pos_emb == "learned" else cfg.pos_emb
    return dataclasses.replace(cfg, dropout=0.0, pos_emb=pos, block_size=max(cfg.block_size, block_size))


def build_model(cfg: ModelConfig, device: str, seed: int = 0) -> torch.nn.Module:
    from ..model import GPT

    torch.manual_seed(seed)
    with torch.device(device):
        return GPT(cfg)


def shape_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "mixer_args": dict(cfg.mixer_args),
            "vocab_size": cfg.vocab_size, "pos_emb": cfg.pos_emb, "block_size": cfg.block_size}


# ------------------------------------------------------------------ devices and precision


def resolve_device(device: str | None) -> str:
    from ..errors import AttnbenchError

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AttnbenchError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise AttnbenchError(f"--device must be cpu or cuda, got {device!r}")
    return device


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


DTYPES = ("auto", "float32", "bfloat16", "autocast")


@dataclass
class Precision:
    """How a benchmark runs its model: weights' dtype and whether bf16 autocast is on."""

    name: str  # 'float32' | 'bfloat16' (weights cast) | 'autocast-bfloat16' (fp32 weights, bf16 autocast)
    weights: torch.dtype
    autocast: bool

    def context(self, device: str, cache_enabled: bool = True):
        if self.autocast:
            return torch.autocast(device_type=device, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.weights)


def precision(name: str, device: str, inference: bool) -> Precision:
    """'auto': float32 on the CPU; on CUDA bf16 weights for inference, bf16 autocast for training
    (the trainer's setting: fp32 master weights)."""
    if name == "auto":
        name = "float32" if device == "cpu" else ("bfloat16" if inference else "autocast")
    if name == "float32":
        return Precision("float32", torch.float32, False)
    if name == "bfloat16":
        return Precision("bfloat16", torch.bfloat16, False)
    if name == "autocast":
        if device != "cuda":
            raise ConfigError("--dtype autocast needs --device cuda (the CPU runs float32)")
        return Precision("autocast-bfloat16", torch.float32, True)
    raise ConfigError(f"--dtype must be one of {DTYPES}, got {name!r}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ timing


def time_calls(fn: Callable[[], Any], n: int, device: str, setup: Callable[[], Any] | None = None) -> list[float]:
    """Milliseconds of each of `n` calls of fn. CUDA: device-side, with an event pair around every call
    (one synchronisation at the end, so the host never stalls the queue); CPU: perf_counter.
    `setup` runs before each call, outside the timed span (e.g. a fresh cache for a prefill)."""
    if n <= 0:
        return []
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            if setup is not None:
                setup()
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in ev]
    out = []
    for _ in range(n):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def summarize(samples: list[float]) -> dict[str, Any]:
    """median/min/max/n of a list of measurements (None when empty)."""
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


# ------------------------------------------------------------------ which op backend ran
# (recorded by attnbench.ops.backend.record_backends)


def backend_summary(seen: dict[str, str]) -> str:
    kinds = set()
    for v in seen.values():
        kinds.update(v.split("+"))
    if not kinds:
        return "torch"
    return "+".join(sorted(kinds))


# ------------------------------------------------------------------ rows


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or another allocation failure: the CPU allocator ("can't allocate
    memory"), a raw CUDA call ("out of memory"), cuBLAS/cuDNN workspaces ("..._STATUS_ALLOC_FAILED")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower()
                                            or "STATUS_ALLOC_FAILED" in msg)


def base_row(bench: str, shape: BenchShape, cfg: ModelConfig, n_params: int, device: str, prec: Precision) -> dict:
    """Fields every row carries; the benchmark adds metric, value, median/min/max, unit, ..."""
    return {
        "bench": bench,
        "mixer": shape.mixer,
        "n_params": n_params,
        "n_params_matched": shape.n_params_matched,
        "shape": shape_dict(cfg),
        "shape_source": shape.source,
        "pos_emb_note": (f"the trained config's pos_emb={shape.cfg.pos_emb!r} replaced by {cfg.pos_emb!r} for "
                         "benchmarking (see attnbench/bench/common.py)") if shape.cfg.pos_emb != cfg.pos_emb else None,
        "device": device,
        "device_name": device_name(device),
        "dtype": prec.name,
        "config_backend": cfg.backend,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def measured(row: dict, metric: str, unit: str, samples: list[float] | None, **extra) -> dict:
    """Fill a row with the measured value (the median) and its spread."""
    s = summarize(samples or [])
    row = dict(row)
    row.update(metric=metric, unit=unit, value=s["median"], median=s["median"], min=s["min"], max=s["max"],
               repeats=s["n"], oom=False, error=None)
    row.update(extra)
    return row


class RowWriter:
    """Collects rows and appends each as one JSON line to `path` (when given) as soon as it exists, so a
    benchmark killed half-way keeps what it measured."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, default=_json_default) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return row


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ tables


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1 - int(math.log10(abs(v))), 0)}f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def print_table(title: str, headers: list[str], rows: list[list[Any]], file=None) -> None:
    file = file or sys.stdout
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}", file=file)
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=file)
    file.flush()


# ------------------------------------------------------------------ training step


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """The trainer's AdamW (decay on matrices, none on parameters marked _no_weight_decay; fused on CUDA)."""
    from ..config import RunConfig
    from ..trainer import make_optimizer as _make

    return _make(model, RunConfig(), device)


def random_batch(vocab: int, batch: int, T: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, vocab, (batch, T + 1), generator=g)
    return x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               prec: Precision, device: str, zero_grad: bool = True, autocast_cache: bool = True) -> None:
    """One full training step as the trainer takes it: forward + loss, backward, gradient clipping at 1.0,
    AdamW step (no loss scaling: bf16 needs none). A CUDA-graph step (graphed_step.GraphedStep) passes
    zero_grad=False (it resets gradients itself) and autocast_cache=False."""
    with prec.context(device, cache_enabled=autocast_cache):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if zero_grad:
        opt.zero_grad(set_to_none=True)
