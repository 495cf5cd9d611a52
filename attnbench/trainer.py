"""The training loop: one run from a RunConfig to a run folder (config.json, metrics.jsonl,
checkpoints, summary.json written last). Resumable, DDP-aware, no host sync inside a step.

Over 400 lines because the loop's state (model, optimiser, sampler position, best loss, preemption
flag, early stop) is shared by its evaluation, checkpoint and resume steps; each step is its own
function, and the loop passes that state explicitly rather than through an object."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import best_val_loss, latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from .config import RunConfig
from .resolve import load_config
from .data import BatchSampler, Corpus, val_windows
from .errors import AttnbenchError, DiskFullError
from .flops import train_flops_per_token
from .graphed_step import GraphedStep, make_graph_safe, set_lr
from .files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from .model import GPT
from .ops import fla_preload
from .ops.backend import gated_backward_route, record_backends
from .preemption import Preempted, StopRequest, stop_requests
from .tasks import TaskData, evaluate_task

SUMMARY, METRICS, CONFIG = "summary.json", "metrics.jsonl", "config.json"
# Tests set this to SIGKILL the process right after a given step (a crash at the worst moment).
_KILL_AT_STEP = int(os.environ.get("ATTNBENCH_TEST_KILL_AT_STEP", "-1"))
# Tests set this to "STEP:SIGNAME" to have the process send itself that signal right after a given step.
_SIGNAL_AT_STEP = os.environ.get("ATTNBENCH_TEST_SIGNAL_AT_STEP", "")


class NonFiniteLoss(AttnbenchError):
    """The loss became NaN or inf; the run stopped and kept its last good checkpoint."""


class OutOfMemory(AttnbenchError):
    """A training step or an evaluation did not fit in the GPU's memory; the last checkpoint is kept."""


# ------------------------------------------------------------------ pieces


def resolve_device(cfg: RunConfig) -> str:
    dev = cfg.train.device
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise AttnbenchError("train.device='cuda' but no CUDA GPU is visible; use --device=cpu or --device=auto")
    return dev


def resolve_dtype(cfg: RunConfig, device: str) -> torch.dtype:
    name = cfg.train.dtype
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lr_at(it: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    o = cfg.optim
    if not o.decay_lr:
        return o.learning_rate
    decay_iters = o.lr_decay_iters or cfg.train.max_iters
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if it > decay_iters:
        return o.min_lr
    ratio = (it - o.warmup_iters) / max(1, decay_iters - o.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return o.min_lr + coeff * (o.learning_rate - o.min_lr)


def make_optimizer(model: nn.Module, cfg: RunConfig, device: str) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (as nanoGPT), never on parameters a mixer marks
    `_no_weight_decay` (decay rates, biases of gates)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.learning_rate, betas=(cfg.optim.beta1, cfg.optim.beta2), **extra)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, batch: int, device: str,
             autocast, dist_info: distributed.Dist) -> float:
    """Mean cross-entropy over every fixed validation window (sharded over ranks, then summed).

    Runs torch.compile'd code eagerly: an evaluation is a few forward passes, while compiling the
    eval-mode graph (no dropout, no autograd) costs as much as compiling the training step."""
    was_training = model.training
    model.eval()
    with torch.compiler.set_stance("force_eager"):
        total = _eval_sums(model, val_x, val_y, batch, device, autocast, dist_info)
    model.train(was_training)
    return (total[0] / total[1]).item()


def _eval_sums(model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, batch: int, device: str,
               autocast, dist_info: distributed.Dist) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64, device=device)
    idx = torch.arange(dist_info.rank, len(val_x), dist_info.world_size)
    for i in range(0, len(idx), batch):
        sel = idx[i:i + batch]
        n = len(sel)
        if n < batch:  # pad the last batch to the same shape (no recompilation under torch.compile)
            sel = torch.cat([sel, sel[:1].expand(batch - n)])
        x, y = val_x[sel].to(device, non_blocking=True), val_y[sel].to(device, non_blocking=True)
        with autocast:
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # [B, T]
        total[0] += loss[:n].sum().double()
        total[1] += y[:n].numel()
    distributed.all_reduce_sum(total, dist_info)
    return total


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if device == "cuda":
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(st["cpu"])
    if device == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])


