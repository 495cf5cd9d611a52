"""The Slurm launcher's options: the sweep file's [launcher] table and the command line (which wins),
checked before anything is submitted.

    [launcher]
    type = "slurm"                 # or --launcher slurm
    partition = "gpu"              # --partition (default: the cluster's default partition)
    time = "4:00:00"               # --time, in Slurm's formats (default: the partition's default time)
    gpus_per_job = 1               # --gpus_per_job (default: nproc_per_node, or 0 with devices = "cpu")
    cpus_per_job = 8               # --cpus_per_job (default: Slurm's)
    mem = "32G"                    # --mem (default: Slurm's)
    sbatch = { account = "lab", qos = "high" }     # --sbatch KEY=VALUE: any other sbatch option
    setup = ["module load cuda"]   # shell lines the job runs before training
    signal_delay_s = 120           # SIGUSR1 this long before the time limit: checkpoint and requeue
    max_requeues = 10              # requeues after time limits or preemptions before a run is left interrupted

The checks against the cluster (`check_cluster`): `sbatch` on PATH, submitit importable, the partition
known to `sinfo`, and `sbatch --test-only` accepting the options (Slurm's own verdict, without submitting).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import AttnbenchError, ConfigError, did_you_mean

KEYS = {
    "type": "launcher: 'local' or 'slurm' (CLI --launcher wins)",
    "partition": "Slurm partition (default: the cluster's default)",
    "time": "time limit per job in Slurm's format: MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN, D-H:MIN:SEC",
    "gpus_per_job": "GPUs per job (a run with nproc_per_node > 1 runs under torchrun inside its job)",
    "cpus_per_job": "CPUs per job (sbatch --cpus-per-task)",
    "mem": "memory per job, e.g. '32G' (sbatch --mem)",
    "sbatch": "table of other sbatch options, e.g. { account = 'lab', constraint = 'h100' }",
    "setup": "list of shell lines each job runs before training (module load, source a venv)",
    "signal_delay_s": "seconds before the time limit at which the job gets SIGUSR1 (checkpoint and requeue)",
    "max_requeues": "requeues after a time limit or preemption before the run is left interrupted",
}
# sbatch options the launcher sets itself: the option that sets each instead
_RESERVED = {"partition": "--partition", "p": "--partition", "time": "--time", "t": "--time", "mem": "--mem",
             "cpus-per-task": "--cpus_per_job", "c": "--cpus_per_job", "gpus-per-node": "--gpus_per_job",
             "gres": "--gpus_per_job", "output": None, "o": None, "error": None, "e": None, "signal": "signal_delay_s",
             "job-name": None, "J": None, "array": None, "open-mode": None, "wrap": None}
_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<h>\d+):(?P<hm>\d+):(?P<hs>\d+)|(?P<m>\d+)(?::(?P<ms>\d+))?)$")
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)
_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
UNLIMITED_MIN = 10 ** 6  # what submitit counts for a job without a time limit (it needs a number)
# Paths that are private to one machine: compute nodes see their own, not the submitting host's
_LOCAL_PATHS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str | None = None  # as given (validated); None: the partition's default
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 10


def time_minutes(value: str, where: str = "--time") -> int | None:
    """Slurm's time formats -> whole minutes (rounded up); 'UNLIMITED'/'INFINITE' -> None."""
    v = str(value).strip()
    if v.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(v)
    if not m:
        raise ConfigError(f"{where} {value!r} is not a Slurm time: write MIN, MIN:SEC, H:MIN:SEC, D-H, D-H:MIN or "
                          "D-H:MIN:SEC, e.g. 90, 4:00:00 or 1-12:00:00")
    g = {k: int(x) if x else 0 for k, x in m.groupdict().items()}
    seconds = (g["d"] * 86400 + g["dh"] * 3600 + g["dm"] * 60 + g["ds"] + g["h"] * 3600 + g["hm"] * 60 + g["hs"]
               + g["m"] * 60 + g["ms"])
    if seconds <= 0:
        raise ConfigError(f"{where} {value!r}: a time limit must be positive")
    return -(-seconds // 60)


def _positive_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_sbatch(items: list[str]) -> dict[str, Any]:
    """--sbatch KEY=VALUE (repeatable; a bare KEY is a flag such as exclusive) -> {key: value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, val = item.partition("=")
        out[key.strip().lstrip("-")] = val if eq else True
    return out


def parse_options(table: dict[str, Any], cli: dict[str, Any], path: Path | str, nproc: int = 1,
                  cpu: bool = False) -> SlurmOptions:
    """The sweep file's [launcher] table, then the command line's options; every value checked."""
    for k in table:
        if k not in KEYS:
            raise ConfigError(f"{path}: unknown key launcher.{k}{did_you_mean(k, list(KEYS), list_all=True)}")
    merged = {**table, **{k: v for k, v in cli.items() if v not in (None, [], {}) and k != "sbatch"}}
    sbatch = dict(table.get("sbatch", {}) or {})
    if not isinstance(sbatch, dict):
        raise ConfigError(f"{path}: launcher.sbatch must be a table of sbatch options, e.g. {{ account = \"lab\" }}")
    sbatch.update(parse_sbatch(cli.get("sbatch") or []))

    def where(k: str) -> str:
        return f"--{k}" if cli.get(k) not in (None, [], {}) else f"{path}: launcher.{k}"

    o = SlurmOptions()
    if merged.get("partition") is not None:
        o.partition = str(merged["partition"])
    if merged.get("time") is not None:
        o.time = str(merged["time"])
        time_minutes(o.time, where("time"))
    if merged.get("gpus_per_job") is not None:
        o.gpus_per_job = _positive_int(merged["gpus_per_job"], where("gpus_per_job"), 0)
    else:
        o.gpus_per_job = 0 if cpu else nproc
    if o.gpus_per_job and o.gpus_per_job < nproc:
        raise ConfigError(f"{where('gpus_per_job')} {o.gpus_per_job}: a run under torchrun with nproc_per_node "
                          f"{nproc} needs {nproc} GPUs in its job")
    if merged.get("cpus_per_job") is not None:
        o.cpus_per_job = _positive_int(merged["cpus_per_job"], where("cpus_per_job"), 1)
    if merged.get("mem") is not None:
        o.mem = str(merged["mem"]).strip()
        if not _MEM.match(o.mem):
            raise ConfigError(f"{where('mem')} {merged['mem']!r} is not a Slurm memory size: a number of megabytes "
                              "or one with a unit, e.g. 16000, 16G, 512M")
    for k, v in sbatch.items():
        if not _SBATCH_KEY.match(str(k)):
            raise ConfigError(f"sbatch option {k!r}: write an sbatch long option without dashes, e.g. account=lab")
        key = str(k).replace("_", "-")
        if key in _RESERVED:
            how = f"use {_RESERVED[key]} instead" if _RESERVED[key] else "the launcher sets it"
            raise ConfigError(f"sbatch option {k!r}: {how}")
        if not isinstance(v, (str, int, float, bool)):
            raise ConfigError(f"sbatch option {k!r}: its value must be a string or number, got {v!r}")
        o.sbatch[key] = v
    setup = merged.get("setup", [])
    if isinstance(setup, str):
        setup = [setup]
    if not isinstance(setup, list) or not all(isinstance(x, str) for x in setup):
        raise ConfigError(f"{path}: launcher.setup must be a list of shell lines, e.g. [\"module load cuda\"]")
    o.setup = list(setup)
    if "signal_delay_s" in merged:
        o.signal_delay_s = _positive_int(merged["signal_delay_s"], where("signal_delay_s"), 1)
    if "max_requeues" in merged:
        o.max_requeues = _positive_int(merged["max_requeues"], where("max_requeues"), 0)
    return o


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AttnbenchError(f"`{' '.join(cmd)}` did not answer ({e}); is the Slurm controller reachable?") from None


def partitions() -> tuple[list[str], str | None]:
    """The partitions `sinfo` lists, and the default one (marked * by sinfo)."""
    p = _run(["sinfo", "-h", "-o", "%P"])
    if p.returncode != 0:
        raise AttnbenchError(f"`sinfo -h -o %P` failed: {(p.stderr or p.stdout).strip()[-500:]}; "
                             "is the Slurm controller reachable?")
    names, default = [], None
    for line in p.stdout.split():
        name = line.strip().rstrip("*")
        if line.strip().endswith("*"):
            default = name
        if name and name not in names:
            names.append(name)
    return names, default


def partition_time(partition: str) -> str | None:
    """The partition's DefaultTime, else its MaxTime (what Slurm gives a job without --time)."""
    p = _run(["scontrol", "show", "partition", partition, "-o"])
    fields = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv) if p.returncode == 0 else {}
    for key in ("DefaultTime", "MaxTime"):
        v = fields.get(key, "NONE")
        if v.upper() not in ("NONE", "N/A", ""):
            return v
    return None


