"""Saved choices of FLA's Triton autotuners, one file per GPU model, so runs skip the autotuning.

FLA autotunes a Triton kernel the first time it meets a new key (head counts, head dims, chunk size,
dtypes; for a few kernels the batch size): it compiles and times every candidate configuration, which
delays a run's first training step by tens of seconds to minutes and every new shape in the GPU tests
by seconds to a minute (the GPU report listed in results/README.md has the figures).

`scripts/fla_tune.py` runs the bake-off shapes on a GPU and saves what the autotuners chose to
`attnbench/fla_configs/<GPU name>.json`. Before FLA is first imported (`backend.fla_available`),
`install()` wraps the constructor of Triton's `Autotuner` (FLA's own `CachedAutotuner` subclasses it) so
that each FLA kernel's autotuner starts with the saved choices for its keys: Triton then compiles that one configuration and times none. A key not saved is autotuned
as usual. The file is used only with the Triton and FLA versions it was tuned with (a kernel's parameters
can change between versions). ATTNBENCH_FLA_CONFIGS=off disables it.

(FLA 0.6.0 has its own config cache, but its switch, `configure_fla_cache_autotune`, must run before
FLA's kernels are defined, and importing it defines them; so attnbench keeps its own small file.)

File: {"triton": version, "fla": version, "gpu": name,
       "kernels": {"<module>.<kernel>": [{"key": [...], "config": {"kwargs", "num_warps", "num_stages",
                                                                   "num_ctas", "maxnreg"}}]}}
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch

from ..files import atomic_write_text

log = logging.getLogger("attnbench.ops")

# where the per-GPU files live; ATTNBENCH_FLA_CONFIG_DIR points elsewhere (scripts/fla_tune.py --check)
CONFIG_ROOT = Path(os.environ.get("ATTNBENCH_FLA_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "fla_configs")
_INSTALLED: Path | None = None


def gpu_file_name(device_name: str) -> str:
    """'NVIDIA H200' -> 'NVIDIA_H200.json' (FLA names its per-GPU folders the same way)."""
    return (re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu") + ".json"


def kernel_id(fn: Any) -> str:
    """'<module>.<name>' of a Triton kernel (kernel names repeat across FLA's op families)."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return f"{fn.__module__}.{fn.__name__}"


def _plain(key: Iterable[Any]) -> list:
    return [list(k) if isinstance(k, tuple) else k for k in key]


def config_dict(config: Any) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def versions() -> dict[str, str | None]:
    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"triton": v("triton"), "fla": v("fla-core")}


def file_versions(data: dict) -> dict[str, str | None]:
    """The Triton and FLA versions a saved file (choices or preload specs) was written with."""
    return {"triton": data.get("triton"), "fla": data.get("fla")}


