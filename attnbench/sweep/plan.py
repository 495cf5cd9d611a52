"""The plan: one resolved, validated RunConfig per (mixer, learning rate, seed) of a sweep, and its run id.

Shapes: with `param_budget` every mixer gets the shape `params.match_all` finds for it (starting
from the base model section, plus `<base dir>/<mixer>.toml`'s model section when that file exists,
minus the mixer args the matcher searches, e.g. head_dim, unless [overrides] fix them); without it,
that model section (or the base) is used as is. A hybrid (a layer pattern, "gated_deltanet*3+softmax")
takes each of its mixers' arguments from `<base dir>/<mixer>.toml`'s [model.mixer_args] into its
sub-table `model.mixer_args.<mixer>` (the rest of the model section comes from the base). Precedence,
last wins: base config -> mixer config's model section -> [overrides] -> `--set KEY=VALUE` ->
[mixer_overrides.<mixer>] -> the sweep axes (mixer, learning rate, seed) -> matched shape. Every
resolved config is validated before anything runs (unknown keys name the nearest valid one).

[grid] and [[points]] (attnbench/sweep/grid.py) add points: each point's settings come after
[mixer_overrides], then the head_dim rule sets model.n_head from the width. MQAR runs (task.kind) need
no corpus: their examples are prepared once here, before any run starts.

The run id is `<mixer>[-<point>]-lr<lr>-s<seed>-<hash>` (the point's values, e.g. n_embd64-seq_len256;
a pattern's name made file-safe by mixers.file_safe), the hash being 8 hex digits of the resolved config
without the settings that do not change what is computed (out_dir, progress, resume, logging,
data_dir, checkpoint retention, eval batch size, torch.compile, CUDA graphs). So re-running a sweep
recognises its runs (attnbench/sweep/manifest.py: done, resumed or started).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import mixers as registry
from .. import params
from ..config import RunConfig, TaskConfig, read_toml
from ..data import Corpus
from ..errors import ConfigError
from ..resolve import load_config
from ..tasks import prepare_task
from .grid import apply_head_rule, expand, point_label
from .spec import Sweep

# Settings that do not change what a run computes: left out of the run id so that changing them
# (another data folder, progress bars, logging) keeps the runs. Each is one the trainer lets a run
# resume with (trainer._RESUMABLE), plus out_dir (the folder itself).
ID_EXCLUDE = {"train.out_dir", "train.progress", "train.resume", "train.keep_checkpoints", "train.eval_batch_size",
              "train.log_interval", "train.compile", "train.compile_scope", "train.compile_mode", "train.cuda_graph",
              "data.data_dir", "log.wandb_log", "log.wandb_project", "log.wandb_run_name"}


@dataclass
class PlannedRun:
    run_id: str
    mixer: str
    learning_rate: float
    seed: int
    config: dict[str, Any]  # the resolved RunConfig as a dict (out_dir set by the sweep)
    match: dict[str, Any] | None = None  # parameter match: n_params, budget, deviation
    label: str = ""  # the sweep's name for the run's row: the mixer, or a variant's label
    point: str = ""  # the [grid]/[[points]] point's label ("" without them)

    def __post_init__(self) -> None:
        self.label = self.label or self.mixer


# Keys at these values leave a language-modelling run as it was before the keys existed: left out of the hash
# there, so such runs keep their ids (and a re-run sweep recognises them).
_ID_DEFAULTS = {"model.mlp": True, "train.early_stop_accuracy": None}


def run_id_for(config: RunConfig | dict[str, Any], label: str | None = None, point: str = "") -> str:
    """`<label>[-<point>]-lr<lr>-s<seed>-<8 hex>` (label: the mixer unless a variant's is given; point: the
    [grid]/[[points]] values): the hash covers every setting that changes what is computed."""
    d = config.to_dict() if isinstance(config, RunConfig) else config
    kept = {sec: {k: v for k, v in vals.items() if f"{sec}.{k}" not in ID_EXCLUDE
                  and not (f"{sec}.{k}" in _ID_DEFAULTS and v == _ID_DEFAULTS[f"{sec}.{k}"])}
            for sec, vals in d.items()}
    if kept.get("task", {}).get("kind", "lm") == "lm":
        kept.pop("task", None)  # a language-modelling run's task settings are unused
    h = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]
    mid = f"-{point}" if point else ""
    name = label or registry.file_safe(d["model"]["mixer"])  # "gated_deltanet*3+softmax" -> "gated_deltanet_x3-softmax"
    return f"{name}{mid}-lr{d['optim']['learning_rate']:g}-s{d['train']['seed']}-{h}"


def plan(sweep: Sweep, out: str | Path, data_dir: str | None = None, load_data: bool = True) -> list[PlannedRun]:
    """Resolve and validate every run's config (before anything runs)."""
    out = Path(out)
    runs: list[PlannedRun] = []
    vocab: dict[tuple[str, str], int | None] = {}
    prepared: set[str] = set()
    noted: set[tuple[str, int, int]] = set()
    base_tree = read_toml(sweep.base_config, "base config")[1]
    for label, point in ((m, p) for m in sweep.mixers for p in expand(sweep.grid, sweep.points)):
        mixer = sweep.mixer_of(label)
        tree = json.loads(json.dumps(base_tree))
        model = tree.setdefault("model", {})
        if model.get("mixer", "softmax") != mixer:
            model.pop("mixer_args", None)  # the base mixer's own settings do not apply to another mixer
        # the mixer's own config next to the base (attnbench/configs/<mixer>.toml): its model section
        if registry.is_hybrid(mixer):
            _hybrid_args(sweep, model, mixer)
        else:
            mixer_cfg = sweep.base_config.parent / f"{mixer}.toml"
            if mixer_cfg.is_file() and mixer_cfg != sweep.base_config:
                mt = read_toml(mixer_cfg, "mixer config")[1].get("model", {})
                if mt.get("mixer", mixer) == mixer:
                    model.update(mt)
        model["mixer"] = mixer
        if sweep.param_budget is not None:  # the matcher searches these; the sweep's overrides may still fix them
            args = model.get("mixer_args", {})
            for table in [t for t in args.values() if isinstance(t, dict)] if registry.is_hybrid(mixer) else [args]:
                for k in params.SEARCHED_ARGS:
                    table.pop(k, None)
        ov = list(sweep.overrides) + list(sweep.mixer_overrides.get(label, [])) + list(point)
        try:
            ov = apply_head_rule(tree, ov, sweep.head_dim)
        except ConfigError as e:
            raise ConfigError(f"{sweep.path} (mixer {label}): {e}") from None
        if sweep.dataset:
            ov.append(("data.dataset", sweep.dataset))
        if data_dir is not None:
            ov.append(("data.data_dir", str(data_dir)))
        plabel = point_label(point)
        src = f"{sweep.path} (mixer {label}{', ' + plabel if plabel else ''})"
        if registry.is_hybrid(mixer) and not any(k == "model.n_layer" for k, _ in sweep.mixer_overrides.get(label, [])):
            ov = _fit_depth(tree, ov, mixer, noted)
        try:
            mcfg = load_config(tree, dict(ov))
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
        if mcfg.task.kind != "lm":
            if load_data:
                _prepare_once(mcfg.task, mcfg.data.data_dir, prepared)
        else:
            key = (mcfg.data.data_dir, mcfg.data.dataset)
            if load_data and key not in vocab:
                vocab[key] = Corpus.load(*key).vocab_size
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
                rid = run_id_for(cfg, label if label != mixer else None, plabel)
                cfg.train.out_dir = str(out / "runs" / rid)
                runs.append(PlannedRun(rid, mixer, float(lr), int(seed), cfg.to_dict(), match, label, plabel))
    return runs


