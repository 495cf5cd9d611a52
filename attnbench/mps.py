"""A private CUDA MPS daemon for training runs that share a GPU.

Several small, launch-bound runs on one GPU (the seed preset trains five ~10.7M models at once) take
turns on it when each process has its own CUDA context: the GPU time-slices between contexts, so one
run's tiny kernels never overlap another's. Under MPS (NVIDIA's Multi-Process Service) the processes'
kernels share the GPU at the same time. The sweep starts a daemon of its own (pipe and log folders in a
fresh temporary folder, so it neither joins nor disturbs another MPS on the host), passes its folders
to the training children through CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY, and quits it before
the benchmarks, which run alone and outside MPS.

Where `nvidia-cuda-mps-control` is absent or refuses to start, the runs go on without MPS and the
sweep says so. A daemon left behind by a SIGKILL of the sweep serves nobody but its own pipe folder;
`echo quit | CUDA_MPS_PIPE_DIRECTORY=<dir> nvidia-cuda-mps-control` stops it.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

CONTROL = "nvidia-cuda-mps-control"
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


@contextlib.contextmanager
def mps_daemon(log_dir: Path | None = None, say: Callable[[str], None] = print,
               control: str = CONTROL) -> Iterator[dict[str, str]]:
    """Start a private MPS control daemon; yield the environment its clients need ({} without MPS).

    On leaving, the daemon is told to quit (it waits for its clients) and its server log is copied to
    `log_dir/mps-server.log` when `log_dir` is given."""
    binary = shutil.which(control)
    if binary is None:
        say(f"CUDA MPS: {control} not found on PATH; the runs share the GPU without it (time-sliced)")
        yield {}
        return
    root = Path(tempfile.mkdtemp(prefix="attnbench-mps-"))  # short path: the pipe names have a length limit
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for d in env.values():
        Path(d).mkdir()
    full_env = {**_base_env(), **env}
    try:
        started = subprocess.run([binary, "-d"], env=full_env, capture_output=True, text=True, timeout=30)
        ok, why = started.returncode == 0, (started.stderr or started.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        say(f"CUDA MPS: {control} -d failed ({why or 'no message'}); the runs share the GPU without it")
        shutil.rmtree(root, ignore_errors=True)
        yield {}
        return
    say(f"CUDA MPS: private daemon started (pipe folder {env['CUDA_MPS_PIPE_DIRECTORY']})")
    try:
        yield env
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([binary], input="quit\n", env=full_env, capture_output=True, text=True, timeout=60)
        if log_dir is not None:
            with contextlib.suppress(OSError):
                log_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / "log" / "server.log", log_dir / "mps-server.log")
        shutil.rmtree(root, ignore_errors=True)
        say("CUDA MPS: daemon stopped")


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
