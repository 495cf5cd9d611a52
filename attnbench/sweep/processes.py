"""The sweep's processes: device slots, the training children, signals, and the training loop.

Each run is a child process, `python -m attnbench.sweep RUN_DIR` (attnbench/sweep/__main__.py, reading
RUN_DIR/run.json), so a crash of one run does not stop the sweep. Runs are scheduled on slots:
`--devices 0,1` gives one slot per GPU (CUDA_VISIBLE_DEVICES per child), `--jobs_per_device N` N slots
per GPU (small, launch-bound models share a GPU well; the concurrency is recorded in run.json and the
report flags speed numbers measured that way), `--nproc_per_node N` runs each training under
`python -m torch.distributed.run --standalone --nproc_per_node N` on a group of N devices (DDP;
train.gradient_accumulation_steps must be a multiple of N). A run across nodes: `attnbench sweep FILE
--dry_run` writes every run.json and prints the commands; start one under torchrun on every node
(`torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT -m
attnbench.sweep OUT/runs/<id>`, shared filesystem), and the next `attnbench sweep` finds it done.

Stopping: Ctrl-C (SIGINT), SIGTERM or SIGUSR1 is forwarded to the children, which stop at a step boundary
(their checkpoints stay); the sweep records them as interrupted and exits 130; run the same command
again to continue. A run that exits with status 75 (attnbench.preemption.EXIT_PREEMPTED: SIGTERM or
SIGUSR1 reached it alone, and it wrote a checkpoint first) is recorded as interrupted, not failed, and
goes back in the queue to resume from that checkpoint. A SIGKILL of the sweep kills its children too (PR_SET_PDEATHSIG), so a restart
loses at most the steps since each run's last checkpoint.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..cuda_mps import ENV_KEYS, mps_daemon
from ..errors import AttnbenchError
from ..preemption import EXIT_PREEMPTED
from .manifest import (RUN_FILE, _clear_stale, _log_tail, _Manifest, _now, _tail_metrics, _write_run_file,
                       read_summary, run_state)
from .plan import PlannedRun
from .spec import Sweep

# The folder holding the attnbench package: children import this copy of it, wherever they start.
IMPORT_ROOT = Path(__file__).resolve().parents[2]


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
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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


@dataclass
class _Running:
    run: PlannedRun
    slot: Slot
    proc: subprocess.Popen
    started: float


def _say(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGUSR1 (a scheduler's stop, Slurm's warning before a time limit) behave like Ctrl-C, and
    Ctrl-C works even when a shell started us with SIGINT ignored. SIGUSR1's default action would end this
    process at once, and its children with it (PR_SET_PDEATHSIG) before they write a checkpoint."""
    prev = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGUSR1, on_term)
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
        "started": _now(), "launcher": "local", "device": slot.device, "nproc_per_node": slot.nproc,
        "jobs_per_device": slot.shared_by,
        "cuda_mps": "CUDA_MPS_PIPE_DIRECTORY" in slot.env, "resumed_from_step": step, "command": cmd}]
    _write_run_file(rd, r, sweep, launches)
    proc = _spawn(cmd, _child_env(slot.env), out / "logs" / f"{r.run_id}.log")
    slot.busy = True
    attempts = man.data["runs"][r.run_id].get("attempts", 0) + 1
    man.set(r.run_id, status="running", attempts=attempts, launcher="local", device=slot.device,
            jobs_per_device=slot.shared_by, pid=proc.pid)
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


def launch_order(todo: list[PlannedRun]) -> list[PlannedRun]:
    """The runs taken in turn from each mixer (label), each mixer's runs in plan order: with fewer slots than
    runs, every wave then mixes mixers, and a slow mixer's runs (NSA's PyTorch path in the recall preset)
    do not all start last and leave the GPU to them alone at the end."""
    by_label: dict[str, list[PlannedRun]] = {}
    for r in todo:
        by_label.setdefault(r.label, []).append(r)
    lanes = list(by_label.values())
    return [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]


def _train_all(sweep: Sweep, out: Path, todo: list[PlannedRun], slots: list[Slot], man: _Manifest,
               status_interval: float, n_done: int, n_total: int) -> list[str]:
    queue = launch_order(todo)
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
                elif rc == EXIT_PREEMPTED:  # stopped by a signal after writing a checkpoint: resume it
                    man.set(job.run.run_id, status="interrupted", returncode=rc)
                    queue.append(job.run)
                    _say(f"preempted {job.run.run_id} (exit code {rc}); it resumes from its checkpoint")
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
