"""Run FLA's autotuning once on this GPU and save what it chose (attnbench/ops/fla_configs.py).

    python scripts/fla_tune.py OUTDIR [--mixers deltanet,nsa,...]
    python scripts/fla_tune.py attnbench/fla_configs --merge FILE   # no GPU: add FILE's choices (e.g. the
                                     # GPU tests', ATTNBENCH_SAVE_FLA_CONFIGS) to OUTDIR/<its GPU>.json
    python scripts/fla_tune.py attnbench/fla_configs --merge DIR    # every capture under DIR (runs made with
                                     # ATTNBENCH_FLA_CAPTURE=DIR): their choices and preload specializations

For each FLA-backed mixer at the parameter-matched bake-off shapes (10.7M): three training steps at the
bake-off batch (64 x 256, bf16 autocast, as training runs them), one evaluation forward (128 x 256) and a cached
decode (a 1024-token prompt, then single tokens, bf16 weights, as `bench latency` runs them). Every
Triton autotuner of FLA that met a key then holds its choice; they go to OUTDIR/<GPU name>.json, merged
with what is there. Copy the file to attnbench/fla_configs/ and commit it.

With `--preset bakeoff` (default) it then runs that preset's benchmarks (its [bench.options], the shapes its
sweep trains) in this process for each FLA mixer, so the keys they meet (prompt lengths, contexts, the
memory search's sizes: some FLA autotuners key on token-count buckets) are saved too: a preset run then
spends its benchmark phase measuring, not autotuning (seconds per new context length otherwise).

Then, unless --no_check, the check, twice, each in a fresh process with an empty Triton cache and the
saved choices installed: the same training-shape work again. The first records the specialization of
every FLA kernel each mixer compiles (one configuration each: the chosen one) to
OUTDIR/<GPU name>.preload.json (ops/fla_preload.py); the second compiles those in threads before each
mixer's steps and prints that time beside the first-step times. Each prints every mixer's first-step
time (one compilation per kernel, no timing of candidates) and how many FLA autotuners still
benchmarked (keys not saved).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECK = "--check" in sys.argv
if not CHECK:
    os.environ["ATTNBENCH_FLA_CONFIGS"] = "off"  # tune from scratch: saved choices must not short-circuit it

import torch  # noqa: E402

from attnbench.bench import latency  # noqa: E402
from attnbench.bench.rows import base_row  # noqa: E402
from attnbench.bench.shapes import BenchShape, bench_config, build_model, resolve_shapes  # noqa: E402
from attnbench.bench.timing import precision  # noqa: E402
from attnbench.bench.training_step import make_optimizer, random_batch, train_step  # noqa: E402
from attnbench.ops import fla_configs, fla_preload  # noqa: E402
from attnbench.ops.backend import fla_available, gated_backward_route  # noqa: E402

# the mixers whose ops run FLA's kernels on CUDA
FLA_MIXERS = ("deltanet", "gated_deltanet", "gated_deltaproduct", "nsa", "mamba2", "gla", "kda", "swa")


def exercise(shape: BenchShape) -> tuple[float, float]:
    """Training steps, an evaluation forward and a cached decode; (first step s, second step s)."""
    cfg = bench_config(shape.cfg, 1024 + 64)
    train = precision("autocast", "cuda", inference=False)
    model = build_model(cfg, "cuda").train()
    opt = make_optimizer(model, "cuda")
    x, y = random_batch(cfg.vocab_size, 64, 256, "cuda")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        train_step(model, opt, x, y, train, "cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    with torch.no_grad(), train.context("cuda"):
        model.eval()(random_batch(cfg.vocab_size, 128, 256, "cuda")[0])
    del model, opt
    infer = precision("auto", "cuda", inference=True)
    model = infer.prepare(build_model(cfg, "cuda")).eval()
    opts = latency.LatencyOptions(prompt_lens=[1024], decode_steps=5, decode_warmup=2, prefill_repeats=1,
                                  prefill_warmup=1, recompute_steps=0, cuda_graph=False)
    base = base_row("latency", shape, cfg, model.num_params(), "cuda", infer)
    latency.measure_prompt(model, 1024, opts, "cuda", infer, base)
    return times[0], times[1]


def exercise_preset_benchmarks(sweep_file: Path, mixers: list[str], scratch: Path, device: str = "cuda") -> None:
    """Run a sweep's benchmark commands (its [bench.options], its trained shapes) in this process, for the
    given mixers; their rows go to files in `scratch`."""
    from attnbench import cli, sweep

    sw = sweep.load_sweep(sweep_file)
    if not sw.bench.enabled:
        return
    for run in sweep.plan(sw, scratch, load_data=False):
        if run.mixer not in mixers:
            continue
        model = dict(run.config["model"])
        model["vocab_size"] = model.get("vocab_size") or 65  # shakespeare_char's (the data is not read here)
        for task in sweep.bench_tasks(sw.bench):
            cmd = sweep.bench_command(model, task, device, scratch / f"{run.mixer}-{task}.jsonl", sw.bench)
            t = time.perf_counter()
            cli.main(cmd[cmd.index("bench"):])
            print(f"{run.mixer}: {sw.name} bench {task} in {time.perf_counter() - t:.1f} s", flush=True)


def check(outdir: Path, mixers: str, preload: bool) -> None:
    """The same work in a fresh process: saved choices installed, Triton's compile cache empty. Without
    preload it records the kernels each mixer compiles (one configuration each, the chosen one) to the
    preload file; with preload it compiles those in threads first."""
    env = {**os.environ, "ATTNBENCH_FLA_CONFIGS": "on", "ATTNBENCH_FLA_CONFIG_DIR": str(outdir),
           "ATTNBENCH_FLA_PRELOAD": "1" if preload else "0",
           "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-check-")}
    subprocess.run([sys.executable, __file__, str(outdir), "--mixers", mixers, "--check"], env=env, check=True)


def merge_all(outdir: Path, src: Path) -> None:
    """Merge a saved-choices file, or every file under a capture folder (choices and preload specs), into
    outdir's files for their GPU."""
    import json

    for f in sorted(src.rglob("*.json")) if src.is_dir() else [src]:
        gpu = json.loads(f.read_text())["gpu"]
        if f.name.endswith(".preload.json"):
            dst = fla_preload.file_for(gpu, outdir)
            print(f"merged {fla_preload.merge(dst, f)} new kernel specializations from {f} into {dst}")
        else:
            dst = outdir / fla_configs.gpu_file_name(gpu)
            print(f"merged {fla_configs.merge(dst, f)} choices from {f} into {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--mixers", default=",".join(FLA_MIXERS))
    ap.add_argument("--check", action="store_true", help="(internal) the run with the saved file installed")
    ap.add_argument("--preset", default="bakeoff", help="also run this preset's benchmarks ('' for none)")
    ap.add_argument("--no_check", action="store_true", help="skip the re-timing from an empty Triton cache")
    ap.add_argument("--merge", type=Path, metavar="FILE", help="add FILE's saved choices to OUTDIR/<its GPU>.json")
    a = ap.parse_args()
    if a.merge:
        merge_all(a.outdir, a.merge)
        return
    if not torch.cuda.is_available() or not fla_available():
        sys.exit("fla_tune.py needs a CUDA GPU with the `fla` package (FLA's autotuners run there)")
    print("gated backward route:", gated_backward_route())  # decided before any step, as the trainer does
    label = "autotuning" if not a.check else "saved choices, preloaded" if fla_preload.enabled() else "saved choices"
    record = a.check and not fla_preload.enabled()  # the chosen configurations only (autotuning compiles all)
    gpu = torch.cuda.get_device_name(0)
    for shape in resolve_shapes(a.mixers.split(",")):
        if a.check and fla_preload.enabled():  # the kernels the first check recorded, in threads, first
            n, failed, secs = fla_preload.preload(f"{shape.mixer}:train", fla_preload.file_for(gpu, a.outdir))
            print(f"{shape.mixer} ({label}): preloaded {n} FLA kernels in {secs:.1f} s ({failed} failed)", flush=True)
        with fla_preload.recording(f"{shape.mixer}:train") if record else contextlib.nullcontext():
            first, second = exercise(shape)
        print(f"{shape.mixer} ({label}): first training step {first:.1f} s, second {second * 1e3:.1f} ms", flush=True)
    if a.preset and not a.check:
        from attnbench.run import preset_path

        exercise_preset_benchmarks(preset_path(a.preset), a.mixers.split(","),
                                   Path(tempfile.mkdtemp(prefix="fla-tune-bench-")))
    tuners = fla_configs.live_fla_tuners()
    if a.check:
        benched = [fla_configs.kernel_id(t.fn) for t in tuners if getattr(t, "configs_timings", None)]
        print(f"check: {len(tuners)} FLA autotuners used, {len(benched)} still timed candidates "
              f"(keys not saved): {benched}")
        if record:
            kept = fla_preload.chosen_only(fla_preload._recorded, tuners)
            n = fla_preload.save(fla_preload.file_for(gpu, a.outdir), gpu, recorded=kept)
            print(f"saved {n} FLA kernel specializations to {fla_preload.file_for(gpu, a.outdir)}", flush=True)
        return
    path = a.outdir / fla_configs.gpu_file_name(gpu)
    n = fla_configs.save(path, tuners, gpu, fla_configs.versions())
    saved = fla_configs.load(path, fla_configs.versions()) or {}
    assert sum(len(v) for v in saved.values()) >= n, "the saved file does not read back"
    print(f"saved {n} choices of {len(tuners)} autotuners to {path}", flush=True)
    if not a.no_check:
        check(a.outdir, a.mixers, preload=False)  # records the preload file
        check(a.outdir, a.mixers, preload=True)  # measures it


if __name__ == "__main__":
    main()