class _Wandb:
    """Optional Weights & Biases logging (rank 0); checked before any work starts."""

    def __init__(self, cfg: RunConfig, run_dir: Path, enabled: bool):
        self.run = None
        if not (cfg.log.wandb_log and enabled):
            return
        try:
            import wandb  # optional dependency (attnbench[wandb])
        except ImportError:
            raise AttnbenchError("log.wandb_log=true but wandb is not installed: pip install 'attnbench[wandb]' "
                                 "(or --wandb_log=false)") from None
        self.run = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or run_dir.name,
                              dir=str(run_dir), config=cfg.to_dict(), resume="allow", id=_wandb_id(run_dir))

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def _stopping(stop: StopRequest, dinfo: distributed.Dist, dev: str, synced: bool) -> bool:
    """Whether to stop for a preemption signal now. One process: as soon as one arrived. Under torchrun the
    ranks agree (an all-reduce) at log steps only, where the loop synchronises anyway."""
    if not dinfo.enabled:
        return bool(stop)
    if not synced:
        return False
    flag = torch.tensor(float(bool(stop)), device=dev)
    distributed.all_reduce_sum(flag, dinfo)
    return flag.item() > 0


def _out_of_memory(cfg: RunConfig, dinfo: distributed.Dist, run_dir: Path, last_good: int, where: str) -> OutOfMemory:
    """The message for a CUDA out-of-memory error: what did not fit and settings that would."""
    tc, m = cfg.train, cfg.model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the failed step had cached goes back to the GPU
    keep = f"The last checkpoint (step {last_good}) in {run_dir / 'ckpt'} is kept."
    if where == "evaluation":
        return OutOfMemory(f"out of GPU memory evaluating {m.mixer} with eval_batch_size={tc.eval_batch_size} x "
                           f"block_size={m.block_size}: use --eval_batch_size={max(1, tc.eval_batch_size // 2)} "
                           f"(it does not change the results; resume with --resume). {keep}")
    per = " per process" if dinfo.enabled else ""
    if tc.batch_size > 1:
        d = next(k for k in range(2, tc.batch_size + 1) if tc.batch_size % k == 0)  # 2 for an even batch
        fix = (f"a micro-batch {d} times smaller with {d} times the accumulation trains on the same "
               f"{tc.batch_size * m.block_size * tc.gradient_accumulation_steps} tokens per step: "
               f"--batch_size={tc.batch_size // d} --gradient_accumulation_steps={tc.gradient_accumulation_steps * d} "
               "(a new run: a run resumes only with its own batch settings)")
    else:
        fix = f"one sequence does not fit: lower model.block_size ({m.block_size}) or the model's size"
    return OutOfMemory(f"out of GPU memory in a training step of {m.mixer} ({m.n_layer} layers, n_embd {m.n_embd}) "
                       f"with batch_size={tc.batch_size}{per} x block_size={m.block_size} (context) x "
                       f"gradient_accumulation_steps={tc.gradient_accumulation_steps}: {fix}. {keep}")


def _disk_full(e: DiskFullError, step: int, last_good: int, run_dir: Path) -> DiskFullError:
    return DiskFullError(f"{e}. Training stopped at step {step}; the last checkpoint (step {last_good}) in "
                         f"{run_dir / 'ckpt'} is kept: continue with --resume once there is space")


# ------------------------------------------------------------------ tasks


def _load_data(cfg: RunConfig) -> tuple[Corpus | None, TaskData | None, torch.Tensor, torch.Tensor]:
    """The corpus (language modelling) or the prepared task, and the evaluation inputs and targets."""
    if cfg.task.kind == "lm":
        corpus = Corpus.load(cfg.data.data_dir, cfg.data.dataset)
        cfg.model.vocab_size = corpus.vocab_size
        return corpus, None, *val_windows(corpus.val, cfg.model.block_size)
    task = TaskData(cfg.task, cfg.data.data_dir, cfg.train.batch_size, cfg.train.seed)
    return None, task, task.test_x, task.test_y