def _fit_depth(tree: dict[str, Any], ov: list[tuple[str, Any]], pattern: str, noted: set) -> list[tuple[str, Any]]:
    """A layer pattern trains at the sweep's depth rounded up to a multiple of its length (the 3:1 hybrid
    at a depth of 6: 8 layers, the pattern twice), so `all` and `--mixers` can add hybrids to any sweep
    without an error; [mixer_overrides.<pattern>] "model.n_layer" sets another depth. Printed once."""
    n = int(dict(ov).get("model.n_layer", tree.get("model", {}).get("n_layer", RunConfig().model.n_layer)))
    length = registry.pattern_length(pattern)
    if n % length == 0:
        return ov
    fitted = -(-n // length) * length
    if (pattern, n, fitted) not in noted:
        noted.add((pattern, n, fitted))
        print(f"attnbench sweep: {pattern} is {length} layers long: it trains with model.n_layer = {fitted} "
              f"(the sweep's {n} rounded up to a multiple)", flush=True)
    return [*ov, ("model.n_layer", fitted)]


def _prepare_once(task: TaskConfig, data_dir: str, done: set[str]) -> None:
    """Generate a task's examples into data_dir before the runs start (each run then only loads them)."""
    key = json.dumps([dataclasses.asdict(task), str(data_dir)], sort_keys=True)
    if key not in done:
        prepare_task(task, data_dir)
        done.add(key)


def _hybrid_args(sweep: Sweep, model: dict[str, Any], pattern: str) -> None:
    """Each mixer of the pattern gets the [model.mixer_args] of its config file next to the base
    (`<base dir>/<mixer>.toml`) as its sub-table, below any the base itself gives."""
    given = model.get("mixer_args", {}) if model.get("mixer") == pattern else {}
    args = {}
    for name in registry.components(pattern):
        f = sweep.base_config.parent / f"{name}.toml"
        mt = read_toml(f, "mixer config")[1].get("model", {}) if f.is_file() else {}
        own = dict(mt.get("mixer_args", {})) if mt.get("mixer", name) == name else {}
        args[name] = {**own, **dict(given.get(name, {}))}
    model["mixer_args"] = args


def _match_shape(sweep: Sweep, cfg: RunConfig, mixer: str) -> tuple[Any, dict[str, Any]]:
    """The mixer's shape at the sweep's parameter budget (attnbench.params), and the match record."""
    m = params.match_all(params.parse_budget(sweep.param_budget), mixers=[mixer], n_layer=cfg.model.n_layer,
                         base=cfg.model)[0]
    row = {k: v for k, v in m.to_row().items() if isinstance(v, (int, float, str, bool, dict, type(None)))}
    model = load_config({**cfg.to_dict(), "model": dataclasses.asdict(m.model_cfg)}).model
    return model, {**row, "n_params": int(m.n_params)}