def read_if_versions(path: Path, vers: dict[str, str | None]) -> dict | None:
    """path's data when it exists and was written for these versions (a kernel's parameters can change
    between versions), else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if file_versions(data) == vers else None


def save(path: Path, tuners: Iterable[Any], device_name: str, vers: dict[str, str | None]) -> int:
    """Write every cached choice of the given autotuners to `path`, merged with the entries already there
    for the same versions (a key tuned again is replaced). Returns the number of choices written."""
    entries = []
    for t in tuners:
        for key, cfg in dict(getattr(t, "cache", {})).items():
            entry = {"key": _plain(key), "config": config_dict(cfg)}
            try:
                json.dumps(entry)
            except TypeError:  # a key or setting JSON cannot hold would not match when read back
                log.info("not saved (not JSON): %s %r", kernel_id(t.fn), key)
                continue
            entries.append((kernel_id(t.fn), entry))
    _write_merged(path, entries, device_name, vers)
    return len(entries)


def read_mergeable(dst: Path, src: Path) -> tuple[dict, dict[str, str | None]]:
    """src's data and versions, checked against dst's (when dst exists): files of other Triton or FLA
    versions cannot be merged (a kernel's parameters can change between versions)."""
    data = json.loads(src.read_text())
    vers = file_versions(data)
    if dst.is_file():
        old = file_versions(json.loads(dst.read_text()))
        if old != vers:
            raise ValueError(f"{src} is for triton {vers['triton']} / fla {vers['fla']}, {dst} for triton "
                             f"{old['triton']} / fla {old['fla']}: they cannot be merged")
    return data, vers


def merge(dst: Path, src: Path) -> int:
    """Add the choices saved in `src` (e.g. the GPU tests' file) to `dst`; both must be for the same
    Triton and FLA versions. Returns the number of choices taken from src."""
    data, vers = read_mergeable(dst, src)
    entries = [(name, e) for name, es in data.get("kernels", {}).items() for e in es]
    _write_merged(dst, entries, data.get("gpu"), vers)
    return len(entries)


def _write_merged(path: Path, entries: list[tuple[str, dict]], device_name: str | None,
                  vers: dict[str, str | None]) -> None:
    """Write `entries` ((kernel id, {key, config})) to path over what it holds for the same versions."""
    old = read_if_versions(path, vers) or {}
    kernels = {name: {json.dumps(e["key"]): e for e in old_entries}
               for name, old_entries in old.get("kernels", {}).items()}
    for name, entry in entries:
        kernels.setdefault(name, {})[json.dumps(entry["key"])] = entry
    data = {**vers, "gpu": device_name,
            "kernels": {name: list(es.values()) for name, es in sorted(kernels.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def live_fla_tuners() -> list[Any]:
    """FLA's Triton autotuners in this process that have chosen a configuration for some key."""
    try:
        from triton.runtime.autotuner import Autotuner  # optional dependency (the CUDA stack)
    except ImportError:
        return []
    # type(o), not isinstance(o, ...): isinstance reads o.__class__, which raises ReferenceError on a
    # weakref.proxy whose object is gone, and torch._dynamo.reset() leaves such proxies among the live
    # objects that the GPU tests' end-of-run save walks
    with warnings.catch_warnings():  # issubclass on some live classes (deprecated aliases) warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects()
                if issubclass(type(o), Autotuner) and getattr(o, "cache", None) and kernel_id(o.fn).startswith("fla.")]


def save_live(path: Path) -> int:
    """Save the choices of every FLA autotuner in this process to `path` (merged); 0 when there are none."""
    tuners = live_fla_tuners()
    if not tuners:
        return 0
    return save(path, tuners, torch.cuda.get_device_name(0), versions())


def load(path: Path, vers: dict[str, str | None]) -> dict[str, dict[tuple, dict]] | None:
    """{kernel id: {key tuple: config dict}}, or None when the file is for other Triton/FLA versions."""
    data = json.loads(path.read_text())
    if file_versions(data) != vers:
        log.info("FLA kernel configurations in %s are for triton %s / fla %s, not %s / %s: autotuning instead",
                 path, data.get("triton"), data.get("fla"), vers["triton"], vers["fla"])
        return None
    return {name: {tuple(tuple(k) if isinstance(k, list) else k for k in e["key"]): e["config"] for e in entries}
            for name, entries in data.get("kernels", {}).items()}


def install(device_name: str | None = None, root: Path = CONFIG_ROOT) -> Path | None:
    """Before FLA is imported: wrap Triton's Autotuner constructor so FLA's autotuners start with this
    GPU's saved choices. Returns the file used, or None (no file, other versions, disabled, no GPU)."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    if os.environ.get("ATTNBENCH_FLA_CONFIGS", "on").lower() in ("off", "0", "false"):
        return None
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name(0)
    path = root / gpu_file_name(device_name)
    if not path.is_file():
        return None
    saved = load(path, versions())
    if not saved:
        return None
    import triton  # optional dependency (the CUDA stack)
    from triton.runtime.autotuner import Autotuner

    # Every autotuner, however it is made: FLA builds most through triton.autotune, but some kernels
    # (l2norm, causal_conv1d, ...) through its own fla_cache_autotune, whose CachedAutotuner subclasses
    # Triton's; wrapping triton.autotune alone would miss those, and they would autotune in every run.
    original_init = Autotuner.__init__

    def init(self: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, fn, *args, **kwargs)
        for key, c in saved.get(kernel_id(fn), {}).items():
            self.cache.setdefault(key, triton.Config(dict(c["kwargs"]), num_warps=c["num_warps"],
                                                     num_stages=c["num_stages"], num_ctas=c.get("num_ctas", 1),
                                                     maxnreg=c.get("maxnreg")))

    Autotuner.__init__ = init
    _INSTALLED = path
    log.info("FLA kernel configurations from %s (%d kernels)", path, len(saved))
    return path