def _passes(cfg: RunConfig, accuracy: float | None) -> bool:
    """Early stop: an accuracy strictly above train.early_stop_accuracy (Zoology's `> 0.99`)."""
    t = cfg.train.early_stop_accuracy
    return t is not None and accuracy is not None and accuracy > t


def _task_summary(cfg: RunConfig, acc: dict, stopped_at: int | None) -> dict[str, Any]:
    """What a task run adds to summary.json; perplexity and bits per character do not apply."""
    t = cfg.task
    return {"task": t.kind, "seq_len": t.seq_len, "num_kv_pairs": t.num_kv_pairs,
            "best_val_accuracy": acc["best"], "final_val_accuracy": acc["last"],
            "early_stop_accuracy": cfg.train.early_stop_accuracy, "early_stopped_at": stopped_at,
            "best_val_ppl": None, "final_val_ppl": None, "best_val_bpc": None}


def _checkpoint_eval(run_eval, checkpoint, step: int, run_dir: Path) -> float:
    """Evaluate, save a checkpoint, and mark it as the best one when its validation loss is the lowest so
    far (ckpt/best.json: `attnbench eval --checkpoint best` loads it, and pruning keeps it)."""
    best = best_val_loss(run_dir)
    vl = run_eval(step)
    checkpoint(step, vl if best is None or vl < best else None)
    return vl


# ------------------------------------------------------------------ the run


def prepare_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """Check the run folder before any work: refuse to overwrite a run unless resuming, and refuse to
    resume with a different configuration."""
    run_dir = Path(cfg.train.out_dir)
    saved = run_dir / CONFIG
    if cfg.train.resume:
        if saved.is_file():
            old = json.loads(saved.read_text())
            diffs = _config_diff(old, cfg.to_dict())
            if diffs:
                raise AttnbenchError(f"--resume: {run_dir} was started with a different configuration ({'; '.join(diffs)}). "
                                     "Resume with the same settings or pick another --out_dir.")
        return run_dir, resume_checkpoint(run_dir)  # the newest intact one; damaged folders stay, with a warning
    if latest_checkpoint(run_dir) is not None or (run_dir / SUMMARY).exists() or (run_dir / METRICS).exists():
        raise AttnbenchError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out_dir "
                             "(attnbench never overwrites a run)")
    return run_dir, None


def compile_model(model: nn.Module, scope: str = "blocks", mode: str = "default") -> nn.Module:
    """torch.compile for training. scope "blocks": each transformer block compiled in place; they all run
    Block.forward, so the layers share one compiled graph (regional compilation, several times faster to
    compile than the whole model). scope "model": one graph for the whole model (returns the wrapper)."""
    if scope == "model":
        return torch.compile(model, mode=mode)
    for block in model.blocks:
        block.compile(mode=mode)
    return model


# Settings that may change between a run and its resumption without changing its results.
_RESUMABLE = {"train.out_dir", "train.resume", "train.progress", "train.log_interval", "train.max_iters", "train.keep_checkpoints",
              "train.compile", "train.compile_scope", "train.compile_mode", "train.cuda_graph", "train.device", "train.eval_batch_size",
              "log.wandb_log", "log.wandb_project",
              "log.wandb_run_name", "model.backend", "data.data_dir",
              "model.vocab_size"}  # vocab_size is derived from the dataset


def _config_diff(old: dict, new: dict) -> list[str]:
    out = []
    defaults = RunConfig().to_dict()  # a key the saved config lacks (added since) had its default
    for sec, vals in new.items():
        for k, v in vals.items():
            key = f"{sec}.{k}"
            if key in _RESUMABLE:
                continue
            ov = old.get(sec, {}).get(k, defaults.get(sec, {}).get(k))
            if ov != v:
                out.append(f"{key}: {ov!r} -> {v!r}")
    return out


