"""The benchmark phase after training: one `attnbench bench` child per mixer (and benchmark), with the
mixer's trained shape, alone on its device.

Each child is `attnbench bench all --mixers M --no_match --set <trained shape> ...`, writing
`<out>/bench/<mixer>.jsonl` (a pattern's name made file-safe; skipped when present; after all training; on the CPU with the training
runs' thread count, because two OpenMP threads on a busy 2-core machine measure the neighbours, not
the model; on a GPU each child starts before its turn, the first while the runs train and each next
one while the previous one measures, and waits with `--wait_for` until the device is free, so its
imports are off the critical path; ATTNBENCH_BENCH_PRESTART=0 turns that off).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import mixers as registry
from ..bench import check_options, options_to_argv
from ..files import read_jsonl
from .manifest import _log_tail, _Manifest
from .plan import PlannedRun
from .processes import Slot, _child_env, _say, _signal_group, _spawn
from .spec import BENCHES, BenchSpec, Sweep

def bench_tasks(spec: BenchSpec) -> list[str]:
    """`all` when every benchmark is wanted (one process per mixer), else each one listed."""
    return ["all"] if set(spec.benches) == set(BENCHES) else list(spec.benches)


def check_bench_options(spec: BenchSpec, path: Path | str) -> None:
    """Unknown, mistyped or reserved bench options are errors before anything runs (checked against the
    benchmarks' own option dataclasses, attnbench.bench.options)."""
    if spec.enabled:
        check_options(spec.options, bench_tasks(spec), f"{path} [bench.options]")


def _shape_sets(model: dict[str, Any]) -> list[str]:
    """`--set` arguments that make the bench build exactly the trained model shape."""
    out = []
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pos_emb", "backend"):
        out += ["--set", f"{k}={model[k]}"]
    for k, v in sorted((model.get("mixer_args") or {}).items()):
        for sub, val in sorted(v.items()) if isinstance(v, dict) else [(None, v)]:  # a hybrid's sub-tables
            if val is not None:
                out += ["--set", f"{model['mixer']}.{k}{'' if sub is None else '.' + sub}={val}"]
    return out


def bench_command(model: dict[str, Any], task: str, device: str, json_path: Path, spec: BenchSpec) -> list[str]:
    """`python -m attnbench bench TASK --mixers M --no_match --set <trained shape> --device D --json FILE [options]`."""
    cmd = [sys.executable, "-m", "attnbench", "bench", task, "--mixers", model["mixer"], "--device", device,
           "--json", str(json_path), "--no_match", *_shape_sets(model)]
    cmd += options_to_argv(spec.options, task)  # only the options this benchmark takes
    return cmd


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
        for mixer in dict.fromkeys(sweep.mixer_of(m) for m in sweep.mixers):  # a variant's mixer is benchmarked once
            model = next(r.config["model"] for r in runs if r.mixer == mixer)
            for task in bench_tasks(sweep.bench):
                stem = registry.file_safe(mixer)
                final = out / "bench" / (f"{stem}.jsonl" if task == "all" else f"{stem}-{task}.jsonl")
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