def check_cluster(o: SlurmOptions) -> None:
    """What fails before anything is submitted: no sbatch, no submitit, an unknown partition, options
    Slurm refuses. Fills in the partition and time limit Slurm would pick."""
    if shutil.which("sbatch") is None:
        raise AttnbenchError("--launcher slurm: `sbatch` is not on PATH; run the sweep where Slurm's commands "
                             "are installed (a login node of the cluster), or use --launcher local")
    try:
        import submitit  # noqa: F401  (an optional extra: only the Slurm launcher needs it)
    except ImportError:
        raise AttnbenchError("--launcher slurm needs submitit, which is not installed: "
                             "pip install -e \".[slurm]\" (or pip install submitit)") from None
    names, default = partitions()
    if o.partition is None:
        if default is None:
            raise AttnbenchError(f"the cluster has no default partition; pass --partition (partitions: "
                                 f"{', '.join(names) or 'none'})")
        o.partition = default
    elif o.partition not in names:
        raise AttnbenchError(f"--partition {o.partition!r}: no such partition (`sinfo -h -o %P` lists "
                             f"{', '.join(names) or 'none'}){did_you_mean(o.partition, names)}")
    if o.time is None:
        o.time = partition_time(o.partition) or "UNLIMITED"
    p = _run(["sbatch", "--test-only", *sbatch_flags(o), "--wrap", "true"])
    if p.returncode != 0:
        msg = " ".join(line.removeprefix("sbatch: error: ").strip() for line in (p.stderr or p.stdout).splitlines()
                       if line.strip())
        raise AttnbenchError(f"Slurm refuses the job options {' '.join(sbatch_flags(o))}: {msg[-800:]}")


def sbatch_flags(o: SlurmOptions) -> list[str]:
    """The options as sbatch's command line (for --test-only and the messages)."""
    flags = [f"--partition={o.partition}"] if o.partition else []
    if o.time:
        flags.append(f"--time={o.time}")
    if o.gpus_per_job:
        flags.append(f"--gpus-per-node={o.gpus_per_job}")
    if o.cpus_per_job:
        flags.append(f"--cpus-per-task={o.cpus_per_job}")
    if o.mem:
        flags.append(f"--mem={o.mem}")
    flags += [f"--{k}" if v is True else f"--{k}={v}" for k, v in o.sbatch.items()]
    return flags


def warn_if_private(out: Path) -> None:
    """A sweep folder in /tmp (or another machine-private path) is invisible to the compute nodes."""
    p = out.resolve()
    for prefix in _LOCAL_PATHS:
        if p.is_relative_to(prefix):
            print(f"attnbench: warning: the sweep folder {p} is under {prefix}, which is private to this machine: "
                  "jobs on other nodes cannot see it (use --out on a shared filesystem)", file=sys.stderr, flush=True)
            return