def train(config: str | Path | dict | RunConfig | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Train one run (see the module docstring); returns the summary also written to summary.json."""
    cfg = load_config(config, overrides)
    device = resolve_device(cfg)
    dinfo = distributed.setup(device)
    clean = False
    try:
        with fla_preload.capturing(cfg.model.mixer, "train"):  # ATTNBENCH_FLA_CAPTURE=DIR only
            out = _train(cfg, device, dinfo)
        clean = True
        return out
    finally:
        distributed.teardown(dinfo, clean)


def _train(cfg: RunConfig, device: str, dinfo: distributed.Dist) -> dict:
    t_process = time.perf_counter()  # rows log process_s: wall seconds since this process began the run
    tc = cfg.train
    if tc.gradient_accumulation_steps % dinfo.world_size:
        raise AttnbenchError(f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps} must be a multiple of "
                             f"the number of processes ({dinfo.world_size})")
    micro_steps = tc.gradient_accumulation_steps // dinfo.world_size
    if tc.cuda_graph and device != "cuda":
        raise AttnbenchError("train.cuda_graph=true needs a CUDA GPU (this run is on the CPU); set train.cuda_graph=false")
    if tc.cuda_graph and dinfo.enabled:
        raise AttnbenchError("train.cuda_graph=true is not supported under torchrun (DDP's all-reduce hooks are not "
                             "captured here); set train.cuda_graph=false for multi-process runs")
    run_dir, ckpt_path = prepare_run_dir(cfg)
    if ckpt_path is None and (run_dir / SUMMARY).exists():  # resumed a finished run: nothing to do
        return json.loads((run_dir / SUMMARY).read_text())
    corpus, task, val_x, val_y = _load_data(cfg)
    wandb = _Wandb(cfg, run_dir, dinfo.is_main)  # fails before any file is written if wandb is missing

    if device == "cuda":
        torch.cuda.set_device(dinfo.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev = f"cuda:{dinfo.local_rank}" if device == "cuda" else "cpu"
    dtype = resolve_dtype(cfg, device)
    # a captured step must not keep autocast's cache of cast weights (they would be freed after capture)
    autocast = (torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=not tc.cuda_graph)
                if device == "cuda" and dtype != torch.float32 else contextlib.nullcontext())
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    model = GPT(cfg.model).to(dev)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
    labels_per_row = task.labels_per_row if task is not None else None  # the head runs at labelled positions only
    sampler = task.sampler if task is not None else BatchSampler(corpus.train, cfg.model.block_size, tc.batch_size, tc.seed)
    start_iter, best_val, tokens_seen, train_time = 0, float("inf"), 0, 0.0
    last_val: float | None = None
    acc = {"best": None, "last": None}  # tasks with an accuracy: best and latest evaluation's
    torch.manual_seed(tc.seed + 1 + dinfo.rank)  # dropout stream, distinct per rank

    if ckpt_path is not None:
        st = load_checkpoint(ckpt_path, model, map_location="cpu")
        model.to(dev)
        optimizer.load_state_dict(st["optimizer"])
        sampler.load_state_dict(st["sampler"])
        if len(st["rng"]) == dinfo.world_size:  # one RNG state per rank; another world size re-seeds
            _set_rng_state(st["rng"][dinfo.rank], device)
        start_iter, best_val = int(st["step"]), float(st["best_val_loss"])
        tokens_seen, train_time = int(st["tokens"]), float(st["train_time_s"])
        last_val = st.get("last_val_loss")
        acc.update(best=st.get("best_val_accuracy"), last=st.get("last_val_accuracy"))
    if tc.cuda_graph:  # after loading: load_state_dict restores the saved group settings
        make_graph_safe(optimizer, dev)
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / CONFIG)
        if ckpt_path is not None:  # drop rows logged after the checkpoint: they are about to be redone
            rows = [r for r in read_jsonl(run_dir / METRICS) if r.get("step", 0) <= start_iter]
            atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
        elif (run_dir / METRICS).exists():  # --resume of a start that stopped before its first checkpoint
            print(f"{run_dir} has no checkpoint yet (its earlier start stopped before the first one): "
                  "training starts at step 0")
            atomic_write_text(run_dir / METRICS, "")

    raw_model = model
    preloaded = None
    if device == "cuda":  # decided eagerly (a small GPU probe where TileLang is installed), not in a trace
        gated_backward_route()
        preloaded = fla_preload.preload_for_run(cfg.model.mixer, "train")  # off: ATTNBENCH_FLA_PRELOAD=0
    if tc.compile:
        model = compile_model(model, tc.compile_scope, tc.compile_mode)
    if dinfo.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dinfo.local_rank] if device == "cuda" else None)

    n_params = raw_model.num_params()
    flops_per_token = train_flops_per_token(cfg.model)  # analytic, per mixer (attnbench/flops.py)
    tokens_per_iter = tc.batch_size * cfg.model.block_size * tc.gradient_accumulation_steps
    log = (lambda row: (append_jsonl(run_dir / METRICS, row), wandb.log(row))) if dinfo.is_main else (lambda row: None)
    bar = None
    if dinfo.is_main and tc.progress:
        bar = tqdm(total=tc.max_iters, initial=start_iter, desc=f"{cfg.model.mixer}", unit="it", dynamic_ncols=True)
    elif dinfo.is_main:
        print(f"training {cfg.model.mixer}: {n_params / 1e6:.2f}M parameters, {tc.max_iters} iterations -> {run_dir}")

    def checkpoint(step: int, best: float | None = None) -> Path | None:
        rngs = [None] * dinfo.world_size
        if dinfo.enabled:
            torch.distributed.all_gather_object(rngs, _rng_state(device))
        else:
            rngs = [_rng_state(device)]
        if dinfo.is_main:
            return save_checkpoint(run_dir, step, raw_model, {
                "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rngs,
                "best_val_loss": best_val, "last_val_loss": last_val, "tokens": tokens_seen,
                "best_val_accuracy": acc["best"], "last_val_accuracy": acc["last"],
                "train_time_s": train_time}, keep=tc.keep_checkpoints, best_val=best)
        return None

    def run_eval(step: int) -> float:
        nonlocal best_val, last_val
        if task is None:
            vl = evaluate(model, val_x, val_y, tc.eval_batch_size, dev, autocast, dinfo)
            row = {"step": step, "val_loss": vl, "val_ppl": math.exp(vl), "val_bpc": corpus.bits_per_char(vl)}
        else:
            vl, a = evaluate_task(model, val_x, val_y, tc.eval_batch_size, dev, autocast, dinfo.rank,
                                  dinfo.world_size, lambda t: distributed.all_reduce_sum(t, dinfo), labels_per_row)
            acc.update(best=max(a, acc["best"] if acc["best"] is not None else a), last=a)
            row = {"step": step, "val_loss": vl, "val_accuracy": a}
        best_val, last_val = min(best_val, vl), vl
        row |= {"tokens": tokens_seen, "flops": tokens_seen * flops_per_token, "train_time_s": train_time,
               "process_s": time.perf_counter() - t_process,
               "peak_mem_mb": peak_memory_mb(device)}
        log(row)
        shown = f"val {vl:.4f}" + (f", accuracy {acc['last']:.4f}" if task is not None else "")
        if bar is not None:
            bar.set_postfix_str(shown)
        elif dinfo.is_main:
            print(f"step {step}: {shown}")
        return vl

    model.train()
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # any non-finite loss since the last check
    loss_acc = torch.zeros((), device=dev)

    def step(xs: torch.Tensor, ys: torch.Tensor) -> None:
        """One optimizer step over micro-batches xs[m], ys[m]; results land in the parameters, the optimizer
        state, loss_acc and bad (in place: a CUDA graph replays this on the same tensors)."""
        for m in range(micro_steps):
            sync = m == micro_steps - 1
            ctx = model.no_sync() if dinfo.enabled and not sync else contextlib.nullcontext()
            with ctx, autocast:
                _, loss = model(xs[m], ys[m], labels_per_row=labels_per_row)
                loss = loss / micro_steps
            scaler.scale(loss).backward()
            loss_acc.add_(loss.detach())
        bad.logical_or_(~torch.isfinite(loss_acc))
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    train_step = GraphedStep(step, lambda: optimizer.zero_grad(set_to_none=True), enabled=tc.cuda_graph,
                             label=f"{cfg.model.mixer} training step")
    t_interval, it_interval, step_times = time.perf_counter(), 0, []
    last_good = start_iter
    it = start_iter
    interrupted, oom = False, None
    signal_at = _SIGNAL_AT_STEP.split(":") if _SIGNAL_AT_STEP else None

    def log_interval_row(lr: float) -> None:
        """The mean training loss of the steps since the last row (the only host sync of the interval)."""
        nonlocal loss_acc, it_interval, t_interval, train_time
        if dinfo.enabled:  # the logged loss is the global batch's, as with one process
            distributed.all_reduce_sum(loss_acc, dinfo)
            loss_acc /= dinfo.world_size
        lossf = loss_acc.item() / it_interval
        if not math.isfinite(lossf):
            raise NonFiniteLoss(f"loss is {lossf} at step {it}")
        dt = time.perf_counter() - t_interval
        train_time += dt
        step_times.append((it_interval, dt))
        row = {"step": it, "loss": lossf, "lr": lr, "tokens": tokens_seen, "flops": tokens_seen * flops_per_token,
               "tokens_per_s": tokens_per_iter * it_interval / dt, "ms_per_iter": 1000 * dt / it_interval,
               "train_time_s": train_time, "process_s": time.perf_counter() - t_process,
               "peak_mem_mb": peak_memory_mb(device)}
        log(row)
        if bar is not None:
            bar.update(it_interval)
            bar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{row['tokens_per_s']:.3g}")
        loss_acc.zero_()
        it_interval = 0
        t_interval = time.perf_counter()

    lr = lr_at(it, cfg)
    stopped_at = it if _passes(cfg, acc["last"]) else None  # resumed from the evaluation that stopped it
    with stop_requests() as stop, record_backends() as op_backends:  # which kernels ran: for the summary
        try:
            while it < tc.max_iters and stopped_at is None:
                evaluated = False
                if it % tc.eval_interval == 0 and not (ckpt_path is not None and it == start_iter):
                    torch.cuda.synchronize() if device == "cuda" else None
                    train_time += time.perf_counter() - t_interval
                    if bad.item():
                        raise NonFiniteLoss(f"non-finite loss before step {it}")
                    _checkpoint_eval(run_eval, checkpoint, it, run_dir)
                    last_good, evaluated = it, True
                    t_interval = time.perf_counter()
                    if _passes(cfg, acc["last"]):  # early stop: this evaluation is the final one
                        stopped_at = it
                        break
                if _stopping(stop, dinfo, dev, it % tc.log_interval == 0):  # at a step boundary: checkpoint, stop
                    if bad.item():
                        raise NonFiniteLoss(f"non-finite loss before step {it}")
                    if it_interval:
                        log_interval_row(lr)
                    written = latest_checkpoint(run_dir) if evaluated else checkpoint(it)
                    if bar is not None:
                        bar.close()
                    raise Preempted(stop.signame or "a signal to another process", it, written)
                lr = lr_at(it, cfg)
                set_lr(optimizer, lr)
                batch = list(sampler.next_step(micro_steps, dinfo.world_size, dinfo.rank))
                xs = torch.stack([x for x, _ in batch]).to(dev, non_blocking=True)
                ys = torch.stack([y for _, y in batch]).to(dev, non_blocking=True)
                try:
                    train_step(xs, ys)
                    oom = None
                except torch.OutOfMemoryError:
                    oom = "step"  # raised below, outside the handler: the error must not pin the step's tensors
                if oom:
                    raise _out_of_memory(cfg, dinfo, run_dir, last_good, oom)
                it += 1
                tokens_seen += tokens_per_iter
                if it == _KILL_AT_STEP:  # test hook: die like `kill -9` would, mid-run
                    os.kill(os.getpid(), signal.SIGKILL)
                if signal_at and it == int(signal_at[0]):  # test hook: a scheduler's signal, mid-run
                    os.kill(os.getpid(), signal.Signals[signal_at[1]])
                it_interval += 1
                if it % tc.log_interval == 0 or it == tc.max_iters:
                    log_interval_row(lr)
        except KeyboardInterrupt:
            interrupted = True
        except torch.OutOfMemoryError:
            oom = "evaluation"
        except DiskFullError as e:
            raise _disk_full(e, it, last_good, run_dir) from None
        except NonFiniteLoss as e:
            if bar is not None:
                bar.close()
            raise NonFiniteLoss(f"{e}: training stopped. The last good checkpoint (step {last_good}) is kept in "
                                f"{run_dir / 'ckpt'}; lower optim.learning_rate or enable optim.grad_clip and "
                                f"resume from it with --resume") from None
    if bar is not None:
        bar.close()
    if oom:
        raise _out_of_memory(cfg, dinfo, run_dir, last_good, oom)
    if interrupted:
        if dinfo.is_main:
            print(f"interrupted at step {it}; resume with --resume (last checkpoint: step {last_good})")
        raise KeyboardInterrupt

    if device == "cuda":
        torch.cuda.synchronize()
    train_time += time.perf_counter() - t_interval
    if bad.item():
        raise NonFiniteLoss(f"non-finite loss before step {it}; last good checkpoint: step {last_good}")
    if stopped_at is not None or (ckpt_path is not None and start_iter == it and last_val is not None):
        final_val = last_val  # resumed from the final checkpoint (killed before summary.json): no second eval
    else:
        try:
            final_val = _checkpoint_eval(run_eval, checkpoint, it, run_dir)
        except DiskFullError as e:
            raise _disk_full(e, it, last_good, run_dir) from None
    # steady-state speed: skip the first logged interval (compilation, warm-up)
    steady = step_times[1:] or step_times
    ms_iter = 1000 * sum(d for _, d in steady) / max(1, sum(n for n, _ in steady))
    bpc = corpus.bits_per_char if corpus is not None else (lambda v: None)
    summary = {
        "mixer": cfg.model.mixer, "n_params": n_params, "steps": it, "tokens": tokens_seen,
        "train_flops_per_token": flops_per_token, "flops": tokens_seen * flops_per_token,
        "final_val_loss": final_val, "best_val_loss": best_val, "best_val_ppl": math.exp(best_val),
        "best_val_bpc": bpc(best_val), "final_val_ppl": math.exp(final_val),
        "ms_per_iter": ms_iter, "tokens_per_s": tokens_per_iter * 1000 / ms_iter if ms_iter else None,
        "train_time_s": train_time, "peak_mem_mb": peak_memory_mb(device), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "world_size": dinfo.world_size, "dtype": str(dtype).replace("torch.", ""),
        "compile": tc.compile and tc.compile_scope, "compile_mode": tc.compile_mode if tc.compile else None,
        "cuda_graph": train_step.captured, "cuda_graph_reason": train_step.reason if tc.cuda_graph else None,
        "backend": cfg.model.backend, "op_backends": dict(sorted(op_backends.items())), "fla_preload": preloaded,
    }
    if task is not None:
        summary |= _task_summary(cfg, acc, stopped_at)
    if dinfo.is_main:
        atomic_write_json(run_dir / SUMMARY, summary)
        wandb.finish(summary)
        score = (f"best accuracy {acc['best']:.4f}, best val loss {best_val:.4f}" if task is not None else
                 f"best val loss {best_val:.4f} (ppl {math.exp(best_val):.2f}, bpc {summary['best_val_bpc']:.3f})")
        print(f"done: {score}, {ms_iter:.1f} ms/iter, {train_time:.0f} s training -> {run_dir}")
    return summary
