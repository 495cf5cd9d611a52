#!/usr/bin/env bash
# One invocation on a CUDA machine: GPU tests, training runs and benchmarks; results go to the folder given.
#
#   scripts/gpu_suite.sh OUTDIR [STAGE ...]
#
# Stages, run in order:
#   env                      versions, GPUs, whether FLA's gated backward is refused here
#   tests | tests:PATHS      the GPU-marked tests (stop after $GPU_TESTS_TIMEOUT s, default 540)
#   train:CONFIG[:k=v,...]   one training run (solo on the visible GPU)
#   train_parallel:CFG[+k=v...],CFG...   several at once in the background; `wait` joins them
#   torchrun:CONFIG[:k=v,...]  one training run under torchrun across every visible GPU (DDP, NCCL)
#   fla_tune                 scripts/fla_tune.py: save FLA's autotuner choices for this GPU to OUTDIR/fla_configs,
#                            at the bake-off shapes and the bakeoff preset's benchmarks (then timed again from an empty
#                            Triton cache with them installed, unless FLA_TUNE_OPTS=--no_check)
#   profile                  scripts/profile_step.py (eager, whole-step CUDA graph, compiled blocks in the graph; $PROFILE_OPTS)
#   profile_decode           scripts/profile_decode.py to OUTDIR/profile_decode.txt: decode ms/token from the CUDA graph,
#                            plain and torch.compile'd, after a 1024-token prompt, and the eager step's kernels
#                            ($PROFILE_DECODE_OPTS, e.g. "--mixers softmax,deltanet --prompt_len 4096")
#   bench | bench:SUB        attnbench bench all|SUB --device cuda (extra options in $BENCH_OPTS; stop
#                            after $GPU_BENCH_TIMEOUT s, default 540)
#   sweep:FILE | run:PRESET  attnbench sweep FILE / attnbench run --preset PRESET (extra options in
#                            $SWEEP_OPTS; stop after $GPU_SWEEP_TIMEOUT s, default 570)
#   eval:NAME                attnbench eval $ATTNBENCH_RUNS/NAME --lengths $EVAL_LENGTHS (e.g. a recall sweep
#                            at 64,128,...,1024), then attnbench report on that folder
# GPU_APPS_EVERY=S samples nvidia-smi's compute processes (pid, memory) every S seconds into OUTDIR/gpu_apps.csv
# while the stages run, with each pid's command line (which processes hold a CUDA context, and how much).
# Run folders go to $ATTNBENCH_RUNS (default $TMPDIR/attnbench-runs); two suites sharing a machine (one per
# GPU through CUDA_VISIBLE_DEVICES) need different ones. With ATTNBENCH_FLA_CAPTURE=DIR every training and
# benchmark process saves its FLA autotuner choices and kernel specializations under DIR (packed into
# OUTDIR/fla_capture.tar.gz; merge with scripts/fla_tune.py attnbench/fla_configs --merge DIR). NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
#
# Installs the wheels in .whl/ (fla-core, flash-linear-attention: scripts/gpu_wheels.sh downloads them for
# hosts without network access) and .whl_*/ (scripts/tilelang-wheels.sh) into $TMPDIR/site, reads tiny
# Shakespeare from $ATTNBENCH_DATA (default .gpu_data/input.txt), keeps bulky run folders in $ATTNBENCH_RUNS
# and packs the small result files into OUTDIR/results.tar.gz.
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_suite.sh OUTDIR [STAGE ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests)
mkdir -p "$OUTDIR"
TMP=${TMPDIR:-/tmp}
SITE=$TMP/site
RUNS=${ATTNBENCH_RUNS:-$TMP/attnbench-runs}
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
# wheel folders (.whl: FLA, scripts/gpu_wheels.sh; .whl_tl1, .whl_tl2: TileLang, scripts/tilelang-wheels.sh),
# each installed once per machine: a second suite, or a later one on the same machine, skips what is there
for d in .whl .whl_*; do
  if ls "$d"/*.whl >/dev/null 2>&1 && [ ! -e "$SITE/.installed$d" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl \
      || { echo "wheel install from $d failed"; exit 1; }
    touch "$SITE/.installed$d"
  fi
done
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export ATTNBENCH_DATA=${ATTNBENCH_DATA:-$PWD/.gpu_data/input.txt}
LOG="$OUTDIR/suite.log"
SAMPLER=
if [ -n "${GPU_APPS_EVERY:-}" ]; then
  ( while :; do
      nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | while IFS=', ' read -r pid mem _; do
        echo "$(date +%T),$pid,$mem,$(cat /proc/$pid/cmdline 2>/dev/null | tr '\0' ' ' | cut -c1-160)"
      done
      sleep "$GPU_APPS_EVERY"
    done >> "$OUTDIR/gpu_apps.csv" ) &
  SAMPLER=$!
fi

for stage in "${STAGES[@]}"; do
  echo "=== $stage ($(date +%T))" | tee -a "$LOG"
  case "$stage" in
    env)
      python3 - <<'PY' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), "x", torch.cuda.device_count())
from attnbench.ops.backend import fla_available, gated_backward_route, _gated_backward_static_check
print("fla importable:", fla_available(), "| FLA's own gated backward on this GPU/triton:", _gated_backward_static_check(),
      "| gated backward route:", gated_backward_route())
PY
      ;;
    tests|tests:*)
      paths=tests; [ "$stage" != tests ] && paths=${stage#tests:}; paths=${paths//,/ }
      # SIGINT: pytest still finishes its run (prints what ran; saves FLA's autotuner choices where
      # ATTNBENCH_SAVE_FLA_CONFIGS names a file)
      # GPU_TESTS_WORKERS=N: N pytest-xdist processes share the GPU, one test file each at a time; on a fresh
      # machine most of a GPU test's time is Triton compiling FLA's kernels on the CPU cores.
      # GPU_TESTS_DIST=load hands out single tests instead of files: for one long file of independent
      # per-mixer cases (test_train_gpu.py), which loadfile would run on one worker only
      par=(); [ "${GPU_TESTS_WORKERS:-1}" -gt 1 ] && par=(-n "$GPU_TESTS_WORKERS" --dist "${GPU_TESTS_DIST:-loadfile}")
      timeout -s INT -k 20 "${GPU_TESTS_TIMEOUT:-540}" python3 -m pytest $paths -m gpu -v -rs --durations=25 -p no:cacheprovider "${par[@]}" 2>&1 \
        | tee "$OUTDIR/gpu_tests.log" | tail -40
      ;;
    train_parallel:*)
      # several runs at once on the GPU(s): small models are launch-bound, so they share a GPU well;
      # their ms/iter is then not a solo figure (the log says so)
      IFS=',' read -ra cfgs <<< "${stage#train_parallel:}"
      echo "running ${#cfgs[@]} trainings concurrently (timeout ${GPU_TRAIN_TIMEOUT:-3600}s)" | tee -a "$LOG"
      for spec in "${cfgs[@]}"; do
        cfg=${spec%%+*}; name=$(basename "$cfg" .toml); extra=()
        [ "$spec" != "$cfg" ] && { IFS='+' read -ra kv <<< "${spec#*+}"; for x in "${kv[@]}"; do extra+=("--$x"); done; }
        rm -rf "$RUNS/$name"
        ( /usr/bin/time -f "$name wall %e s" timeout "${GPU_TRAIN_TIMEOUT:-3600}" python3 -m attnbench train "$cfg" \
            --out_dir="$RUNS/$name" --progress=false "${extra[@]}" > "$RUNS/$name.log" 2>&1; \
          tail -3 "$RUNS/$name.log" >> "$LOG" ) &
      done
      ;;
    wait)
      wait
      ;;
    train:*)
      spec=${stage#train:}
      cfg=${spec%%:*}
      name=$(basename "$cfg" .toml)
      extra=()
      if [ "$spec" != "$cfg" ]; then
        IFS=',' read -ra kv <<< "${spec#*:}"
        for x in "${kv[@]}"; do extra+=("--$x"); name="$name-${x//[^A-Za-z0-9_.=]/}"; done
      fi
      rm -rf "$RUNS/$name"
      /usr/bin/time -f "wall %e s" python3 -m attnbench train "$cfg" --out_dir="$RUNS/$name" --progress=false "${extra[@]}" 2>&1 \
        | grep -v "^step .*val loss" | tail -5 | tee -a "$LOG"
      ;;
    torchrun:*)
      spec=${stage#torchrun:}; cfg=${spec%%:*}; name=$(basename "$cfg" .toml)-ddp; extra=()
      if [ "$spec" != "$cfg" ]; then
        IFS=',' read -ra kv <<< "${spec#*:}"
        for x in "${kv[@]}"; do extra+=("--$x"); name="$name-${x//[^A-Za-z0-9_.=]/}"; done
      fi
      n=$(python3 -c "import torch; print(torch.cuda.device_count())")
      rm -rf "$RUNS/$name"
      /usr/bin/time -f "$name wall %e s" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" \
          -m attnbench train "$cfg" --out_dir="$RUNS/$name" --progress=false "${extra[@]}" > "$RUNS/$name.log" 2>&1
      grep -v "^step .*val loss" "$RUNS/$name.log" | tail -5 | tee -a "$LOG"
      ;;
    fla_tune)
      python3 scripts/fla_tune.py "$OUTDIR/fla_configs" ${FLA_TUNE_OPTS:-} 2>&1 | tee -a "$LOG" | tail -20
      ;;
    profile)
      python3 scripts/profile_step.py --out "$OUTDIR/profile.txt" ${PROFILE_OPTS:---variants eager,graph,blocks+graph} 2>&1 | tail -80
      ;;
    profile_decode)
      # printed: each mixer's timings and counts (the kernel tables are in the file)
      python3 scripts/profile_decode.py --out "$OUTDIR/profile_decode.txt" ${PROFILE_DECODE_OPTS:-} 2>&1 | grep -v '^    ' | tail -80
      ;;
    bench|bench:*)
      sub=all; [ "$stage" != bench ] && sub=${stage#bench:}
      timeout -s INT -k 20 "${GPU_BENCH_TIMEOUT:-540}" python3 -m attnbench bench "$sub" --device cuda --json "$RUNS/bench-$sub.jsonl" ${BENCH_OPTS:-} 2>&1 \
        | tee "$RUNS/bench-$sub.log" | tail -60 | tee -a "$LOG"
      ;;
    sweep:*|run:*)
      if [ "${stage%%:*}" = sweep ]; then cmd=(sweep "${stage#sweep:}" --out "$RUNS/sweep")
      else cmd=(run --preset "${stage#run:}" --out "$RUNS/${stage#run:}"); fi
      # SIGINT first: the sweep stops its runs at a step boundary and still exits; then its files are packed
      /usr/bin/time -f "wall %e s" timeout -s INT -k 20 "${GPU_SWEEP_TIMEOUT:-570}" python3 -m attnbench "${cmd[@]}" \
        ${SWEEP_OPTS:-} > "$RUNS/${stage//[:\/]/-}.log" 2>&1
      tail -40 "$RUNS/${stage//[:\/]/-}.log" | tee -a "$LOG"
      ;;
    eval:*)
      dir="$RUNS/${stage#eval:}"
      /usr/bin/time -f "eval wall %e s" python3 -m attnbench eval "$dir" --lengths "${EVAL_LENGTHS:?set EVAL_LENGTHS}" \
          ${EVAL_OPTS:-} 2>&1 | tail -20 | tee -a "$LOG"
      python3 -m attnbench report "$dir" 2>&1 | tail -3 | tee -a "$LOG"
      ;;
    *) echo "unknown stage $stage" | tee -a "$LOG" ;;
  esac
done
# small files only: summaries, metrics, bench rows, reports (no checkpoints)
[ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
wait
mkdir -p "$OUTDIR"
(cd "$RUNS" && find . -name '*.log' -o -name summary.json -o -name metrics.jsonl -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' \
   | grep -v /ckpt/ | tar czf "$OUTDIR/results.tar.gz" -T -) 2>/dev/null
# FLA captures (ATTNBENCH_FLA_CAPTURE=DIR: one folder per process) as one file, which is easier to copy
# back from a remote machine whole than many small folders
if [ -n "${ATTNBENCH_FLA_CAPTURE:-}" ] && [ -d "$ATTNBENCH_FLA_CAPTURE" ]; then
  tar czf "$OUTDIR/fla_capture.tar.gz" -C "$ATTNBENCH_FLA_CAPTURE" . && echo "FLA captures in $OUTDIR/fla_capture.tar.gz"
fi
echo "results in $OUTDIR"
