"""A private CUDA MPS daemon for training runs that share a GPU.

Several small, launch-bound runs on one GPU (the bakeoff preset trains five ~10.7M models at once) take
turns on it when each process has its own CUDA context: the GPU time-slices between contexts, so one
run's tiny kernels never overlap another's. Under MPS (NVIDIA's Multi-Process Service) the processes'
kernels share the GPU at the same time. The sweep starts a daemon of its own (pipe and log folders in a
fresh temporary folder, so it neither joins nor disturbs another MPS on the host), passes its folders
to the training children through CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY, and quits it before
the benchmarks, which run alone and outside MPS.

Where `nvidia-cuda-mps-control` is absent or refuses to start, or a probe client cannot open a CUDA
context through it (the server starts at the first client, so a daemon that starts is not yet proof),
the runs go on without MPS and the sweep says so. A daemon left behind by a SIGKILL of the sweep serves nobody but its own pipe folder;
`echo quit | CUDA_MPS_PIPE_DIRECTORY=<dir> nvidia-cuda-mps-control` stops it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

CONTROL = "nvidia-cuda-mps-control"
ENV_KEYS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")

# A CUDA client in a few driver calls (no torch import): retain and release device 0's primary context,
# which under MPS connects to the server. Exit code: the first failing CUresult (or 98 without libcuda).
_PROBE = """
import ctypes, sys
try:
    cu = ctypes.CDLL("libcuda.so.1")
except OSError:
    sys.exit(98)
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
sys.exit(cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), 0)
         or cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) or cu.cuDevicePrimaryCtxRelease_v2(dev))
"""


def probe_client(env: dict[str, str], timeout_s: float = 60.0) -> str | None:
    """None when a CUDA client opens a context under `env`; else why not."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                           timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"probe client: {e}"
    if r.returncode == 0:
        return None
    if r.returncode == 98:
        return "probe client: libcuda.so.1 not found"
    return f"probe client: CUDA error {r.returncode}" + (f" ({r.stderr.strip()[-200:]})" if r.stderr.strip() else "")


@contextlib.contextmanager
def mps_daemon(log_dir: Path | None = None, say: Callable[[str], None] = print, control: str = CONTROL,
               probe_env: dict[str, str] | None = None,
               probe: Callable[[dict[str, str]], str | None] | None = None) -> Iterator[dict[str, str]]:
    """Start a private MPS control daemon and check that a client gets through it (`probe`, with
    `probe_env` on top, e.g. the runs' CUDA_VISIBLE_DEVICES); yield the environment its clients need
    ({} without MPS).

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
    why = (probe or probe_client)({**full_env, **(probe_env or {})})
    try:
        if why is not None:
            say(f"CUDA MPS: the daemon started but a client could not use it ({why}); "
                "the runs share the GPU without it")
            yield {}
            return
        say(f"CUDA MPS: private daemon started (pipe folder {env['CUDA_MPS_PIPE_DIRECTORY']})")
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
    return {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
